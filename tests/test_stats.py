"""The numbers qsweep reports, against hand computation: perplexity and its chunks, accuracy and
paired deltas, intervals, percentiles, KL divergence, answer flips."""

from __future__ import annotations

import math

import pytest

from qsweep import stats
from qsweep.benchmarks.ppl import make_chunks, perplexity


def test_perplexity_matches_hand_computation():
    logprobs = [math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.5)]
    # NLLs: ln2, 2ln2, 3ln2, ln2 -> mean 1.75 ln2 -> ppl 2^1.75
    ppl, err = perplexity(logprobs)
    assert ppl == pytest.approx(2**1.75)
    nll = [math.log(2) * k for k in (1, 2, 3, 1)]
    mean = sum(nll) / 4
    var = sum(x * x for x in nll) / 4 - mean * mean
    assert err == pytest.approx(math.sqrt(var / 3) * 2**1.75)


def test_perplexity_of_uniform_model_is_vocab_size():
    ppl, err = perplexity([-math.log(1000)] * 50)
    assert ppl == pytest.approx(1000) and err == pytest.approx(0.0, abs=1e-3)


def test_chunks_follow_llama_perplexity():
    tokens = list(range(100, 1130))  # 1030 tokens
    chunks = make_chunks(tokens, n_ctx=256, max_tokens=600, bos=7)
    assert len(chunks) == 2  # budget 600 // 256
    assert chunks[0] == [7, *range(101, 356)]
    assert chunks[1] == [7, *range(357, 612)]
    assert len(make_chunks(tokens, 256, 10**6, None)) == 4  # the text's 1030 // 256
    assert make_chunks(tokens, 256, 10**6, None)[1][0] == 356  # no BOS: first token kept


def test_accuracy_estimate_matches_hand_computation():
    est = stats.estimate([1, 0, 1, 1])  # mean 3/4, sample variance 1/4, stderr sqrt(1/4 / 4) = 1/4
    assert est.mean == 0.75 and est.stderr == pytest.approx(0.25) and est.n == 4
    assert est.ci95 == pytest.approx((0.75 - 1.959964 * 0.25, 0.75 + 1.959964 * 0.25))


def test_paired_delta_recovery_and_noise_flag_match_hand_computation():
    baseline = {"a": 1, "b": 0, "c": 0, "d": 1}
    candidate = {"a": 1, "b": 1, "c": 0, "d": 1}
    cmp = stats.compare(candidate, baseline)  # differences 0, 1, 0, 0: mean 1/4, stderr 1/4
    assert cmp.paired and cmp.delta == pytest.approx(0.25) and cmp.stderr == pytest.approx(0.25)
    assert cmp.recovery == pytest.approx(0.75 / 0.5) and cmp.within_noise
    big = stats.compare({str(i): 1 for i in range(100)}, {str(i): i % 2 for i in range(100)})
    assert big.delta == pytest.approx(0.5) and not big.within_noise  # 0.5 +- 1.96 * 0.0503


def test_unpaired_delta_adds_standard_errors_in_quadrature():
    cmp = stats.compare({"x": 1, "y": 0}, {"a": 1, "b": 1, "c": 0, "d": 0})
    # candidate: mean 1/2, stderr sqrt(1/2 / 2) = 1/2; baseline: mean 1/2, stderr sqrt(1/3 / 4)
    assert not cmp.paired and cmp.delta == 0
    assert cmp.stderr == pytest.approx(math.sqrt(0.25 + 1 / 12))


def test_repeat_and_percentile_summaries_match_hand_computation():
    assert stats.mean_std([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx((5, math.sqrt(32 / 7)))
    assert stats.mean_std([3.0]) == (3.0, 0.0)
    assert stats.percentile([4, 1, 3, 2], 90) == pytest.approx(3.7)
    assert stats.percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)


def test_paired_perplexity_comparison_matches_hand_computation():
    from qsweep.benchmarks import ppl

    base = {"logprobs": [-1.0, -2.0, -3.0], "tokens": [5, 6, 7]}
    quant = {"logprobs": [-1.5, -2.0, -3.5], "tokens": [5, 6, 7]}
    base["ppl"], quant["ppl"] = math.exp(2.0), math.exp(7 / 3)
    m = ppl.Perplexity().compare(
        quant, base
    )  # NLL differences 0.5, 0, 0.5: mean 1/3, sample sd 0.2887, se 1/6
    assert m["ppl_ratio"] == pytest.approx(math.exp(1 / 3)) and m["ppl_ln_ratio"] == pytest.approx(1 / 3)
    assert m["ppl_ln_ratio_err"] == pytest.approx(1 / 6)
    assert m["ppl_ratio_ci_low"] == pytest.approx(math.exp(1 / 3 - 1.959964 / 6))
    assert m["ppl_within_noise"] == 0.0  # 1/3 - 0.327 > 0
    other = ppl.Perplexity().compare(
        {**quant, "tokens": [5, 6, 8]}, base
    )  # different tokens: no paired interval
    assert other["ppl_ratio"] == pytest.approx(math.exp(1 / 3)) and "ppl_ln_ratio" not in other


def test_wilson_interval_matches_textbook_values():
    low, high = stats.proportion_interval([1.0] * 3 + [0.0] * 7)  # 3 of 10: Wilson 95% [0.1078, 0.6032]
    assert (low, high) == (pytest.approx(0.1078, abs=1e-4), pytest.approx(0.6032, abs=1e-4))
    low, high = stats.proportion_interval([0.0, 0.0])  # none of 2 passed: still an honest interval
    assert low == 0.0 and high == pytest.approx(0.6576, abs=1e-4)
    assert stats.proportion_interval([0.5, 1.0, 0.0]) == stats.estimate([0.5, 1.0, 0.0]).ci95  # not 0/1


def test_top_k_kl_divergence_matches_hand_computation():
    from qsweep.benchmarks import kld

    base = ([1, 2], [math.log(0.5), math.log(0.3)])  # and 0.2 elsewhere
    # quantized: 0.4 / 0.4 on the same tokens, 0.2 elsewhere
    same = kld.position_kld(base, {1: math.log(0.4), 2: math.log(0.4)})
    assert same == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4))
    # token 2 is not in the quantized top-k: it gets the k-th log-prob (0.3), the rest is 0.1
    missing = kld.position_kld(base, {1: math.log(0.6), 3: math.log(0.3)})
    assert missing == pytest.approx(0.5 * math.log(0.5 / 0.6) + 0.2 * math.log(0.2 / 0.1))


def test_exact_kl_divergence_and_top_token_agreement(tmp_path):
    import numpy as np

    from qsweep.benchmarks import kld

    p = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    q = np.log(np.array([[0.5, 0.4, 0.1], [0.45, 0.1, 0.45]]))
    np.save(tmp_path / "p.npy", p.astype(np.float16))
    np.save(tmp_path / "q.npy", q.astype(np.float16))
    klds, agree = kld.exact_kld(str(tmp_path / "p.npy"), str(tmp_path / "q.npy"))
    expected = [
        0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.4),
        0.1 * math.log(0.1 / 0.45) + 0.8 * math.log(0.8 / 0.45),
    ]
    assert klds == pytest.approx(expected, abs=2e-3)  # float16 storage, as llama-perplexity's
    assert agree == [1.0, 0.0]  # token 0 vs 0; token 2 vs 0 (0.45 ties: argmax takes the first)
    m = kld.KlDivergence().compare({"tokens": [1], "logprobs_npy": str(tmp_path / "q.npy")},
                    {"tokens": [1], "logprobs_npy": str(tmp_path / "p.npy")})  # fmt: skip
    assert m["kld_mean"] == pytest.approx(sum(expected) / 2, abs=2e-3) and m["top1_agreement"] == 0.5
    assert (
        kld.KlDivergence().compare({"tokens": [2]}, {"tokens": [1]}) == {}
    )  # different tokenization: no number


def test_answer_flips_count_samples_that_changed_side():
    from qsweep import stats

    base = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0, "e": 1.0}
    quantized = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0, "e": 0.0, "f": 1.0}  # f: not in both
    assert stats.flips(quantized, base) == (2, 1)
