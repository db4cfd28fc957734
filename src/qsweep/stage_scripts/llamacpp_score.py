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
  (both: --cache-type-k/-v T, --flash-attn auto|on|off, --threads N, --gpu-layers N)
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def load(model: str, n_ctx: int, args: argparse.Namespace):
    """The model for tokenizing (its vocabulary; nothing is evaluated)."""
    from llama_cpp import Llama

    return Llama(
        model_path=model,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=args.threads,
        n_gpu_layers=args.gpu_layers,
        verbose=False,
    )


def tokenize(args: argparse.Namespace) -> dict:
    llm = load(args.model, 512, args)
    with open(args.text, "rb") as f:
        text = f.read()
    # Same call as llama-perplexity's common_tokenize(ctx, text, add_special=true, parse_special=false).
    tokens = first_tokens(llm, text, args.max_tokens)
    bos = llm.token_bos() if llm._model.add_bos_token() else None
    result = {"tokens": tokens, "bos": bos}
    if args.hf_tokenizer:
        body = tokens[1:] if bos is not None and tokens[:1] == [bos] else tokens
        result["hf_compare"] = compare_with_hf(llm, body[: args.compare_tokens], args.hf_tokenizer)
    return result


def first_tokens(llm, text: bytes, wanted: int) -> list[int]:
    """The text's tokens, or (with `wanted`) its first `wanted`: a prefix of the text is tokenized,
    grown until it gives 64 tokens more than wanted, and those last ones, which the cut could have
    split differently, are dropped. A 1.3 MB text is 579k tokens; a perplexity run needs 8k."""
    size = wanted * 8 + 4096 if wanted else len(text)  # bytes; English runs 4-5 per token
    while True:
        tokens = llm.tokenize(text[:size], add_bos=True, special=False)
        if size >= len(text):
            return tokens
        if len(tokens) >= wanted + 64:
            return tokens[:wanted]
        size *= 2


def compare_with_hf(llm, gguf_tokens: list[int], hf_dir: str) -> dict:
    """Where the transformers tokenizer splits the same text differently from llama.cpp: the two
    engines then score different token sequences, so their perplexities differ slightly."""
    import difflib
    from pathlib import Path

    text = llm.detokenize(gguf_tokens).decode("utf-8", errors="ignore")
    if (Path(hf_dir) / "tokenizer.json").is_file():
        # the fast tokenizer's own file, through the `tokenizers` library that transformers wraps:
        # the same ids, without transformers' 3-4 s import in every perplexity stage
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))
        hf_tokens = hf.encode(text, add_special_tokens=False).ids
    else:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(hf_dir)
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


# llama-perplexity's default batch: n_batch // n_ctx chunks go through one decode, each its own sequence
# (4 of 512 tokens). Scoring them the same way takes the same kernels, so the figures agree on
# quantized files too (one chunk per decode differed by 0.23% on Q4_K_M).
BATCH_TOKENS = 2048


class BatchScorer:
    """llama-perplexity's evaluation, through llama.cpp's C API: a context of n_seq sequences of
    n_ctx tokens, several chunks per decode, logits only at the positions that are scored."""

    def __init__(self, args: argparse.Namespace, n_ctx: int):
        import os

        import llama_cpp

        self.api = llama_cpp
        llama_cpp.llama_backend_init()
        self.n_ctx = n_ctx
        self.n_seq = max(1, BATCH_TOKENS // n_ctx)
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = args.gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(args.model.encode(), model_params)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {args.model}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = self.n_seq * n_ctx
        params.n_ubatch = min(512, params.n_batch)
        params.n_seq_max = self.n_seq
        params.n_threads = params.n_threads_batch = args.threads or os.cpu_count() or 1
        params.type_k = getattr(llama_cpp, f"GGML_TYPE_{args.cache_type_k.upper()}")
        params.type_v = getattr(llama_cpp, f"GGML_TYPE_{args.cache_type_v.upper()}")
        params.flash_attn_type = {  # auto: llama-perplexity's default
            "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[args.flash_attn]
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create a scoring context (memory? cache types?)")
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)

    def close(self) -> None:
        self.api.llama_batch_free(self.batch)
        self.api.llama_free(self.ctx)
        self.api.llama_model_free(self.model)

    def logits(self, chunks: list[list[int]], first: int):
        """Per chunk, the logits (float32, positions first .. n_ctx-1 x vocabulary)."""
        import numpy as np

        api, batch = self.api, self.batch
        api.llama_memory_clear(api.llama_get_memory(self.ctx), True)
        n = 0
        for seq, chunk in enumerate(chunks):
            for pos, token in enumerate(chunk):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = pos >= first
                n += 1
        batch.n_tokens = n
        if api.llama_decode(self.ctx, batch) != 0:
            raise SystemExit("llama.cpp failed to decode a batch of chunks")
        rows = self.n_ctx - first
        out = np.ctypeslib.as_array(api.llama_get_logits(self.ctx), shape=(len(chunks) * rows, self.n_vocab))
        return [out[i * rows : (i + 1) * rows].copy() for i in range(len(chunks))]


def scored_rows(args: argparse.Namespace, what: str):
    """Per chunk: the chunk, the logits (float32, positions x vocabulary) at each scored position
    `first` .. len-2 and each row's log-sum-exp (float64), evaluated as llama-perplexity does
    (several chunks per decode, each its own sequence, logits only where scored). A token's
    log-prob is its logit minus the row's log-sum-exp, computed as llama-perplexity computes it:
    float32 exponentials summed in float64."""
    import numpy as np

    with open(args.chunks) as f:
        chunks = json.load(f)["chunks"]
    n_ctx = len(chunks[0])
    if any(len(chunk) != n_ctx for chunk in chunks):
        raise SystemExit("every chunk must have the same length")
    scorer = BatchScorer(args, n_ctx)
    started, done = time.monotonic(), 0
    try:
        for start in range(0, len(chunks), scorer.n_seq):
            group = chunks[start : start + scorer.n_seq]
            for chunk, logits in zip(group, scorer.logits(group, args.first), strict=True):
                rows = logits[:-1]  # the last position predicts past the chunk
                top = rows.max(axis=1, keepdims=True)
                total = np.exp(rows - top).sum(axis=1, dtype=np.float64, keepdims=True)
                yield chunk, rows, top.astype(np.float64) + np.log(total)
            done += len(group)
            elapsed = time.monotonic() - started
            print(f"{what} chunk {done}/{len(chunks)} ({elapsed:.1f} s)", file=sys.stderr, flush=True)
    finally:
        scorer.close()


def score(args: argparse.Namespace) -> dict:
    import numpy as np

    out = []
    for chunk, rows, lse in scored_rows(args, "scored"):
        targets = np.asarray(chunk[args.first + 1 :])
        picked = rows[np.arange(len(targets)), targets].astype(np.float64)
        out.append((picked - lse[:, 0]).tolist())
    return {"logprobs": out}


def logprobs(args: argparse.Namespace) -> dict:
    """Full next-token log-probs (float16, positions x vocabulary) at every scored position, as
    llama-perplexity keeps them for --kl-divergence."""
    import numpy as np

    parts = [
        (rows - lse.astype(np.float32)).astype(np.float16)
        for _, rows, lse in scored_rows(args, "log-probs of")
    ]
    matrix = np.concatenate(parts)
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
    parser.add_argument("--cache-type-k", default="f16", help="the KV cache's K type (f16, q8_0, q4_0, ...)")
    parser.add_argument("--cache-type-v", default="f16", help="the V type; quantized needs --flash-attn")
    parser.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--max-tokens", type=int, default=0, help="tokenize: only the first N tokens")
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
