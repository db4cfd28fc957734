"""Plug-in registries: one per kind (method, engine, benchmark), each plug-in registered once.

A plug-in is a class that implements its kind's contract (`methods/base.py`, `engines/base.py`,
`benchmarks/base.py`) and registers itself with a decorator, `@METHODS.register("gguf")`. That one
registration gives it its name, its config schema (`<group>/<name>_schema` in Hydra's ConfigStore,
see `config.register`), its place in the `benchmark` container and its stage environment.

Built-ins are every module of the packages `qsweep.methods`, `qsweep.engines` and
`qsweep.benchmarks`, imported on first use. Third parties load their modules the same way through
the entry-point group `qsweep.plugins`, or list them in the environment variable QSWEEP_PLUGINS
(comma-separated module names; launcher workers inherit it). The tests register fakes that way.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import os
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Generic, TypeVar, cast, get_args, get_origin

from qsweep.errors import QsweepError

ENTRY_POINT_GROUP = "qsweep.plugins"
MODULES_ENV_VAR = "QSWEEP_PLUGINS"
BUILTIN_PACKAGES = ("qsweep.methods", "qsweep.engines", "qsweep.benchmarks")

P = TypeVar("P")
C = TypeVar("C")  # a plug-in's settings: the dataclass of its schema
_REGISTRIES: list[Registry] = []
_loaded: set[str] = set()


class Plugin(Generic[C]):
    """What the contract of every plug-in kind shares: the name it is registered under and its typed
    settings, the dataclass given as its contract's type argument (`class Perplexity(Benchmark[Config])`),
    which its hooks receive as `cfg: Config`. A class attribute `Config = ...` works too."""

    name: ClassVar[str]  # set by the registration
    Config: ClassVar[type[Any]]  # schema `<group>/<name>_schema`

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in cls.__dict__.get("__orig_bases__", ()):  # this class statement's own bases
            origin, args = get_origin(base), get_args(base)
            if isinstance(origin, type) and issubclass(origin, Plugin) and args and isinstance(args[0], type):
                cls.Config = args[0]


class Registry(Generic[P]):
    """Plug-ins of one kind by name; `get` loads every plug-in module first and suggests a close
    match on a typo."""

    def __init__(self, kind: str, contract: type, group: str):
        self.kind = kind  # "method", as said to users
        self.contract = contract  # the base class every plug-in of this kind subclasses
        self.group = group  # the Hydra config group its options live in
        self._plugins: dict[str, P] = {}
        _REGISTRIES.append(self)

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: `@ENGINES.register("vllm")` registers one instance under `name`."""

        def add(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, self.contract)):
                raise TypeError(f"{cls!r} must subclass {self.contract.__name__} to be a {self.kind}")
            if not isinstance(getattr(cls, "Config", None), type):
                raise TypeError(
                    f"{cls!r} declares no settings: subclass {self.contract.__name__}[<its Config dataclass>]"
                )
            known = self._plugins.get(name)
            if known is not None and type(known).__qualname__ != cls.__qualname__:
                raise ValueError(f"{self.kind} '{name}' is registered twice ({type(known)!r} and {cls!r})")
            cls.name = name  # type: ignore[attr-defined]  # every contract declares it (Plugin)
            self._plugins[name] = cast(P, cls())
            return cls

        return add

    def get(self, name: str) -> P:
        load()
        if name not in self._plugins:
            near = difflib.get_close_matches(name, self._plugins, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise QsweepError(f"unknown {self.kind} '{name}'{hint}; known: {', '.join(self.names())}")
        return self._plugins[name]

    def names(self) -> list[str]:
        load()
        return sorted(self._plugins)

    def items(self) -> Iterator[tuple[str, P]]:
        load()
        return iter(sorted(self._plugins.items()))

    def for_config(self, config_type: type) -> P:
        """The plug-in whose schema `config_type` is (a composed option names it in its defaults)."""
        load()
        for plugin in self._plugins.values():
            if getattr(plugin, "Config", None) is config_type:
                return plugin
        raise QsweepError(
            f"{self.group} settings of type {config_type.__name__} belong to no registered {self.kind}: "
            f"the option's YAML must name a schema in its defaults list, e.g. `- {self.names()[0]}_schema`"
        )


def _import(module: str, source: str) -> None:
    if module in _loaded:
        return
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise QsweepError(f"cannot load qsweep plug-in module '{module}' ({source}): {err}") from None
    _loaded.add(module)


@functools.cache
def _entry_points() -> tuple[tuple[str, str], ...]:
    """Installed distributions' qsweep plug-ins (name, module), read once per process: scanning
    every distribution's metadata costs milliseconds, and every registry lookup loads."""
    return tuple((e.name, e.value) for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def load() -> None:
    """Import every plug-in module once: built-ins, entry points, then $QSWEEP_PLUGINS."""
    for package in BUILTIN_PACKAGES:
        if package not in _loaded:
            path = importlib.import_module(package).__path__
            for info in pkgutil.iter_modules(path):
                _import(f"{package}.{info.name}", "built-in")
            _loaded.add(package)
    for name, module in _entry_points():
        _import(module, f"entry point {name}")
    for module in filter(None, (m.strip() for m in os.environ.get(MODULES_ENV_VAR, "").split(","))):
        _import(module, MODULES_ENV_VAR)


def registries() -> list[Registry]:
    """The registry of every plug-in kind (methods, engines, benchmarks)."""
    load()
    return list(_REGISTRIES)


def all_plugins() -> Iterator:
    """Every registered plug-in of every kind."""
    for registry in registries():
        for _, plugin in registry.items():
            yield plugin
