"""Tokenize a text, or score token chunks, with llama.cpp in-process (llama-cpp-python).

llama-server returns log-probs of generated tokens only, so prompt log-probs for perplexity come
from here. Runs inside the llamacpp stage environment; imports nothing from qsweep.

  tokenize --model F.gguf --text T.txt --out tokens.json [--hf-tokenizer DIR --compare-tokens N]
      -> {"tokens": [...], "bos": id or null}   (BOS added where the model asks for it)
         + "hf_compare": how the transformers tokenizer in DIR splits the first N tokens' text
  logprobs --model F.gguf --chunks chunks.json --first K --npy out.npy --out info.json
      -> out.npy: float16 log-probs of the whole vocabulary at each scored position (all chunks)
  score --model F.gguf --chunks chunks.json --first K --out scores.json
      -> {"logprobs": [[logprob of chunk[j+1] given chunk[:j+1]] for j in K .. len-2] per chunk}
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def load(model: str, n_ctx: int, threads: int | None, logits_all: bool, gpu_layers: int = 0):
    from llama_cpp import Llama

    return Llama(
        model_path=model,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=min(n_ctx, 512),
        logits_all=logits_all,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=gpu_layers,
        verbose=False,
    )


def tokenize(args: argparse.Namespace) -> dict:
    llm = load(args.model, 512, args.threads, logits_all=False, gpu_layers=args.gpu_layers)
    with open(args.text, "rb") as f:
        text = f.read()
    # Same call as llama-perplexity's common_tokenize(ctx, text, add_special=true, parse_special=false).
    tokens = llm.tokenize(text, add_bos=True, special=False)
    bos = llm.token_bos() if llm._model.add_bos_token() else None
    result = {"tokens": tokens, "bos": bos}
    if args.hf_tokenizer:
        body = tokens[1:] if bos is not None and tokens[:1] == [bos] else tokens
        result["hf_compare"] = compare_with_hf(llm, body[: args.compare_tokens], args.hf_tokenizer)
    return result


def compare_with_hf(llm, gguf_tokens: list[int], hf_dir: str) -> dict:
    """Where the transformers tokenizer splits the same text differently from llama.cpp: the two
    engines then score different token sequences, so their perplexities differ slightly."""
    import difflib

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_dir)
    text = llm.detokenize(gguf_tokens).decode("utf-8", errors="ignore")
    hf_tokens = hf(text, add_special_tokens=False)["input_ids"]
    matcher = difflib.SequenceMatcher(None, gguf_tokens, hf_tokens)
    spans = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    # The text was cut at a llama.cpp token boundary: a difference in the last tokens is an artefact.
    spans = [op for op in spans if op[2] < len(gguf_tokens) - 2]
    examples = [
        {
            "gguf": [llm.detokenize([t]).decode("utf-8", errors="replace") for t in gguf_tokens[i1:i2]],
            "hf": [hf.decode([t]) for t in hf_tokens[j1:j2]],
        }
        for _, i1, i2, j1, j2 in spans[:5]
    ]
    return {
        "gguf_tokens": len(gguf_tokens),
        "hf_tokens": len(hf_tokens),
        "differing_spans": len(spans),
        "examples": examples,
    }


def scored_rows(args: argparse.Namespace, what: str):
    """Per chunk: the chunk and the next-token log-softmax (float64, positions x vocabulary) at each
    scored position `first` .. len-2, evaluated as llama-perplexity does (one chunk per context)."""
    import numpy as np

    with open(args.chunks) as f:
        chunks = json.load(f)["chunks"]
    llm = load(
        args.model, max(len(c) for c in chunks), args.threads, logits_all=True, gpu_layers=args.gpu_layers
    )
    started = time.monotonic()
    for i, chunk in enumerate(chunks):
        llm.reset()
        llm.eval(chunk)
        rows = np.asarray(llm.scores[: len(chunk)], dtype=np.float64)[args.first : len(chunk) - 1]
        top = rows.max(axis=1, keepdims=True)
        yield chunk, rows - (top + np.log(np.exp(rows - top).sum(axis=1, keepdims=True)))
        elapsed = time.monotonic() - started
        print(f"{what} chunk {i + 1}/{len(chunks)} ({elapsed:.1f} s)", file=sys.stderr, flush=True)


def score(args: argparse.Namespace) -> dict:
    import numpy as np

    out = []
    for chunk, logp in scored_rows(args, "scored"):
        targets = np.asarray(chunk[args.first + 1 :])
        out.append(logp[np.arange(len(targets)), targets].tolist())
    return {"logprobs": out}


def logprobs(args: argparse.Namespace) -> dict:
    """Full next-token log-probs (float16, positions x vocabulary) at every scored position, as
    llama-perplexity keeps them for --kl-divergence."""
    import numpy as np

    matrix = np.concatenate([logp.astype(np.float16) for _, logp in scored_rows(args, "log-probs of")])
    np.save(args.npy, matrix)
    return {"shape": list(matrix.shape)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["tokenize", "score", "logprobs"])
    parser.add_argument("--npy")
    parser.add_argument("--model", required=True)
    parser.add_argument("--text")
    parser.add_argument("--chunks")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--gpu-layers", type=int, default=0, help="layers on the GPU (-1: all) on a CUDA build"
    )
    parser.add_argument("--hf-tokenizer")
    parser.add_argument("--compare-tokens", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"tokenize": tokenize, "score": score, "logprobs": logprobs}[args.command](args)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
