"""torchvis.summary: the golden Keras-style table, reused modules, branches, totals and hygiene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn

from torchvis.apps.digits import DigitsCNN
from torchvis.inspection.model_summary import Summary, example_input, log_summary, summary

GOLDEN = Path(__file__).parent / "golden" / "digits_summary.txt"


def digits() -> DigitsCNN:
    return DigitsCNN(generator=torch.Generator().manual_seed(0))


def first_calls(s: Summary) -> dict[str, tuple[int, tuple[tuple[int, ...], ...]]]:
    return {r.name: (r.params, r.output_shapes) for r in s.rows if r.call == 1}


def hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_digits_table_matches_golden_file() -> None:
    assert str(summary(digits(), (1, 28, 28))) == GOLDEN.read_text()


def test_digits_numbers_are_the_keras_numbers() -> None:
    # Keras mnist_cnn.py: conv 26x26x32 (320), conv 24x24x64 (18,496), pool 12x12x64, flatten 9,216,
    # dense 128 (1,179,776), dense 10 (1,290), 1,199,882 in all.
    s = summary(digits(), (1, 1, 28, 28))
    rows = first_calls(s)
    assert rows["conv1"] == (3 * 3 * 1 * 32 + 32, ((1, 32, 26, 26),))
    assert rows["conv2"] == (3 * 3 * 32 * 64 + 64, ((1, 64, 24, 24),))
    assert rows["pool"] == (0, ((1, 64, 12, 12),))
    assert rows["flatten"] == (0, ((1, 9216),))
    assert rows["fc1"] == (9216 * 128 + 128, ((1, 128),))
    assert rows["fc2"] == (128 * 10 + 10, ((1, 10),))
    assert [r.name for r in s.rows] == [n for n, _ in digits().named_children()]
    assert s.total_params == s.trainable_params == 1_199_882 and s.non_trainable_params == 0
    assert s.size_bytes == 1_199_882 * 4 and s.unused_params == 0


def test_resnet_reused_relu_gets_a_row_per_call_and_totals_are_right() -> None:
    model = torchvision.models.resnet18()  # random weights; 1000 classes
    s = summary(model, (3, 32, 32))
    assert s.total_params == 11_689_512
    blocks = [n for n, m in model.named_modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    for block in blocks:
        assert [r.call for r in s.rows if r.name == f"{block}.relu"] == [1, 2]
    assert [r.call for r in s.rows if r.name == "relu"] == [1]  # the stem's own ReLU: one call
    assert sum(r.params for r in s.rows if r.call == 1) == s.total_params
    assert first_calls(s)["layer4.1.bn2"][1] == ((1, 512, 1, 1),)
    assert first_calls(s)["fc"] == (512 * 1000 + 1000, ((1, 1000),))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # float32 weights, plus per BatchNorm two float32 running stats and one int64 counter.
    assert s.size_bytes == 4 * s.total_params + sum(2 * 4 * bn.num_features + 8 for bn in bns)


class Branches(nn.Module):
    """Two branches, one of them calling a shared conv twice, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(2, 2, 3, padding=1)
        self.side = nn.Conv2d(2, 3, 1, bias=False)
        self.head = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = self.shared(self.shared(x))
        b = self.side(x)
        return self.head(torch.cat([a, b], dim=1).flatten(1))


def test_branches_and_shared_module() -> None:
    model = Branches()
    s = summary(model, (2, 4, 4))
    assert [(r.name, r.call, r.output_shapes) for r in s.rows] == [
        ("shared", 1, ((1, 2, 4, 4),)),
        ("shared", 2, ((1, 2, 4, 4),)),
        ("side", 1, ((1, 3, 4, 4),)),
        ("head", 1, ((1, 3),)),
    ]
    assert s.total_params == (2 * 2 * 9 + 2) + 2 * 3 + (80 * 3 + 3)
    lines = str(s).splitlines()
    assert "shared #2 (Conv2d)" in lines[4] and lines[4].endswith("(shared)  -")
    assert "shared (Conv2d)" in lines[3] and lines[3].endswith("38  yes")


def test_container_with_own_parameters_and_tuple_outputs() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))
            self.lstm = nn.LSTM(4, 6)

        def forward(self, x: Tensor) -> Tensor:
            out, _ = self.lstm(x * self.scale)
            return out

    s = summary(Tokens(), torch.zeros(5, 2, 4))
    assert [(r.label, r.output_shapes) for r in s.rows] == [
        ("(model)", ((5, 2, 6),)),
        ("lstm", ((5, 2, 6), (1, 2, 6), (1, 2, 6))),
    ]
    assert s.rows[0].params == 4 and s.total_params == 4 + 4 * (6 * 4 + 6 * 6 + 2 * 6)
    assert "[5, 2, 6], [1, 2, 6], [1, 2, 6]" in str(s)


def test_trainable_columns_and_unused_modules() -> None:
    class Runner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))
            self.spare = nn.Linear(3, 3)  # registered, never called

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

    model = Runner()
    model.net[0].weight.requires_grad_(False)
    model.net[2].requires_grad_(False)
    s = summary(model, (1, 3, 3))
    assert [(r.name, r.trainable_text) for r in s.rows] == [
        ("net.0", "partly"), ("net.1", "-"), ("net.2", "no")
    ]
    assert s.total_params == 20 + 9 + 12 and s.trainable_params == 2 + 12
    assert s.unused_params == 12
    assert str(s).splitlines()[-1] == "Params in modules that did not run: 12"


def test_modes_hooks_rng_restored() -> None:
    model = digits()
    model.train()
    model.conv2.eval()
    seen: list[int] = []
    model.fc1.register_forward_hook(lambda m, i, o: seen.append(1))
    before, rng = hook_counts(model), torch.get_rng_state()
    summary(model, (1, 28, 28))
    assert seen == [1]  # the user's hook ran and stays
    assert hook_counts(model) == before
    assert [m.training for m in model.modules()] == [m is not model.conv2 for m in model.modules()]
    assert torch.equal(torch.get_rng_state(), rng)


def test_forward_error_names_where_it_stopped_and_cleans_up() -> None:
    model = digits()
    model.train()
    before = hook_counts(model)
    with pytest.raises(RuntimeError) as info:
        summary(model, (1, 30, 30))
    message = str(info.value)
    assert "in layer 'fc1' (Linear) after 7 layer calls" in message
    assert "flatten [1, 10816]" in message and "mat1 and mat2" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert hook_counts(model) == before and all(m.training for m in model.modules())


def test_error_between_layers_says_so() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x).view(7, -1)

    with pytest.raises(RuntimeError, match=r"failed after 1 layer calls \(last: conv \[1, 1, 2, 2\]\)"):
        summary(Broken(), (1, 2, 2))


def test_example_input() -> None:
    model = nn.Conv2d(1, 1, 1).double()
    x = example_input(model, (1, 5, 6))
    assert x.shape == (1, 1, 5, 6) and x.dtype == torch.float64
    expected = torch.randn(1, 1, 5, 6, generator=torch.Generator().manual_seed(0)).double()
    assert torch.equal(x, expected)
    assert example_input(model, (2, 1, 5, 6)).shape == (2, 1, 5, 6)
    t = torch.zeros(1, 1, 2, 2)
    assert example_input(model, t) is t
    s = summary(model, (1, 5, 6))
    assert [r.label for r in s.rows] == ["(model)"] and s.size_bytes == 2 * 8
    with pytest.raises(ValueError, match="positive sizes"):
        example_input(model, (1, 0, 5))


@pytest.mark.filterwarnings("ignore:html5lib's sanitizer is deprecated:DeprecationWarning")
def test_markdown_and_tensorboard_text(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.text.text_plugin import text_array_to_html
    from torch.utils.tensorboard import SummaryWriter

    s = summary(digits(), (1, 28, 28))
    md = s.to_markdown()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(s.rows)
    assert "| `fc1` | Linear | [1, 128] | 1,179,776 | yes |" in table
    assert "- Total params: 1,199,882" in md
    with SummaryWriter(str(tmp_path)) as writer:
        log_summary(writer, s, tag="model", step=3)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    (event,) = acc.Tensors("model/text_summary")
    assert event.step == 3
    assert event.tensor_proto.string_val[0].decode() == md
    # What TensorBoard's text tab shows: an HTML table, a row per layer call plus the header.
    html = text_array_to_html(np.array(md.encode()), True)
    assert html.count("<tr>") == 1 + len(s.rows) and "<td><code>fc1</code></td>" in html


def test_half_precision_model_gets_a_matching_input() -> None:
    s = summary(digits().to(torch.bfloat16), (1, 28, 28))
    assert s.size_bytes == 2 * 1_199_882 and first_calls(s)["fc2"][1] == ((1, 10),)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_gets_a_cuda_input() -> None:
    model = digits().cuda()
    assert example_input(model, (1, 28, 28)).device.type == "cuda"
    assert str(summary(model, (1, 28, 28))) == GOLDEN.read_text()
