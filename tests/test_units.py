"""Fast unit tests of the orchestration pieces, checked against hand-computed values."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest

from qsweep import calibration, envs, procs, stats, tracking
from qsweep.benchmarks.ppl import make_chunks, perplexity
from qsweep.cache import ArtifactCache, content_key
from qsweep.errors import QsweepError


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


def test_cache_builds_once_and_reuses(tmp_path):
    cache, calls = ArtifactCache(tmp_path), []

    def build(tmp: Path) -> dict:
        calls.append(1)
        (tmp / "out.bin").write_bytes(b"x")
        return {"size": 1}

    first = cache.entry("kind", {"a": 1}, build, what="thing")
    second = cache.entry("kind", {"a": 1}, build, what="thing")
    other = cache.entry("kind", {"a": 2}, build, what="thing")
    assert calls == [1, 1] and not first.hit and second.hit and not other.hit
    assert second.path == first.path and (second.path / "out.bin").read_bytes() == b"x"
    assert second.manifest["size"] == 1 and second.manifest["key"] == content_key({"a": 1})


def test_cache_keeps_nothing_from_a_failed_build(tmp_path):
    cache = ArtifactCache(tmp_path)

    def broken(tmp: Path) -> dict:
        (tmp / "half.bin").write_bytes(b"partial")
        raise RuntimeError("tool crashed")

    with pytest.raises(RuntimeError):
        cache.entry("kind", {"a": 1}, broken, what="thing")
    assert [p.name for p in (tmp_path / "kind").iterdir() if not p.name.endswith(".lock")] == []
    rebuilt = cache.entry("kind", {"a": 1}, lambda tmp: (tmp / "ok").write_text("1") and None, what="thing")
    assert not rebuilt.hit and (rebuilt.path / "ok").exists()


def test_cache_rebuilds_an_entry_without_manifest(tmp_path):
    (tmp_path / "kind" / content_key({"a": 1})).mkdir(parents=True)  # a crash left a folder behind
    entry = ArtifactCache(tmp_path).entry("kind", {"a": 1}, lambda tmp: None, what="thing")
    assert not entry.hit


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); count it as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_run_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    with pytest.raises(QsweepError, match="timed out after 1 s"):
        procs.run(["sh", "-c", script], log_path=tmp_path / "log", timeout_s=1, what="sleeper")
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the grandchild must die with its group"


def test_set_up_compiles_alongside_the_installs_and_a_failure_there_stops_the_compile(tmp_path, monkeypatch):
    """The compiling environment builds in a thread while the others build here; when one of these
    fails (or Ctrl-C lands), the compile's tool is stopped at once, not waited for."""
    pid_file = tmp_path / "compile.pid"
    started = []

    def fake_build(spec, envs_dir):
        started.append(spec.name)
        if spec.compiles:  # minutes of compiling, in its own process group
            script = f"sleep 300 & echo $! > {pid_file}; wait"
            procs.run(["sh", "-c", script], log_path=tmp_path / "compile.log", timeout_s=600, what="compile")
        else:
            while not pid_file.exists():  # the compile is under way beside this install
                time.sleep(0.05)
            raise QsweepError("install quantize-cpu.txt failed (exit 1)")

    specs = {"slow": envs.StageEnvSpec("slow", compiles=True), "quick": envs.StageEnvSpec("quick")}
    monkeypatch.setattr(envs, "stage_envs", lambda: specs)
    monkeypatch.setattr(envs, "up_to_date", lambda spec, env: False)
    monkeypatch.setattr(envs, "build_env", fake_build)
    began = time.monotonic()
    with pytest.raises(QsweepError, match="install quantize-cpu.txt failed"):
        envs.setup(["slow", "quick"], tmp_path)
    assert time.monotonic() - began < 30 and sorted(started) == ["quick", "slow"]
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the compile's processes stop with the set-up"


def test_run_failure_names_the_step_exit_code_and_log(tmp_path):
    log = tmp_path / "step.log"
    with pytest.raises(QsweepError) as info:
        procs.run(["sh", "-c", "echo boom-detail; exit 3"], log_path=log, timeout_s=30, what="my step")
    message = str(info.value)
    assert "my step failed (exit 3)" in message and "boom-detail" in message and str(log) in message


def test_background_child_is_killed_on_exception(tmp_path):
    with pytest.raises(RuntimeError), procs.background(["sleep", "300"], log_path=tmp_path / "log") as proc:
        pid = proc.pid
        raise RuntimeError("benchmark crashed")
    assert not _alive(pid)


def test_background_child_is_killed_even_if_it_ignores_sigterm(tmp_path):
    script = "trap '' TERM; sleep 300"
    with procs.background(["sh", "-c", script], log_path=tmp_path / "log", grace_s=1) as proc:
        pid = proc.pid
        time.sleep(0.3)
    assert not _alive(pid)
    assert proc.returncode == -signal.SIGKILL


def test_a_stopped_child_is_stopped_without_waiting_out_the_grace(tmp_path):
    """SIGSTOP holds SIGTERM until SIGCONT: kill_group sends both, so a stopped server ends at once
    instead of after the grace and SIGKILL."""
    with procs.background(["sleep", "300"], log_path=tmp_path / "log", grace_s=30) as proc:
        os.kill(proc.pid, signal.SIGSTOP)
        stopping = time.monotonic()
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - stopping < 10


def test_params_are_flattened_and_secrets_masked():
    flat = tracking.flatten(
        {"engine": {"port": 0, "api_key": "sk-123", "extra": {"hf_token": "abc"}}, "n": None}
    )
    assert flat == {"engine.port": "0", "engine.api_key": "***", "engine.extra.hf_token": "***", "n": ""}


def test_free_port_is_bindable_and_port_taken_sees_a_listener():
    import socket

    from qsweep.engines.http import free_port, port_taken

    port = free_port("127.0.0.1")
    assert 1024 <= port < 65536 and not port_taken("127.0.0.1", port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # raises if the port was not free
        sock.listen()
        assert port_taken("127.0.0.1", port)


def test_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path):
    import errno

    def full(tmp: Path) -> dict:
        (tmp / "part").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(QsweepError, match="disk full while building the thing.*larger disk"):
        ArtifactCache(tmp_path).entry("kind", {"a": 1}, full, what="the thing")
    assert [p.name for p in (tmp_path / "kind").iterdir() if not p.name.endswith(".lock")] == []


def test_missing_executable_is_one_clear_error(tmp_path):
    with pytest.raises(QsweepError, match="cannot start /no/such/tool"):
        procs.run(["/no/such/tool"], log_path=tmp_path / "log", timeout_s=5, what="tool")


def test_truncated_json_array_is_read_record_by_record(tmp_path):
    records = [{"id": i, "conversations": [{"from": "human", "value": "x" * i}]} for i in range(5)]
    text = json.dumps(records, indent=2)
    cut = tmp_path / "cut.json"
    cut.write_text(text[: text.index('"id": 4')])  # cut inside the last record, as in the wheel
    assert [r["id"] for r in calibration.json_array_records(cut, chunk_chars=16)] == [0, 1, 2, 3]
    whole = tmp_path / "whole.json"
    whole.write_text(text)
    assert [r["id"] for r in calibration.json_array_records(whole, chunk_chars=7)] == [0, 1, 2, 3, 4]


def test_sharegpt_conversations_map_roles_and_drop_unusable_ones(tmp_path):
    def turn(who, what):
        return {"from": who, "value": what}

    records = [
        {"conversations": [turn("human", "hi"), turn("gpt", "hello there")]},
        {"conversations": [turn("human", "only a question, no answer")]},
        {"conversations": [turn("human", "q"), turn("unknown-speaker", "a")]},
        {"conversations": [turn("system", "be brief"), turn("human", "2+2?"), turn("chatgpt", "4")]},
        {"conversations": [turn("human", "  "), turn("gpt", "empty question")]},
        {"conversations": [turn("human", "a"), turn("gpt", "b")]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    found = calibration.conversations(path, skip=0, count=10, min_chars=3)
    assert found == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
    ]  # the last one is shorter than min_chars
    assert calibration.conversations(path, skip=1, count=1, min_chars=3) == found[1:]


def test_chat_calibration_from_the_wheel_is_cached_by_settings(tmp_path):
    cache = ArtifactCache(tmp_path)
    cal = calibration.CalibrationConfig(source=calibration.CalibrationSource.chat, num_samples=3, seq_len=64)
    path, sha = calibration.calibration_file(cal, cache)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and all({"user", "assistant"} <= {m["role"] for m in r["messages"]} for r in rows)
    assert calibration.calibration_file(cal, cache) == (path, sha)
    cal.skip_conversations = 3
    other, other_sha = calibration.calibration_file(cal, cache)
    assert other != path and other_sha != sha
    cal.num_samples = 10**6
    with pytest.raises(QsweepError, match="lower calibration.num_samples"):
        calibration.calibration_file(cal, cache)


def test_every_device_variant_of_a_stage_environment_has_its_requirements():
    """The CUDA variants cannot be built here; at least each names a file with real pins."""
    for spec in envs.stage_envs().values():
        if spec.variant is None:
            continue
        for device in ("cpu", "cuda"):
            text = (envs.SPEC_DIR / f"{spec.name}-{device}.txt").read_text()
            pins = re.findall(r"^[\w.-]+==[\w.+]+$", text, re.M)
            assert pins, (spec.name, device)
            assert any("+cpu" in p for p in pins) == (device == "cpu"), (spec.name, device, pins)


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


def test_fair_serving_presets_size_the_engines_for_the_largest_concurrency():
    from qsweep.engines import llamacpp, vllm
    from qsweep.engines.served import Load

    load = Load(concurrency=16, tokens_per_request=300)
    fitted = llamacpp.LlamaCppEngine().fit(llamacpp.Config(ctx_size=2048, parallel=1), load)
    assert fitted.parallel == 16 and fitted.ctx_size == 16 * 300  # llama-server splits -c across slots
    assert llamacpp.LlamaCppEngine().fit(llamacpp.Config(parallel=32), load).parallel == 32  # never lowered
    assert llamacpp.LlamaCppEngine().fit(llamacpp.Config(fit_to_load=False), load).parallel == 1
    load = Load(concurrency=100, tokens_per_request=2064)
    fitted = vllm.VllmEngine().fit(vllm.Config(max_num_seqs=8, max_model_len=1024), load)
    assert fitted.max_num_seqs == 100 and fitted.max_model_len == 2064


def test_perf_level_metrics_read_evalscope_outputs(tmp_path):
    from qsweep.benchmarks import perf

    summary = {"Output Throughput (tok/s)": 74.2, "Req Throughput (req/s)": 2.3, "Avg TTFT (ms)": 619.3,
               "Total Requests": 8, "Success Requests": 6, "Avg Output Tokens": 32.0}  # fmt: skip
    rows = [{"Percentiles": p, "TTFT (ms)": v, "TPOT (ms)": v / 10, "ITL (ms)": v / 20}
            for p, v in (("10%", 1.0), ("50%", 500.0), ("90%", 700.0), ("99%", 750.0))]  # fmt: skip
    (tmp_path / "benchmark_summary.json").write_text(json.dumps(summary))
    (tmp_path / "benchmark_percentile.json").write_text(json.dumps(rows))
    m = perf.level_metrics(tmp_path)
    assert m["output_tok_s"] == 74.2 and m["requests_s"] == 2.3 and m["ttft_ms_mean"] == 619.3
    assert m["success_rate"] == 0.75 and m["output_tokens_mean"] == 32
    assert (m["ttft_ms_p50"], m["ttft_ms_p90"], m["ttft_ms_p99"]) == (500, 700, 750)
    assert m["tpot_ms_p99"] == 75 and m["itl_ms_p50"] == 25 and "ttft_ms_p10" not in m

    # two repeats of two levels: mean and sample standard deviation per level, curves by concurrency
    def level(tok_s, success):
        return {"output_tok_s": tok_s, "success_rate": success}

    runs = {1: [level(10.0, 1.0), level(14.0, 1.0)], 4: [level(30.0, 1.0), level(30.0, 0.5)]}
    result = perf.summarize(runs, perf.Config(concurrency=[1, 4], repeats=2), tmp_path)
    assert result.curves["perf_output_tok_s"] == {1: 12.0, 4: 30.0}
    assert result.curves["perf_output_tok_s_std"][1] == pytest.approx(math.sqrt(8))
    assert result.metrics["perf_scaling"] == 2.5 and result.metrics["perf_success_rate_min"] == 0.75


def test_gates_judge_only_metrics_the_run_has():
    from qsweep import gates

    cfg = gates.GatesConfig(
        ppl_ratio_max=1.05, ifeval_recovery_min=0.95, extra={"perf_output_tok_s_c4_min": 50}
    )
    assert gates.evaluate(cfg, {"ppl_ratio": 1.05, "ifeval_recovery": 0.95, "perf_output_tok_s_c4": 50}) == []
    missed = gates.evaluate(cfg, {"ppl_ratio": 1.06, "ifeval_recovery": 0.9, "perf_output_tok_s_c4": 49})
    assert missed == ["ifeval_recovery 0.9 < 0.95", "perf_output_tok_s_c4 49 < 50", "ppl_ratio 1.06 > 1.05"]
    assert gates.evaluate(cfg, {}) == []  # e.g. the baseline itself: nothing to compare
    with pytest.raises(QsweepError, match="must end in _min or _max"):
        gates.limits(gates.GatesConfig(extra={"ppl_ratio": 1.0}))


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


def test_offline_benchmark_data_converters():
    from qsweep import evaldata

    solution = (
        r"So $x = \frac{1}{2}$, hence \boxed{\frac{1}{2}}. Check: \boxed{\left( 3, \frac{\pi}{2} \right)}."
    )
    assert evaldata.last_boxed(solution) == r"\left( 3, \frac{\pi}{2} \right)"
    assert evaldata.last_boxed("no answer") is None
    assert evaldata.evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7]
    assert evaldata.evenly_spaced([1, 2], 5) == [1, 2]
    header = {k: k for k in ("question", "answer_a", "answer_b", "answer_c", "answer_d")}
    header.update(correct_answer="answer", topic="elementary mathematics")
    row = {**header, "question": "2+2?", "answer_c": "4", "correct_answer": "C"}
    assert evaldata._mmlu([header, row]) == [
        {
            "question": "2+2?",
            "choices": ["answer_a", "answer_b", "4", "answer_d"],
            "answer": 2,
            "subject": "elementary_mathematics",
        }  # fmt: skip
    ]


def test_accuracy_reads_evalscope_reviews_and_compares_paired(tmp_path):
    from qsweep.benchmarks import accuracy

    def review(index, **value):
        return json.dumps({"index": index, "sample_score": {"score": {"value": value}}})

    (tmp_path / "mmlu_anatomy.jsonl").write_text(review(0, accuracy=1.0) + "\n" + review(1, accuracy=0.0))
    (tmp_path / "mmlu_virology.jsonl").write_text(review(0, accuracy=1.0) + "\n" + review(1, accuracy=1.0))
    result = accuracy.summarize(tmp_path, ["mmlu"], tmp_path)
    assert result.samples["mmlu"]["accuracy"] == {
        "anatomy/0": 1.0, "anatomy/1": 0.0, "virology/0": 1.0, "virology/1": 1.0
    }  # fmt: skip
    assert result.metrics["mmlu"] == 0.75 and result.metrics["acc_mmlu_accuracy_n"] == 4
    assert result.metrics["acc_mmlu_accuracy_stderr"] == pytest.approx(0.25)
    worse = {"mmlu": {"accuracy": {"anatomy/0": 0.0, "anatomy/1": 0.0, "virology/0": 1.0, "virology/1": 1.0}}}
    deltas = accuracy.Accuracy().compare(worse, result.samples)
    # paired differences -1, 0, 0, 0: mean -1/4, sample sd 1/2, stderr 1/4
    assert deltas["mmlu_delta"] == -0.25 and deltas["mmlu_delta_stderr"] == pytest.approx(0.25)
    assert deltas["mmlu_recovery"] == pytest.approx(0.5 / 0.75) and deltas["mmlu_within_noise"] == 1.0
    assert deltas["mmlu_base"] == 0.75


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


def test_cpu_busy_sees_other_work_but_not_our_own():
    """The load test's check for a shared machine: every core spinning in processes that are not
    ours reads as (nearly) all busy; the same spinning in our own children (a server still busy
    with earlier work) does not count."""
    import subprocess
    import sys

    from qsweep.benchmarks import perf

    cores = os.cpu_count() or 1
    spin = f"{sys.executable} -c 'while True: pass'"
    # `sh` starts the spinners in the background and exits: they are no longer our descendants
    started = subprocess.run(
        ["sh", "-c", " ".join(f"{spin} >/dev/null 2>&1 </dev/null & echo $!;" for _ in range(cores))],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    foreign = [int(pid) for pid in started.stdout.split()]
    try:
        time.sleep(0.3)
        busy = perf.cpu_busy(0.5)
    finally:
        for pid in foreign:
            os.kill(pid, signal.SIGKILL)
    assert busy is not None and busy > 0.8 and busy > perf.BUSY_NOTE_ABOVE

    before = perf.cpu_busy(0.5)  # whatever else this machine is doing
    own = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.3)
        busy = perf.cpu_busy(0.5)
    finally:
        for proc in own:
            proc.kill()
            proc.wait()
    assert busy is not None and busy < before + 0.25


def test_quantize_progress_reads_llmcompressor_progress_bars(tmp_path):
    from qsweep.methods.llmcompressor import layer_progress

    log = tmp_path / "quantize.log"
    assert layer_progress(log) == ""  # no log yet
    log.write_text("loading\n(1/31): Calibrating:   0%|   | 0/32\r(1/31): Calibrating: 100%|###| 32/32\n")
    assert layer_progress(log) == "(layer group 1/31, calibrating)"
    with open(log, "a") as f:
        f.write("x" * 5000 + "\r(12/31): Propagating:  50%|#  | 16/32")
    assert layer_progress(log) == "(layer group 12/31, propagating)"


def test_load_test_progress_reads_evalscope_progress_bar(tmp_path):
    from qsweep.benchmarks.perf import level_progress

    log = tmp_path / "perf.log"
    assert level_progress(log) == ""
    log.write_text(  # as evalscope 1.14 writes it
        "Processing[parallel_1_number_2]: 100%|##########| 2/2 [00:10<00:00]\n"
        "Processing[parallel_4_number_8]:  62%|######3   | 5/8 [01:22<00:41, 13.83s/it]\x1b[A\x1b[A"
    )
    assert level_progress(log) == "(concurrency 4: 62% of 8 requests)"


def test_cache_rebuilds_entries_older_than_a_sweep_once(tmp_path):
    """rerun=[quantize]: entries built before the sweep began count as missing, are rebuilt in
    place, and the rebuilt entry is a hit for every later job of the same sweep."""
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(1)
        (tmp / "out").write_text(str(len(calls)))
        return {}

    old = ArtifactCache(tmp_path).entry("kind", {"a": 1}, build, what="thing")
    began = time.time()
    forced = ArtifactCache(tmp_path, rebuild_before=began)
    rebuilt = forced.entry("kind", {"a": 1}, build, what="thing")
    again = forced.entry("kind", {"a": 1}, build, what="thing")
    assert not rebuilt.hit and again.hit and calls == [1, 1]
    assert rebuilt.path == old.path and (rebuilt.path / "out").read_text() == "2"
    assert ArtifactCache(tmp_path).lookup("kind", {"a": 1}).hit
    assert ArtifactCache(tmp_path, rebuild_before=time.time() + 1).lookup("kind", {"a": 1}) is None


def test_a_benchmark_that_reads_another_runs_after_it():
    from qsweep.benchmarks import accuracy, perf, ppl
    from qsweep.plan import after_what_they_read

    at_capacity = accuracy.Config(at_capacity=True)
    with_objective = perf.Config(slo=perf.Objective(ttft_p99_ms=500))
    runnable = {"accuracy": (accuracy.Accuracy(), at_capacity), "ppl": (ppl.Perplexity(), ppl.Config()),
                "perf": (perf.LoadTest(), with_objective)}  # fmt: skip
    assert list(after_what_they_read(runnable)) == ["perf", "accuracy", "ppl"]
    plain = {"accuracy": (accuracy.Accuracy(), accuracy.Config()), "perf": (perf.LoadTest(), with_objective)}
    assert list(after_what_they_read(plain)) == ["accuracy", "perf"]  # as listed
    # the objective's criteria in evalscope's spelling, and the engine sized for the search
    assert with_objective.slo.criteria() == {"p99_ttft": "<=500ms"}
    assert perf.LoadTest().load(with_objective).concurrency == 16
    assert perf.LoadTest().load(perf.Config()).concurrency == 4


def test_capacity_is_read_from_evalscopes_sla_decision():
    from qsweep.benchmarks import perf

    def probe(value, passed, tok_s):
        metrics = {"Output Throughput (tok/s)": tok_s, "Avg TPOT (ms)": 20.0 * value}
        percentiles = {"Percentiles": ["50%", "99%"], "TTFT (ms)": [100.0 * value, 150.0 * value]}
        averaged = {"metrics": metrics, "percentiles": percentiles}
        return {"value": value, "group_passes": {"1": passed}, "request_gate_passed": True,
                "success_rate": 100.0, "averaged_result": averaged}  # fmt: skip

    decision = {"selections": [{"selected_value": 2}],
                "probes": [probe(1, True, 50.0), probe(2, True, 80.0), probe(4, False, 90.0)]}  # fmt: skip
    result = perf.capacity_result(decision)
    assert result.metrics["perf_capacity"] == 2 and result.metrics["perf_capacity_output_tok_s"] == 80.0
    assert (
        result.metrics["perf_capacity_ttft_ms_p99"] == 300.0
        and result.metrics["perf_capacity_tpot_ms_mean"] == 40
    )
    rows = result.tables["perf_slo_probes.json"]
    assert [(r["concurrency"], r["meets_objective"]) for r in rows] == [(1, True), (2, True), (4, False)]
    nobody = perf.capacity_result(
        {"selections": [{"selected_value": None}], "probes": [probe(1, False, 9.0)]}
    )
    assert nobody.metrics["perf_capacity"] == 0 and "perf_capacity_output_tok_s" not in nobody.metrics


def test_answer_flips_count_samples_that_changed_side():
    from qsweep import stats

    base = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0, "e": 1.0}
    quantized = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0, "e": 0.0, "f": 1.0}  # f: not in both
    assert stats.flips(quantized, base) == (2, 1)


@pytest.mark.slow
def test_the_scheme_list_is_the_installed_compressed_tensors_presets():
    """The pre-flight's scheme list (methods/llmcompressor.py) against compressed-tensors itself, in
    the quantize stage environment the set-up built."""
    import subprocess

    from conftest import REAL_ENVS
    from qsweep.envs import QUANTIZE, StageEnv
    from qsweep.methods.llmcompressor import SCHEMES

    env = StageEnv(QUANTIZE.name, REAL_ENVS)
    code = (
        "import json; from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES as P; "
        "print(json.dumps(list(P)))"
    )
    done = subprocess.run(
        [env.python, "-c", code], capture_output=True, text=True, timeout=300, env=env.environ()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(SCHEMES) == sorted(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_damaged_cache_entry_is_reported_and_rebuilt_never_used(tmp_path, caplog):
    from qsweep.cache import ArtifactCache

    cache, builds = ArtifactCache(tmp_path), []

    def build(tmp):
        builds.append(1)
        (tmp / "model.gguf").write_bytes(b"x" * 1000)
        (tmp / "info.json").write_text("{}")

    entry = cache.entry("gguf", {"k": 1}, build, what="a file")
    assert cache.lookup("gguf", {"k": 1}).path == entry.path and len(builds) == 1
    # a killed build of the same key left its folder: the next build removes it
    leftover = tmp_path / "gguf" / f".tmp-{entry.manifest['key']}-99999"
    leftover.mkdir()
    (leftover / "model.gguf").write_bytes(b"half")
    with open(entry.path / "model.gguf", "r+b") as f:  # truncated to half, as a full disk would
        f.truncate(500)
    assert cache.lookup("gguf", {"k": 1}) is None
    assert "is damaged (model.gguf has 500 bytes, 1000 were written)" in caplog.text
    again = cache.entry("gguf", {"k": 1}, build, what="a file")  # looks again, twice: said once
    assert caplog.text.count("is damaged") == 1
    assert not again.hit and len(builds) == 2 and (again.path / "model.gguf").stat().st_size == 1000
    assert not leftover.exists()
    # edited in place with the same size: found by its hash once its time changed
    (again.path / "model.gguf").write_bytes(b"y" * 1000)
    assert cache.lookup("gguf", {"k": 1}) is None and "was changed after it was written" in caplog.text
    # an entry made before files were recorded is taken as it is
    manifest = json.loads((again.path / "qsweep-manifest.json").read_text())
    del manifest["files"]
    (again.path / "qsweep-manifest.json").write_text(json.dumps(manifest))
    assert cache.lookup("gguf", {"k": 1}) is not None


def test_sanity_checks_flag_what_cannot_be_right():
    from qsweep import sanity

    assert sanity.degenerate("1 1 1 1 1 1 1 1") and sanity.degenerate("   ")
    assert not sanity.degenerate(" Paris, the city of light.") and not sanity.degenerate("Paris Paris")
    assert not sanity.degenerate(None)  # no chat endpoint: nothing to judge
    reasons = sanity.job_reasons({"ppl": 7443.0, "perf_success_rate_min": 0.5, "perf_cpu_busy_during": 0.6},
                                 "1 1 1 1 1 1 1 1", is_baseline=True)  # fmt: skip
    assert [r.split(" ")[0] for r in reasons] == ["the", "baseline", "50%", "60%"], reasons
    assert sanity.job_reasons({"ppl": 13.05, "perf_success_rate_min": 1.0}, " Paris.", False) == []
    # the seed's SmolLM2 baselines agree within 0.4% across engines; a broken conversion does not
    assert sanity.baselines_disagree({"llamacpp": 12.93, "vllm": 12.885}) is None
    assert "differs by over 1%" in sanity.baselines_disagree({"llamacpp": 11.74, "vllm": 7443.0})


def test_baselines_that_disagree_across_engines_are_both_flagged():
    from types import SimpleNamespace

    from qsweep.sweep import flag_disagreeing_baselines

    def run(engine, ppl, baseline="true"):
        tags = {"qsweep.baseline": baseline, "choice.engine": engine}
        params = {"benchmark.ppl.n_ctx": "512", "model.path": "None"}
        info = SimpleNamespace(status="FINISHED", run_id=engine + baseline)
        data = SimpleNamespace(tags=tags, params=params, metrics={"ppl": ppl})
        return SimpleNamespace(info=info, data=data)

    tagged = {}
    client = SimpleNamespace(set_tag=lambda run_id, key, value: tagged.update({run_id: value}))
    flag_disagreeing_baselines(
        client, [run("llamacpp", 11.74), run("vllm", 7443.0), run("vllm", 9.0, "false")]
    )
    assert (
        set(tagged) == {"llamacpptrue", "vllmtrue"}
        and "llamacpp 11.7400, vllm 7443.0000" in tagged["vllmtrue"]
    )
    tagged.clear()
    flag_disagreeing_baselines(client, [run("llamacpp", 12.93), run("vllm", 12.885)])
    assert tagged == {}


def test_a_gguf_shipped_in_chunks_is_read_before_anything_runs():
    """The pre-flight reads Gemma-3-270M's shape from its first chunk's header (the chunks come
    from four PyPI packages); a malformed chunk entry is one clear line."""
    from qsweep import models

    cfg = models.from_conf("gemma3-270m")
    shape = models.shape(cfg)
    assert shape.context == 32768 and shape.widths == (640, 4 * 256, 2048)
    names = [p.name for p in models.source_files(cfg)]
    assert names == [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    import dataclasses

    broken = dataclasses.replace(cfg, gguf_parts=["no-colon-here"])
    with pytest.raises(QsweepError, match="is not 'package:path/in/package'"):
        models.source_files(broken)


def test_only_a_locked_sqlite_store_is_waited_out(monkeypatch):
    """MLflow's wrapping of SQLite's lock error is retried until it passes; any other error, even
    one that mentions a lock, is raised at once."""
    import sqlite3

    from qsweep import tracking

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            try:
                raise sqlite3.OperationalError("database is locked")
            except sqlite3.OperationalError as err:
                raise RuntimeError("(sqlite3.OperationalError) see above") from err
        return "done"

    assert tracking.patiently(locked_twice, "log") == "done" and len(calls) == 3

    def other():
        calls.append(1)
        raise RuntimeError("the run is locked for edits by a policy")

    calls.clear()
    with pytest.raises(RuntimeError, match="policy"):
        tracking.patiently(other, "log")
    assert len(calls) == 1


def test_server_watch_notices_a_silent_server_without_ever_blocking(tmp_path):
    """A server that accepts connections but never replies (SIGSTOPped, hung): the watch reports
    it once request_timeout_s has passed, and each question to the watch returns at once."""
    import socket
    from types import SimpleNamespace

    from qsweep.measure import ServerWatch

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # connections queue up; nothing ever answers
        served = SimpleNamespace(process=None, url=f"http://127.0.0.1:{hung.getsockname()[1]}",
                                 log=tmp_path / "server.log")  # fmt: skip
        with ServerWatch(served, timeout_s=1.0) as watch:
            assert watch() is None
            deadline, slowest, reason = time.monotonic() + 10, 0.0, None
            while reason is None and time.monotonic() < deadline:
                asked = time.monotonic()
                reason = watch()
                slowest = max(slowest, time.monotonic() - asked)
                time.sleep(0.05)
    assert reason and reason.startswith("the server stopped answering (no /health reply for")
    assert slowest < 0.1, slowest


def _entry(cache, kind: str, name: str, size: int):
    return cache.entry(kind, {"name": name}, lambda tmp: (tmp / "data.bin").write_bytes(b"x" * size) and None,
                       what=f"{kind} {name}")  # fmt: skip


def test_cache_listing_says_what_each_entry_is_its_size_and_last_use(tmp_path):
    from qsweep.cache import ArtifactCache, admin, used_marker

    cache = ArtifactCache(tmp_path)
    old = _entry(cache, "gguf", "old", 3000)
    _entry(cache, "models", "recent", 5000)
    week_ago = time.time() - 7 * 86400
    os.utime(used_marker(old.path), (week_ago, week_ago))
    infos = {i.what: i for i in admin.entries(tmp_path)}
    assert set(infos) == {"gguf old", "models recent"}
    assert infos["gguf old"].size == 3000 and infos["models recent"].size == 5000
    assert infos["gguf old"].last_used == pytest.approx(week_ago, abs=1)
    assert cache.lookup("gguf", {"name": "old"}) is not None  # a use moves its last use to now
    assert next(i for i in admin.entries(tmp_path) if i.what == "gguf old").last_used > week_ago + 1000


def test_cache_verify_finds_a_changed_file_and_trim_removes_by_age_then_size(tmp_path):
    from qsweep.cache import ArtifactCache, admin, used_marker

    cache = ArtifactCache(tmp_path)
    made = {name: _entry(cache, "gguf", name, size) for name, size in (("a", 4000), ("b", 3000), ("c", 2000))}
    for days, name in ((40, "a"), (10, "b"), (1, "c")):
        then = time.time() - days * 86400
        os.utime(used_marker(made[name].path), (then, then))
    with open(made["c"].path / "data.bin", "r+b") as f:
        f.truncate(10)
    assert [(i.what, why) for i, why in admin.verify(tmp_path)] == [
        ("gguf c", "data.bin has 10 bytes, 2000 were written")
    ]
    infos = list(admin.entries(tmp_path))
    assert [i.what for i in admin.to_trim(infos, older_than_s=30 * 86400, max_bytes=None)] == ["gguf a"]
    # by size: least recently used first until the rest fit
    assert [i.what for i in admin.to_trim(infos, older_than_s=None, max_bytes=2500)] == ["gguf a", "gguf b"]


def test_cache_trim_leaves_an_entry_a_sweep_holds_and_removes_the_rest_whole(tmp_path):
    import fcntl

    from qsweep.cache import ArtifactCache, admin

    cache = ArtifactCache(tmp_path)
    busy, idle = _entry(cache, "gguf", "busy", 100), _entry(cache, "gguf", "idle", 100)
    infos = {i.what: i for i in admin.entries(tmp_path)}
    with open(busy.path.with_name(f"{busy.path.name}.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a sweep building or reading it
        assert admin.remove(infos["gguf busy"]) is False
    assert admin.remove(infos["gguf idle"]) is True
    assert busy.path.is_dir() and not idle.path.exists()
    assert not list(tmp_path.glob("gguf/.old-*")), "nothing half-deleted is left"
    assert cache.lookup("gguf", {"name": "idle"}) is None


def test_cache_command_lists_and_verifies(tmp_path, capsys):
    from qsweep.cache import ArtifactCache
    from qsweep.cache.__main__ import main

    _entry(ArtifactCache(tmp_path / "artifacts"), "gguf", "q4", 1234)
    paths = [f"paths.artifact_cache={tmp_path / 'artifacts'}", f"paths.model_cache={tmp_path / 'models'}"]
    assert main(["list", *paths]) == 0
    listed = capsys.readouterr().out
    assert "gguf q4 (" in listed and "1 entries, 0.0 MB" in listed
    assert main(["verify", *paths]) == 0 and "1 entries checked, all intact" in capsys.readouterr().out


def test_environment_scans_survive_another_thread_setting_and_unsetting_a_variable(tmp_path):
    """MLflow's telemetry thread sets and unsets a variable while jobs run: a plain scan of
    os.environ then fails now and then (shown first, so the setting is known to provoke it); qsweep's
    scans (`environ.snapshot`, the secrets `redact` masks, a stage environment's variables) never do."""
    import sys
    import threading

    from qsweep import environ, redact

    stage = envs.StageEnv("llamacpp", tmp_path)
    scans = {
        "environ.snapshot": environ.snapshot,
        "redact.environment_secrets": redact.environment_secrets,
        "StageEnv.environ": stage.environ,
    }
    stop, switch = threading.Event(), sys.getswitchinterval()

    def toggle() -> None:
        while not stop.is_set():
            os.environ["_QSWEEP_TELEMETRY_LIKE"] = "x"
            del os.environ["_QSWEEP_TELEMETRY_LIKE"]

    def failures(scan, seconds: float, until_first: bool = False) -> int:
        count, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline and not (until_first and count):
            try:
                scan()
            except (KeyError, RuntimeError):
                count += 1
        return count

    thread = threading.Thread(target=toggle, daemon=True)
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows in milliseconds
    thread.start()
    try:
        naive = failures(lambda: [v for _, v in os.environ.items()], 10.0, until_first=True)
        assert naive, "the naive scan never failed: this test no longer provokes the race"
        assert {name: failures(scan, 1.0) for name, scan in scans.items()} == dict.fromkeys(scans, 0)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch)
        os.environ.pop("_QSWEEP_TELEMETRY_LIKE", None)


def test_a_new_sqlite_store_is_made_whole_or_not_at_all(tmp_path, monkeypatch):
    """MLflow's migrations make a new store beside it, then it is renamed into place: a process
    killed during them (here: failing) leaves no store that no later MLflow can open."""
    import mlflow.tracking

    store = tmp_path / "mlruns" / "mlflow.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    real = mlflow.tracking.MlflowClient

    class Killed(Exception):
        pass

    class DiesMidMigration(real):
        def search_experiments(self, *args, **kwargs):
            raise Killed

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", DiesMidMigration)
    with pytest.raises(Killed):
        tracking.create_sqlite_store(uri)
    assert list(store.parent.iterdir()) == []  # neither the store nor the file it was made in
    monkeypatch.setattr(mlflow.tracking, "MlflowClient", real)
    (store.parent / ".mlflow.db.tmp-1-dead").write_text("a killed creation's half-made file")
    tracking.create_sqlite_store(uri)
    assert store.is_file() and [p.name for p in store.parent.iterdir()] == ["mlflow.db"]
    assert real(tracking_uri=uri).get_experiment_by_name("Default") is not None


def test_front_end_build_settings_replace_what_an_earlier_set_up_appended(tmp_path):
    """The extracted sdist is kept between builds: its CMakeLists.txt gets one qsweep block, the
    current one, whatever an earlier set-up appended (here: the unity-only block of 2026-12-07)."""
    cmake = tmp_path / "vendor" / "llama.cpp" / "CMakeLists.txt"
    cmake.parent.mkdir(parents=True)
    upstream = "project(llama)\ninstall(FILES llama.pc DESTINATION lib)\n"
    earlier = "\n# qsweep: unity builds for the C++ front ends (qsweep/envs.py)\nforeach(x)\n"
    cmake.write_text(upstream + earlier)
    envs.front_end_build_settings(tmp_path)
    envs.front_end_build_settings(tmp_path)
    text = cmake.read_text()
    assert text.startswith(upstream) and text.count("# qsweep:") == 1 and "foreach(x)" not in text
    assert "target_compile_options(${target} PRIVATE -O1)" in text
    assert "foreach(target llama-common mtmd server-context llama-server-impl cpp-httplib)" in text


def test_an_interrupt_after_the_last_run_closed_keeps_the_recorded_outcome(monkeypatch, capsys):
    """Ctrl-C landing after the sweep's last run was set FINISHED in the store but before this
    process forgot it (a race the chaos test found): exit 0 with every run FINISHED, not 130 with
    nothing marked KILLED."""
    from types import SimpleNamespace

    from qsweep import cli

    store = {"job": "RUNNING", "parent": "RUNNING"}
    client = SimpleNamespace(
        get_run=lambda run_id: SimpleNamespace(
            info=SimpleNamespace(status=store[run_id]), data=SimpleNamespace(tags={})
        ),
        set_terminated=lambda run_id, status: store.__setitem__(run_id, status),
        set_tag=lambda *args: None,
    )
    monkeypatch.setattr(tracking, "_open_runs", {})
    monkeypatch.setattr(tracking, "_closed_statuses", [])

    def sweep():
        tracking.opened(client, "parent")
        tracking.opened(client, "job")
        tracking.terminate(client, "job", "FINISHED")
        # the parent closed in the store; the interrupt lands before this process forgets it
        client.set_terminated("parent", "FINISHED")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "hydra_main", sweep)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the test process keeps its handlers
    with pytest.raises(SystemExit) as done:
        cli.run_hydra()
    assert done.value.code == 0 and store == {"job": "FINISHED", "parent": "FINISHED"}
    assert "interrupted after every run was recorded" in capsys.readouterr().err
    assert tracking.open_runs() == [] and tracking.closed_statuses() == ["FINISHED", "FINISHED"]
