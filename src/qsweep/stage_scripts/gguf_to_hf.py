"""Turn a GGUF file into a transformers checkpoint (safetensors, tokenizer, chat template).

Runs inside a stage environment with torch + transformers + gguf; imports nothing from qsweep.
Usage: python gguf_to_hf.py GGUF_FILE OUT_DIR --dtype float32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Pre-tokenizers of byte-level BPE vocabularies, by the name llama.cpp records in tokenizer.ggml.pre.
# transformers rebuilds a GGUF tokenizer without them (and with byte_fallback on), which makes
# llama.cpp's converter take it for a SentencePiece vocabulary and tokenises digits differently.
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL],
    },
    "gpt-2": BYTE_LEVEL,
}


def gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    wanted = (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_space_prefix",
    )
    return {k: reader.fields[k].contents() for k in wanted if k in reader.fields}


def sentencepiece_bpe(unigram: dict) -> dict:
    """A BPE model from the pieces and scores transformers put in a Unigram model. llama.cpp's
    SentencePiece vocabularies (tokenizer.ggml.model 'llama': Gemma's) are BPE, a piece's score
    minus its merge rank; read as Unigram scores they split ordinary text into single characters
    (Gemma-3-270M: 6,000 tokens for 6,000 characters where llama.cpp makes 1,541, and a perplexity of
    18,000 instead of 8)."""
    from transformers.convert_slow_tokenizer import generate_merges

    pieces = [(piece, score) for piece, score in unigram["vocab"]]
    vocab = {}
    for index, (piece, _) in enumerate(pieces):
        vocab.setdefault(piece, index)
    merges = generate_merges(vocab, pieces)
    unk = unigram.get("unk_id")
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": pieces[unk][0] if unk is not None else None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": [[left, right] for left, right in merges],
    }


def with_bos(bos_token: str, bos_id: int) -> dict:
    """A post-processor that starts every sequence with BOS, as llama.cpp does for this vocabulary."""
    bos = {"SpecialToken": {"id": bos_token, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos_token: {"id": bos_token, "ids": [bos_id], "tokens": [bos_token]}},
    }


def repair_tokenizer(gguf_file: Path, out_dir: Path) -> None:
    """Make the saved tokenizer match the GGUF's: byte-level BPE with its pre-tokenizer, and the
    GGUF's own special tokens (transformers' rebuild gets eos wrong for SmolLM2)."""
    fields = gguf_fields(gguf_file)
    tok_path, cfg_path = out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    if fields.get("tokenizer.ggml.model") == "gpt2":
        pre = fields.get("tokenizer.ggml.pre", "gpt-2")
        if pre not in PRE_TOKENIZERS:
            print(f"warning: unknown llama.cpp pre-tokenizer '{pre}': using plain ByteLevel", flush=True)
        tok["pre_tokenizer"] = PRE_TOKENIZERS.get(pre, BYTE_LEVEL)
        tok["normalizer"] = None
        tok["decoder"] = {**BYTE_LEVEL, "add_prefix_space": True}
        tok["post_processor"] = {**BYTE_LEVEL, "add_prefix_space": True}
        tok["model"]["byte_fallback"] = False
    id_to_token = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
    spm = fields.get("tokenizer.ggml.model") == "llama"
    if spm and tok["model"]["type"] == "Unigram":
        tok["model"] = sentencepiece_bpe(tok["model"])
        replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        space_prefix = fields.get("tokenizer.ggml.add_space_prefix")
        prepend = [{"type": "Prepend", "prepend": "\u2581"}] if space_prefix else []
        tok["normalizer"] = {"type": "Sequence", "normalizers": [*prepend, replace]}
        tok["pre_tokenizer"] = None
    bos_id = fields.get("tokenizer.ggml.bos_token_id")
    if spm and fields.get("tokenizer.ggml.add_bos_token") and bos_id in id_to_token:
        tok["post_processor"] = with_bos(id_to_token[bos_id], bos_id)
    tok_path.write_text(json.dumps(tok, ensure_ascii=False, indent=1))
    config = json.loads(cfg_path.read_text())
    for name in ("bos", "eos", "unk", "pad"):
        key = (
            f"tokenizer.ggml.{'padding' if name == 'pad' else 'unknown' if name == 'unk' else name}_token_id"
        )
        token_id = fields.get(key)
        if token_id is not None and token_id in id_to_token:
            config[f"{name}_token"] = id_to_token[token_id]
            config.pop(f"{name}_token_id", None)
    config["clean_up_tokenization_spaces"] = False
    config["add_bos_token"] = (
        bool(fields.get("tokenizer.ggml.add_bos_token")) if spm
        else False if fields.get("tokenizer.ggml.model") == "gpt2" else config.get("add_bos_token")
    )  # fmt: skip
    cfg_path.write_text(json.dumps(config, ensure_ascii=False, indent=1))


def parse_each_gguf_once() -> None:
    """transformers parses the GGUF afresh for the config, the tokenizer and the weights, and
    repair_tokenizer once more: five parses of every field, 10-18 s each for Gemma-3's 262,144-token
    vocabulary (70 of the 76 s this script took). gguf.GGUFReader, which transformers imports when
    it calls it, becomes one that parses each file once."""
    import os

    import gguf

    parse, parsed = gguf.GGUFReader, {}

    def read_once(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in parsed:
            parsed[key] = parse(path, mode)
        return parsed[key]

    gguf.GGUFReader = read_once


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("gguf_file", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    parse_each_gguf_once()

    started = time.monotonic()
    folder, name = str(args.gguf_file.parent), args.gguf_file.name
    print(f"loading {args.gguf_file} (dequantizing to {args.dtype})", flush=True)
    # Without dequantize=True, save_pretrained refuses: "quantized with gguf and is not serializable".
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=getattr(torch, args.dtype),
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir, safe_serialization=True)
    tokenizer.save_pretrained(args.out_dir)
    repair_tokenizer(args.gguf_file, args.out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"n_params": n_params, "dtype": args.dtype, "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
