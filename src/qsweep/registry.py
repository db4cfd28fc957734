"""Plug-in registries: names resolved to modules lazily, with a close-match hint on a typo."""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType

from qsweep.errors import QsweepError


class Registry:
    """Maps a plug-in name to the module that implements it; a third party adds one with `add`."""

    def __init__(self, what: str, modules: dict[str, str]):
        self.what = what
        self.modules = dict(modules)

    def add(self, name: str, module: str) -> None:
        self.modules[name] = module

    def get(self, name: str) -> ModuleType:
        if name not in self.modules:
            near = difflib.get_close_matches(name, self.modules, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise QsweepError(f"unknown {self.what} '{name}'{hint}; known: {', '.join(sorted(self.modules))}")
        return importlib.import_module(self.modules[name])
