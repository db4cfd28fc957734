"""Tokenize a text, or score token chunks, with llama.cpp in-process (llama-cpp-python).

llama-server returns log-probs of generated tokens only, so prompt log-probs for perplexity come
from here. Runs inside the llamacpp stage environment; imports nothing from qsweep.

  tokenize --model F.gguf --text T.txt --out tokens.json
      -> {"tokens": [...], "bos": id or null}   (BOS added where the model asks for it)
  score --model F.gguf --chunks chunks.json --first K --out scores.json
      -> {"logprobs": [[logprob of chunk[j+1] given chunk[:j+1]] for j in K .. len-2] per chunk}
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def load(model: str, n_ctx: int, threads: int | None, logits_all: bool):
    from llama_cpp import Llama

    return Llama(
        model_path=model,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=min(n_ctx, 512),
        logits_all=logits_all,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def tokenize(args: argparse.Namespace) -> dict:
    llm = load(args.model, 512, args.threads, logits_all=False)
    with open(args.text, "rb") as f:
        text = f.read()
    # Same call as llama-perplexity's common_tokenize(ctx, text, add_special=true, parse_special=false).
    tokens = llm.tokenize(text, add_bos=True, special=False)
    bos = llm.token_bos() if llm._model.add_bos_token() else None
    return {"tokens": tokens, "bos": bos}


def score(args: argparse.Namespace) -> dict:
    import numpy as np

    with open(args.chunks) as f:
        chunks = json.load(f)["chunks"]
    n_ctx = max(len(c) for c in chunks)
    llm = load(args.model, n_ctx, args.threads, logits_all=True)
    out = []
    started = time.monotonic()
    for i, chunk in enumerate(chunks):
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk)], dtype=np.float64)
        rows = logits[args.first : len(chunk) - 1]
        top = rows.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
        targets = np.asarray(chunk[args.first + 1 :])
        out.append((rows[np.arange(len(targets)), targets] - logz).tolist())
        print(
            f"scored chunk {i + 1}/{len(chunks)} ({time.monotonic() - started:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    return {"logprobs": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["tokenize", "score"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text")
    parser.add_argument("--chunks")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = tokenize(args) if args.command == "tokenize" else score(args)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
