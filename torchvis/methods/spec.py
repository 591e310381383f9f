"""One description per attribution method, and the registry every consumer reads.

A :class:`MethodSpec` says what a method is: its public function, the pass it needs, whether it
takes a layer, how its maps are drawn and titled, and whether it must see inside the model (module
hooks or the ReLU function mode). ``explain``, ``log_attributions``, the ``Monitor``, the Lightning
callback, the figure, ``torchvis explain`` and the tests read this one table; adding a method is one
call to :func:`register` next to its function.

Methods that read a shared pass (``Need.INPUT_GRADIENT``, ``Need.LAYER_GRADIENT``, ``Need.GUIDED``)
also give ``from_pass``: a function of the pass's tensors (:class:`torchvis.core.passes.Shared`) and the
method's options,
so that :func:`torchvis.explain` runs each pass once for all of them — every CAM variant at every
requested layer shares one forward and one backward with saliency.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import Tensor

from torchvis.core.passes import Shared

__all__ = [
    "METHODS",
    "SPECS",
    "Look",
    "MethodSpec",
    "Need",
    "Shared",
    "register",
    "spec_of",
    "unregister",
]


class Look(Enum):
    """How a raw map becomes a picture (:func:`torchvis.rendering.image.render_map` draws each).

    Gradients (saliency) are signed, so they get the diverging map (white = 0, red = evidence for the
    class, blue = against) on their own; guided backprop keeps its colour channels on mid-grey;
    Grad-CAM is non-negative and coarse, so it gets the sequential map blended over the input; the
    occlusion score drop is signed (hiding a patch can raise the score), blended over the input.
    """

    SIGNED = "signed"  # diverging map alone, zero exactly white
    SIGNED_OVERLAY = "signed_overlay"  # diverging map blended over the input
    HEAT_OVERLAY = "heat_overlay"  # magnitude, sequential map blended over the input
    RGB = "rgb"  # channels kept, zero mid-grey (SIGNED for one-channel inputs)


class Need(Enum):
    """What a method reads. :func:`torchvis.explain` runs each shared pass once for every method."""

    INPUT_GRADIENT = "input gradient"  # the plain forward + backward, gradient at the input
    LAYER_GRADIENT = "layer gradient"  # the same pass, activation and gradient at each layer
    GUIDED = "guided"  # a forward under the guided ReLU rule, gradient at the input
    PERTURBATION = "perturbation"  # forward passes of changed inputs only (runs itself)
    OWN = "own"  # anything else: the function runs itself

    @property
    def shared(self) -> bool:
        return self in (Need.INPUT_GRADIENT, Need.LAYER_GRADIENT, Need.GUIDED)


FromPass = Callable[..., Any]  # returns a Tensor, or a tuple of them (one per input)


@dataclass(frozen=True)
class MethodSpec:
    """Everything torchvis needs to know about a method. Build it with :func:`register`."""

    name: str
    function: Callable[..., Tensor]
    needs: frozenset[Need]
    from_pass: FromPass | None
    takes_layer: bool
    look: Look
    title: str
    needs_hooks: bool
    options: tuple[str, ...] = field(default=())  # keyword options of ``function`` a caller may set
    wraps: str | None = None  # the option naming a method this one runs (SmoothGrad's ``method``)
    wraps_default: Any = None  # that option's default

    @property
    def parameters(self) -> tuple[str, ...]:
        """The names of ``function``'s parameters."""
        return tuple(inspect.signature(self.function).parameters)

    @property
    def shared(self) -> bool:
        """Whether :func:`torchvis.explain` computes it from the shared passes."""
        return self.from_pass is not None

    def wrapped(self, options: Mapping[str, Any]) -> MethodSpec | None:
        """The spec of the method this one runs when called with ``options`` (:attr:`wraps`, e.g.
        SmoothGrad's ``method``); ``None`` for a method that wraps none."""
        if self.wraps is None:
            return None
        return spec_of(options.get(self.wraps, self.wraps_default))

    def takes_layer_with(self, options: Mapping[str, Any]) -> bool:
        """Whether the method, called with ``options``, takes a layer: its signature names ``layer``,
        or the method it wraps does (SmoothGrad of Grad-CAM)."""
        wrapped = self.wrapped(options)
        return self.takes_layer or (wrapped is not None and wrapped.takes_layer)

    def options_with(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The options the method takes when called with ``options``: its own, and those of the method
        it wraps, which it passes on (SmoothGrad of Grad-CAM takes ``relu``, ``reshape``, ...)."""
        wrapped = self.wrapped(options)
        return self.options if wrapped is None else self.options + wrapped.options

    @property
    def layer_required(self) -> bool:
        """Whether ``function`` has a ``layer`` parameter without a default."""
        param = inspect.signature(self.function).parameters.get("layer")
        return param is not None and param.default is param.empty

    @property
    def required_options(self) -> tuple[str, ...]:
        """Keyword-only options without a default (``layer`` aside): e.g. occlusion's ``window``."""
        params = inspect.signature(self.function).parameters
        return tuple(name for name in self.options if params[name].default is params[name].empty)


# Arguments every method takes that are not options of its own.
_COMMON = ("model", "x", "target", "layer", "eval_mode", "forward_args", "forward_kwargs")

_SPECS: dict[str, MethodSpec] = {}


def register(
    name: str,
    function: Callable[..., Any],
    *,
    needs: Need | frozenset[Need] | set[Need] = Need.OWN,
    from_pass: FromPass | None = None,
    look: Look = Look.SIGNED,
    title: str | None = None,
    needs_hooks: bool | None = None,
    replace: bool = False,
    wraps: str | None = None,
) -> MethodSpec:
    """Register ``function`` ``(model, x, target=None, *, [layer], **options) -> Tensor`` as ``name``.

    ``needs``: the pass(es) it reads; a method that needs a shared pass gives ``from_pass(shared:
    Shared, **options) -> Tensor``, taking the same options as ``function``. A method takes a layer
    when its signature names ``layer``; ``explain`` then gives it each requested layer. ``look`` and
    ``title`` say how figures and TensorBoard draw and label its maps; ``needs_hooks`` (default: it
    takes a layer or needs a layer or guided pass) whether it must see inside the model, so it cannot
    run on TorchScript or a plain function. ``wraps`` names the option (with a default) by which the
    method is told another method to run, as SmoothGrad's ``method``: ``explain`` then gives it each
    requested layer when that method takes one (passed on in its ``**options``).
    Returns the spec; ``torchvis.METHODS[name]`` is then ``function``.
    """
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"a method name is a non-empty string without '/'; got {name!r}")
    if name in _SPECS and not replace:
        raise ValueError(f"a method {name!r} is already registered; pass replace=True to replace it")
    if not callable(function):
        raise TypeError(f"function must be callable; got {type(function).__name__}")
    wanted = frozenset({needs} if isinstance(needs, Need) else needs)
    if not wanted or not all(isinstance(n, Need) for n in wanted):
        raise TypeError(f"needs must be a Need or a set of Needs; got {needs!r}")
    shared = any(n.shared for n in wanted)
    if shared and from_pass is None:
        raise TypeError(f"method {name!r} needs a shared pass, so give from_pass(shared, **options)")
    if not shared and from_pass is not None:
        raise TypeError(f"from_pass is for methods that need a shared pass; {name!r} needs {set(wanted)}")
    params = inspect.signature(function).parameters
    options = tuple(p for p, spec in params.items() if spec.kind is spec.KEYWORD_ONLY and p not in _COMMON)
    if from_pass is not None:
        missing = [o for o in options if o not in inspect.signature(from_pass).parameters]
        if missing:
            raise TypeError(f"from_pass of {name!r} must take the options of its function too: {missing}")
    takes_layer = "layer" in params
    if wraps is not None and (wraps not in params or params[wraps].default is params[wraps].empty):
        raise TypeError(f"wraps={wraps!r}: {name!r} must take that option, with a default method")
    spec = MethodSpec(
        name=name,
        function=function,
        needs=wanted,
        from_pass=from_pass,
        takes_layer=takes_layer,
        look=look,
        title=title or name.replace("_", " "),
        needs_hooks=sees_inside(wanted, takes_layer) if needs_hooks is None else needs_hooks,
        options=options,
        wraps=wraps,
        wraps_default=None if wraps is None else params[wraps].default,
    )
    _SPECS[name] = spec
    return spec


def sees_inside(needs: frozenset[Need], takes_layer: bool) -> bool:
    """Whether a method needs module hooks or the ReLU function mode: a layer, or a guided pass."""
    return takes_layer or bool(needs & {Need.LAYER_GRADIENT, Need.GUIDED})


def extra_arguments(spec: MethodSpec, forward_args: Any, forward_kwargs: Any) -> dict[str, Any]:
    """The ``forward_args``/``forward_kwargs`` given (not ``None``), to pass on to ``spec``'s function;
    a method whose function takes neither cannot run a model that needs them: ``TypeError``."""
    extra = {key: value for key, value in (("forward_args", forward_args), ("forward_kwargs", forward_kwargs))
             if value is not None}
    refused = [key for key in extra if key not in spec.parameters]
    if refused:
        raise TypeError(f"method {spec.name!r} takes no {' or '.join(refused)}; it cannot run this model")
    return extra


def unregister(name: str) -> MethodSpec:
    """Remove a registered method; returns its spec (so it can be registered again)."""
    if name not in _SPECS:
        raise KeyError(f"no method {name!r} is registered")
    return _SPECS.pop(name)


def spec_of(method: str | Callable[..., Tensor] | MethodSpec) -> MethodSpec:
    """The spec of a method given by name, by function, or as a spec.

    An unregistered function is described from its signature: its own pass, a layer if it names
    ``layer``, the signed look, its ``__name__`` as name and title. An unknown name is an error that
    lists the close matches.
    """
    if isinstance(method, MethodSpec):
        return method
    if isinstance(method, str):
        if method in _SPECS:
            return _SPECS[method]
        close = difflib.get_close_matches(method, list(_SPECS), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown method {method!r}{hint}; known: {', '.join(_SPECS)}")
    if not callable(method):
        raise TypeError(f"a method is a name or a function, not {type(method).__name__}")
    for spec in _SPECS.values():
        if spec.function is method:
            return spec
    name = getattr(method, "__name__", type(method).__name__)
    params = inspect.signature(method).parameters
    return MethodSpec(
        name=name, function=method, needs=frozenset({Need.OWN}), from_pass=None,
        takes_layer="layer" in params, look=Look.SIGNED, title=name.replace("_", " "),
        needs_hooks=sees_inside(frozenset({Need.OWN}), "layer" in params),
        options=tuple(p for p, s in params.items() if s.kind is s.KEYWORD_ONLY and p not in _COMMON),
    )


class _Registry(Mapping[str, Any]):
    """A read-only view of the registry by name; ``attribute`` picks what each name maps to."""

    def __init__(self, attribute: str | None) -> None:
        self._attribute = attribute

    def __getitem__(self, name: str) -> Any:
        spec = spec_of(name) if isinstance(name, str) else _SPECS[name]
        return spec if self._attribute is None else getattr(spec, self._attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(list(_SPECS))

    def __len__(self) -> int:
        return len(_SPECS)

    def __contains__(self, name: object) -> bool:
        return name in _SPECS

    def __setitem__(self, name: str, value: Any) -> None:
        raise TypeError(
            f"the method registry is read-only; use torchvis.register({name!r}, function, ...) "
            "to add a method"
        )

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{n!r}: {self[n]!r}' for n in self)}}}"


METHODS: Mapping[str, Callable[..., Tensor]] = _Registry("function")
"""Registered methods by name -> function, in registration order (read-only; see :func:`register`)."""

SPECS: Mapping[str, MethodSpec] = _Registry(None)
"""Registered methods by name -> :class:`MethodSpec`, in registration order."""
