"""Name -> implementation registries for pruning methods and sparsity profiles.

The bottom of the package: it imports nothing of ours, so `config` can check a method's name and options while the
methods themselves (`optimum_gblm.methods`) depend on `config`, never the other way round. A method registers itself
with one line, `@register_method("name")`, when its module is imported (`import optimum_gblm` imports them all).

A registered class declares:
    needs_activations / needs_gradients   what the engine must collect for it (bool class attributes)
    Options                               a dataclass of its own settings (fields with `metadata={"help": ...}`), or
                                          None; `GBLMConfig.method_options` holds one, and the CLI, the example
                                          scripts and the model card's reproduce line are generated from its fields
    check_config(config)                  a classmethod refusing recipes it cannot run (optional)
    help                                  one line for `--help` and the docs
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

METHODS: dict[str, Any] = {}
PROFILES: dict[str, Any] = {}


def _register(table: dict[str, Any], what: str, name: str) -> Callable[[T], T]:
    def decorator(cls: T) -> T:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a {what} name must be a Python identifier such as 'my_method', got {name!r}.")
        if name in table and table[name] is not cls:
            raise ValueError(f"a {what} named {name!r} is already registered ({table[name].__name__}).")
        table[name] = cls
        cls.name = name
        return cls

    return decorator


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: make a `methods.base.PruningMethod` subclass available as `GBLMConfig(method=name)`."""
    return _register(METHODS, "pruning method", name)


def register_profile(name: str) -> Callable[[T], T]:
    """Class decorator: make a `methods.base.SparsityProfile` available as `GBLMConfig(sparsity_profile=name)`."""
    return _register(PROFILES, "sparsity profile", name)


def get_method(name: str) -> Any:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method {name!r} is unknown: choose one of {sorted(METHODS)}.") from None


def get_profile(name: str) -> Any:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"sparsity_profile {name!r} is unknown: choose one of {sorted(PROFILES)}.") from None
