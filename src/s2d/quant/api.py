"""The PTQ method registry and its entry point, :func:`quantize_model` (torchao's ``quantize_`` style).

Every method registers a handler together with its config dataclass::

    @register_method("repq", RepQConfig)
    def repq(model, spec, calib, config, progress) -> None: ...

and is then selected by name or by an instance of its config type::

    quantize_model(model, QuantConfig(w_bits=4, a_bits=4), method="repq", calib=batches)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4), method=RepQConfig(max_tokens=4096), calib=batches)

The built-in methods (``s2d.quant.ptq``: rtn, ptq4vit, repq, erq) register when ``s2d.quant`` is imported.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from s2d.quant.config import QuantConfig
from s2d.quant.prepare import prepare_model

__all__ = ["MethodFn", "CheckFn", "register_method", "available_methods", "method_config_class", "method_config",
           "check_method", "quantize_model"]

MethodFn = Callable[[nn.Module, QuantConfig, list[dict] | None, object, bool], None]
"""A PTQ method: ``fn(model, spec, calib, config, progress)``; ``model`` is already prepared."""
CheckFn = Callable[[nn.Module, object], None]
"""A method's pre-flight: ``check(model, config)`` raises a one-line ValueError for a model it cannot quantize."""


@dataclass(frozen=True)
class _Method:
    name: str          # registry key, e.g. "repq"
    config_cls: type   # the method's config dataclass
    fn: MethodFn       # the handler
    check: CheckFn | None = None   # pre-flight on the float model (None: any model with its blocks)


_BY_NAME: dict[str, _Method] = {}
_BY_CONFIG: dict[type, _Method] = {}


def register_method(name: str, config_cls: type, check: CheckFn | None = None) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering a PTQ method ``fn(model, spec, calib, config, progress) -> None`` under
    ``name``, with ``config_cls`` (a dataclass whose no-argument instance is the default config) and an
    optional pre-flight ``check(model, config)`` (see :func:`check_method`).

    The method receives a model already passed through :func:`prepare_model`, the calibration batches
    as a list (or None), always an instance of ``config_cls``, and must leave every quantizer it uses
    calibrated. Registering a name again replaces it; a config type belongs to one method only.
    """
    def deco(fn: MethodFn) -> MethodFn:
        other = _BY_CONFIG.get(config_cls)
        if other is not None and other.name != name:
            raise ValueError(f"register_method: {config_cls.__name__} already configures method {other.name!r}")
        old = _BY_NAME.get(name)
        if old is not None:
            _BY_CONFIG.pop(old.config_cls, None)
        entry = _Method(name, config_cls, fn, check)
        _BY_NAME[name] = entry
        _BY_CONFIG[config_cls] = entry
        return fn
    return deco


def available_methods() -> list[str]:
    """Names of the registered PTQ methods, sorted."""
    return sorted(_BY_NAME)


def _method(name: str) -> _Method:
    if name not in _BY_NAME:
        raise ValueError(f"quantize_model.method must be one of {available_methods()}, got {name!r}")
    return _BY_NAME[name]


def method_config_class(name: str) -> type:
    """The config dataclass of the registered method ``name`` (ValueError for an unknown name)."""
    return _method(name).config_cls


def method_config(name: str, overrides: dict[str, object]) -> object:
    """The config of method ``name``: its defaults with ``overrides`` (field -> value) applied.

    ValueError for an unknown method or field; the config's own validation applies to the values.
    """
    cls = method_config_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {unknown[0]!r}; fields: {', '.join(sorted(known)) or 'none'}")
    return cls(**overrides)


def check_method(model: nn.Module, name: str, config: object | None = None) -> None:
    """Raise the method's one-line ValueError if it cannot quantize ``model`` with ``config`` (default:
    its default config), before any calibration: `s2d run` calls it before it trains anything."""
    entry = _method(name)
    if entry.check is not None:
        entry.check(model, config if config is not None else entry.config_cls())


def quantize_model(model: nn.Module, spec: QuantConfig, method: str | object = "rtn",
                   calib: Iterable[dict] | None = None, config: object | None = None,
                   progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place with a PTQ method and return it in eval mode (keep a deepcopy for float).

    method: a registered name (then ``config``, default the method's default config, configures it) or
    an instance of a registered config type (then that method with that config; ``config`` must be
    None). calib: model-input dicts (materialised into a list: methods may make several passes).
    """
    if isinstance(method, str):
        entry = _method(method)
        if config is None:
            config = entry.config_cls()
    else:
        entry = _BY_CONFIG.get(type(method))
        if entry is None:
            raise ValueError(f"quantize_model.method must be one of {available_methods()} or an instance of "
                             f"their config classes, got {method!r}")
        if config is not None:
            raise ValueError("quantize_model: pass the method's config either as method= or as config=, not both")
        config = method
    if not isinstance(config, entry.config_cls):
        raise TypeError(f"quantize_model: method {entry.name!r} takes a {entry.config_cls.__name__}, "
                        f"got {type(config).__name__}")
    if entry.check is not None:          # the method's pre-flight, before the model is touched
        entry.check(model, config)
    if calib is not None and not isinstance(calib, (list, tuple)):
        calib = list(calib)
    prepare_model(model, spec)
    entry.fn(model, spec, calib, config, progress)
    return model.eval()
