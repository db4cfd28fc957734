"""Perplexity of a transformers checkpoint on a text, by llama-perplexity's protocol: the text
tokenized with the checkpoint's own tokenizer (its BOS setting included), cut into chunks of N_CTX
tokens whose first token is replaced by BOS where the tokenizer adds one, and only the second half
of each chunk scored. Used to check a checkpoint made from a GGUF against `llama-perplexity` on that
GGUF: the weights, the tokenizer and the BOS handling must all have come across.

Runs inside a stage environment with torch + transformers; imports nothing from qsweep.
Usage: python checkpoint_ppl.py CHECKPOINT_DIR TEXT_FILE N_CTX CHUNKS  (prints one JSON line)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("n_ctx", type=int)
    parser.add_argument("chunks", type=int)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    # float32 whatever the checkpoint's dtype: the comparison is with llama.cpp's float32 compute
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    tokens = tokenizer(args.text.read_text(encoding="utf-8"), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and len(tokens) > 0 and tokens[0] == bos
    first = args.n_ctx // 2
    nll, count = 0.0, 0
    for i in range(min(args.chunks, len(tokens) // args.n_ctx)):
        chunk = tokens[i * args.n_ctx : (i + 1) * args.n_ctx]
        if adds_bos:
            chunk[0] = bos
        logits = model(torch.tensor([chunk])).logits[0].float()
        logprobs = torch.log_softmax(logits[first:-1], dim=-1)
        targets = torch.tensor(chunk[first + 1 :])
        nll -= logprobs.gather(1, targets[:, None]).sum().item()
        count += len(targets)
    if not count:
        print(json.dumps({"error": f"the text has {len(tokens)} tokens, fewer than n_ctx={args.n_ctx}"}))
        return 1
    print(json.dumps({"ppl": math.exp(nll / count), "scored": count, "adds_bos": adds_bos}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
