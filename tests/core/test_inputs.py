"""What a model is called with (torchvis.core.inputs): the checks on x and the extra arguments, the
batch rule for per-example and shared arguments, and taking rows for an enlarged batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torchvis
from torchvis.core.inputs import Inputs, as_inputs, check_model, check_module


def ramp(*shape: int) -> Tensor:
    return torch.arange(float(torch.Size(shape).numel()), dtype=torch.float64).reshape(shape)


def test_one_tensor_and_a_tuple_keep_their_structure() -> None:
    x, meta = ramp(3, 2, 5), ramp(3, 4)
    one = as_inputs(x)
    assert one.tensors == (x,) and not one.was_tuple and one.batch == 3 and one.first is x
    assert one.pack([x + 1]) is not None and isinstance(one.pack([x + 1]), Tensor)
    both = as_inputs((x, meta))
    assert both.was_tuple and both.tensors == (x, meta)
    assert both.pack([x, meta]) == (x, meta)
    assert as_inputs((x,)).pack([x]) == (x,)  # a tuple of one stays a tuple
    with pytest.raises(AssertionError, match="1 maps for 2 inputs"):
        both.pack([x])


def test_forward_args_and_kwargs_go_after_the_tensors() -> None:
    seen: list[Any] = []

    def model(*args: Any, **kwargs: Any) -> Tensor:
        seen.append((args, kwargs))
        return args[0].sum(dim=1, keepdim=True)

    x, mask = ramp(2, 3), torch.ones(2, 3)
    inputs = as_inputs(x, (mask, 7), {"flag": True})
    inputs.call(model)
    (args, kwargs), = seen
    assert args[0] is x and args[1] is mask and args[2] == 7 and kwargs == {"flag": True}
    assert as_inputs(x, mask).forward_args == (mask,)  # one argument that is not a tuple
    assert as_inputs(x, None, None).forward_args == () and as_inputs(x).forward_kwargs == {}


def test_take_expands_per_example_arguments_and_keeps_shared_ones() -> None:
    x = ramp(3, 2)
    per_example = torch.tensor([10.0, 20.0, 30.0])
    shared_row, scalar = torch.tensor([[1.0, 2.0]]), torch.tensor(5.0)
    inputs = as_inputs(x, (per_example, shared_row, scalar, "text"), {"lengths": torch.tensor([1, 2, 3])})
    rows = torch.tensor([2, 0, 0, 1, 2])
    taken = inputs.take(rows)
    assert torch.equal(taken.tensors[0], x[rows])
    assert torch.equal(taken.forward_args[0], per_example[rows])
    assert taken.forward_args[1] is shared_row and taken.forward_args[2] is scalar
    assert taken.forward_args[3] == "text"
    assert torch.equal(taken.forward_kwargs["lengths"], torch.tensor([3, 1, 1, 2, 3]))
    other = [torch.zeros(5, 2)]
    assert inputs.take(rows, other).tensors[0] is other[0]
    # A call with rows takes the same rows.
    got = inputs.call(lambda t, a, *rest, lengths: a * 1, [x[rows]], rows)
    assert torch.equal(got, per_example[rows])


def test_with_one_example_a_first_dimension_of_one_is_per_example() -> None:
    x, mask = ramp(1, 4), torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    taken = as_inputs(x, (mask,)).take(torch.tensor([0, 0, 0]))
    assert torch.equal(taken.forward_args[0], mask.expand(3, 4))


@pytest.mark.parametrize(
    "x, error, match",
    [
        ((ramp(2, 3), ramp(3, 3)), ValueError, r"share the batch size B; got \[2, 3\]"),
        ([ramp(2, 3)], TypeError, "tuple of tensors, not a list"),
        ((), ValueError, "empty tuple"),
        ((ramp(2, 3), "meta"), TypeError, r"x\[1\] must be a torch.Tensor"),
        (ramp(2, 3).long(), ValueError, "floating"),
        ((ramp(2, 3), ramp(2).long()), ValueError, r"x\[1\] must be a floating tensor"),
        (torch.tensor(1.0), ValueError, "0-d tensor"),
        (ramp(0, 3), ValueError, "empty batch"),
    ],
    ids=["batches", "list", "empty-tuple", "not-a-tensor", "long", "long-in-tuple", "0-d", "empty-batch"],
)
def test_bad_x(x: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        as_inputs(x)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.ones(3, 4),), None, r"forward_args\[0\] has shape \[3, 4\].*B=2"),
        ((1, torch.ones(5)), None, r"forward_args\[1\] has shape \[5\]"),
        (None, {"mask": torch.ones(4, 1)}, r"forward_kwargs\['mask'\] has shape \[4, 1\]"),
    ],
)
def test_forward_argument_whose_batch_is_neither_b_nor_shared(args: Any, kwargs: Any, match: str) -> None:
    calls = []

    def model(x: Tensor, *rest: Any, **named: Any) -> Tensor:
        calls.append(1)
        return x

    for method in ("saliency", "gradient_x_input", "integrated_gradients", "smoothgrad", "vargrad"):
        with pytest.raises(ValueError, match=match):
            torchvis.METHODS[method](model, ramp(2, 3), forward_args=args, forward_kwargs=kwargs)
    assert calls == []  # refused before any work


def test_forward_kwargs_must_be_a_mapping_and_inputs_not_given_twice() -> None:
    with pytest.raises(TypeError, match="forward_kwargs must be a dict"):
        as_inputs(ramp(2, 3), None, [("a", 1)])  # type: ignore[arg-type]
    inputs = as_inputs(ramp(2, 3))
    assert as_inputs(inputs) is inputs
    with pytest.raises(TypeError, match="either in the Inputs or as arguments"):
        as_inputs(inputs, (1,))


def test_inputs_on_different_devices_are_refused() -> None:
    meta = torch.ones(2, 3, device="meta")
    with pytest.raises(ValueError, match="different devices"):
        as_inputs((ramp(2, 3), meta))


def test_model_checks() -> None:
    check_model(lambda x: x)
    with pytest.raises(TypeError, match="nn.Module or a callable, not int"):
        check_model(3)
    module = nn.Linear(2, 2)
    assert check_module(module, "grad_cam") is module
    with pytest.raises(TypeError, match=r"grad_cam needs an nn.Module .*plain function.*saliency"):
        check_module(lambda x: x, "grad_cam")


def test_inputs_is_frozen() -> None:
    inputs = Inputs((ramp(2, 3),))
    with pytest.raises(AttributeError):
        inputs.was_tuple = True  # type: ignore[misc]


class Counting(nn.Module):
    """An image model that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.calls = 0

    def forward(self, x: Tensor, *rest: Any) -> Tensor:
        self.calls += 1
        return self.head(self.conv(x))


@pytest.mark.parametrize("name", [n for n in torchvis.METHODS if n not in ("occlusion", "score_cam")])
@pytest.mark.parametrize(
    "x, extra, error, match",
    [
        ((ramp(2, 3, 6, 6), ramp(3, 5)), {}, ValueError, r"share the batch size B; got \[2, 3\]"),
        ([ramp(2, 3, 6, 6)], {}, TypeError, "tuple of tensors, not a list"),
        (ramp(2, 3, 6, 6), {"forward_args": (torch.ones(3, 5),)}, ValueError, r"forward_args\[0\] has shape"),
    ],
    ids=["batches", "list", "forward-arg-batch"],
)
def test_bad_input_is_refused_before_the_model_runs(
    name: str, x: Any, extra: dict[str, Any], error: type[Exception], match: str
) -> None:
    from conftest import options_for

    model = Counting().double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        torchvis.METHODS[name](model, x, **options_for(name, layer="conv"), **extra)
    assert model.calls == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_explain_refuses_a_plain_function_for_guided_backprop_before_any_pass() -> None:
    calls: list[int] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x.flatten(1)[:, :3]

    with pytest.raises(TypeError, match="guided backprop needs an nn.Module"):
        torchvis.explain(model, torch.rand(2, 4), methods=["saliency", "guided_backprop"])
    assert calls == []


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, x: torchvis.grad_cam(m, x, 0, layer="conv", upsample="bicubic"), "upsample must be"),
        (lambda m, x: torchvis.layer_cam(m, x, 0, layer="conv", upsample="cubic"), "upsample must be"),
        (lambda m, x: torchvis.guided_grad_cam(m, x, 0, layer="conv", upsample=None),
         "upsample cannot be None"),
        (lambda m, x: torchvis.explain(m, x, methods=["saliency", "grad_cam"], layer="conv",
                                       upsample="bicubic"), "upsample must be"),
        (lambda m, x: torchvis.explain(m, x, methods=["grad_cam", "guided_grad_cam"], layer="conv",
                                       upsample=None), "upsample cannot be None"),
        (lambda m, x: torchvis.explain(m, x, methods=["saliency", "smoothgrad"], method="grad_cam",
                                       layer="conv", upsample="bicubic"), "upsample must be"),
        (lambda m, x: torchvis.explain(m, x, methods=["saliency", "vargrad"], method="guided_grad_cam",
                                       layer="conv", upsample=None), "upsample cannot be None"),
        (lambda m, x: torchvis.smoothgrad(m, x, method="grad_cam", layer="conv", upsample="bicubic"),
         "upsample must be"),
        # Score-CAM runs its own passes: its unknown layer is found before saliency's shared pass runs.
        (lambda m, x: torchvis.explain(m, x, methods=["saliency", "score_cam"], layer="nope"),
         "unknown layer 'nope'"),
        (lambda m, x: torchvis.explain(m, x, methods=["grad_cam", "score_cam"], layer=["conv", "nope"]),
         "unknown layer 'nope'"),
        (lambda m, x: torchvis.grad_cam(m, x, 0, layer="conv", reshape="tokens"), "reshape must be"),
        (lambda m, x: torchvis.hires_cam(m, x, 0, layer="conv", reshape="tokens"), "reshape must be"),
        (lambda m, x: torchvis.guided_grad_cam(m, x, 0, layer="conv", reshape="tokens"), "reshape must be"),
        (lambda m, x: torchvis.explain(m, x, methods=["saliency", "grad_cam"], layer="conv",
                                       reshape="tokens"), "reshape must be"),
        (lambda m, x: torchvis.score_cam(m, x, 0, layer="conv", reshape="tokens"), "reshape must be"),
        (lambda m, x: torchvis.smoothgrad(m, x, method="grad_cam", layer="conv", reshape="tokens"),
         "reshape must be"),
        (lambda m, x: torchvis.vargrad(m, x, method="grad_cam", layer="conv", reshape="tokens"),
         "reshape must be"),
    ],
    ids=["grad_cam", "layer_cam", "guided_grad_cam", "explain-upsample", "explain-guided-upsample",
         "explain-smoothgrad-upsample", "explain-vargrad-guided-upsample", "smoothgrad-upsample",
         "explain-own-pass-layer", "explain-layer-list", "grad_cam-reshape", "hires_cam-reshape",
         "guided_grad_cam-reshape", "explain-reshape", "score_cam-reshape", "smoothgrad-reshape",
         "vargrad-reshape"],
)
def test_bad_layer_options_are_refused_before_the_model_runs(call: Any, match: str) -> None:
    model = Counting().double().eval()
    with pytest.raises(ValueError, match=match):
        call(model, ramp(2, 3, 6, 6))
    assert model.calls == 0
