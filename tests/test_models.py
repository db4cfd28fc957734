"""Models made from a GGUF reproduce it, on two architectures (SmolLM2: Llama with a byte-level BPE
vocabulary; Gemma-3-270M: Gemma 3 with a SentencePiece one, shipped in four chunk packages), and a
checkpoint that does not is refused with the reason."""

from __future__ import annotations

import subprocess

import pytest

from conftest import job_context
from qsweep import models
from qsweep.errors import QsweepError

pytestmark = pytest.mark.slow

# llama.cpp's own tokenization of a text, with the GGUF's BOS setting (the reference for the
# checkpoint's tokenizer); run in the llama.cpp stage environment.
LLAMA_TOKENS = """
import json, sys, llama_cpp
vocab = llama_cpp.Llama(sys.argv[1], vocab_only=True, verbose=False)
text = open(sys.argv[2], encoding="utf-8").read()
# add_bos=True is llama.cpp's add_special: BOS where the vocabulary says so (llama-perplexity's call)
print(json.dumps(vocab.tokenize(text.encode(), add_bos=True, special=False)))
"""
CHECKPOINT_TOKENS = """
import json, sys
from transformers import AutoTokenizer
text = open(sys.argv[2], encoding="utf-8").read()
print(json.dumps(AutoTokenizer.from_pretrained(sys.argv[1])(text)["input_ids"]))
"""


@pytest.fixture(scope="module")
def gemma(llamacpp_env, shared_model_cache, tmp_path_factory):
    ctx = job_context(tmp_path_factory.mktemp("gemma"), shared_model_cache)
    return models.prepare(models.from_conf("gemma3-270m"), "gemma3-270m", ctx), ctx


def tokens(llamacpp_env, script: str, *args) -> list[int]:
    import json

    done = subprocess.run([str(llamacpp_env.python), "-c", script, *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=llamacpp_env.environ(), check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_a_checkpoint_made_from_a_gguf_reproduces_it(which, request, llamacpp_env, tmp_path):
    """Perplexity through transformers on the checkpoint and through llama-perplexity on the GGUF's
    weights agree within 1% (the check every preparation runs, recorded in the entry), and the
    checkpoint's tokenizer gives llama.cpp's token ids, BOS included, on 40,000 characters."""
    model = request.getfixturevalue("smollm2") if which == "smollm2" else request.getfixturevalue("gemma")[0]
    check = model.checked
    assert check["checkpoint_ppl"] == pytest.approx(check["gguf_f32"], rel=0.01), check
    assert check["adds_bos"] is (which == "gemma")  # as each GGUF says (SmolLM2's does not)
    assert 3 < check["gguf_f32"] < 30  # a real model's perplexity on Wikipedia text
    cfg = models.from_conf("smollm2-135m" if which == "smollm2" else "gemma3-270m")
    gguf = models.source_files(cfg)[0] if which == "smollm2" else next(model.path.parent.parent.glob(
        "gguf-joined/*/gemma-3-270m-q4_k_m.gguf"))  # fmt: skip
    text = tmp_path / "text.txt"
    from qsweep.textdata import TextConfig, read_slice

    text.write_text(read_slice(TextConfig(offset_chars=100_000))[:40_000], encoding="utf-8")
    reference = tokens(llamacpp_env, LLAMA_TOKENS, gguf, text)
    ours = tokens(llamacpp_env, CHECKPOINT_TOKENS, model.path, text)
    differing = sum(a != b for a, b in zip(ours, reference, strict=False)) + abs(len(ours) - len(reference))
    # SmolLM2: transformers lacks llama.cpp's digit splitting in 5 places per 41k tokens
    # (docs/architecture.md)
    assert differing <= (0.002 * len(reference) if which == "smollm2" else 0), (len(ours), len(reference))


def test_a_checkpoint_that_does_not_reproduce_its_gguf_is_refused(gemma, smollm2):
    """SmolLM2's checkpoint checked against Gemma's GGUF: refused, naming both perplexities."""
    model, ctx = gemma
    gguf = next(model.path.parent.parent.glob("gguf-joined/*/gemma-3-270m-q4_k_m.gguf"))
    refused = r"does not reproduce it: perplexity [0-9.]+ \(transformers"
    with pytest.raises(QsweepError, match=refused) as info:
        models.check_against_gguf(gguf, smollm2.path, "smollm2-as-gemma", ctx, timeout_s=600)
    assert "model.path=/dir" in str(info.value) and "\n" not in str(info.value)
    assert not list(smollm2.path.parent.glob("*-check")), "the dequantized scratch copy is removed"
