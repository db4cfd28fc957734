"""Benchmarks' pieces without a server: the fair serving preset, evalscope's and llm-compressor's
outputs read, gates, sanity checks, offline data, ordering, a GGUF shipped in chunks."""

from __future__ import annotations

import json
import math

import pytest

from qsweep.errors import QsweepError


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
