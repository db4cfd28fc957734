"""Hydra finds qsweep's named sweeps (`+sweeps=NAME`, files in sweeps/) through this plug-in, which
Hydra discovers in the `hydra_plugins` namespace package: no command-line edit needed."""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class QsweepSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from qsweep.envs import REPO_ROOT

        conf = REPO_ROOT / "conf"
        # Only for qsweep's own configs: other Hydra apps in the same environment are left alone.
        if any(entry.path.rstrip("/").endswith(str(conf)) for entry in search_path.get_path()):
            search_path.append(provider="qsweep", path=f"file://{REPO_ROOT}")
