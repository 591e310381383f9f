"""The declared metadata holds: the license file, the Python classifiers, floors that .ci/floors pins."""

from __future__ import annotations

import configparser
import re
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def floors() -> dict[str, str]:
    """``install_requires`` as name -> floor; each entry must be ``name>=X``, the form .ci/floors pins."""
    lines = [line.strip() for line in setup_cfg()["options"]["install_requires"].splitlines() if line.strip()]
    found = [re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)", line) for line in lines]
    assert all(found), lines
    return {m.group(1): m.group(2) for m in found if m}


def test_the_license_file_is_the_declared_mit_license() -> None:
    meta = setup_cfg()["metadata"]
    assert meta["license_expression"] == "MIT" and meta["license_files"].strip() == "LICENSE"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge, to any person obtaining a copy" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_python_classifiers_start_at_python_requires_without_gaps() -> None:
    cfg = setup_cfg()
    floor = re.fullmatch(r">=\s*3\.(\d+)", cfg["options"]["python_requires"].strip())
    assert floor is not None
    listed = re.findall(r"^Programming Language :: Python :: 3\.(\d+)$", cfg["metadata"]["classifiers"], re.M)
    minors = sorted(int(m) for m in listed)
    assert minors[0] == int(floor.group(1))
    assert minors == list(range(minors[0], minors[-1] + 1))


def test_the_environment_running_the_tests_meets_every_floor() -> None:
    got = floors()
    assert set(got) == {"torch", "torchvision", "numpy", "matplotlib", "tensorboard", "tqdm", "pillow"}
    for name, floor in got.items():
        assert Version(version(name)) >= Version(floor), (name, version(name), floor)
