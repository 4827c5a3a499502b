"""The serving benchmark (issue 7): its pieces, and a ``--smoke`` run of every system.

No timing thresholds here: speed is asserted by the benchmark's full mode. The smoke
test checks that every system ran, produced exactly the requested tokens, and that
every ratio was computed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from benchmarks import llamacpp
from benchmarks.clients import OpenAIStreamClient
from benchmarks.metrics import RequestRecord, percentile, summarize
from benchmarks.serving import ALL_SYSTEMS, PEER_PACKAGES
from tests.procs import REPO_ROOT


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_record_gaps_count_tokens_sharing_a_message_as_zero():
    r = RequestRecord(prompt_index=0, start_s=10.0)
    r.on_tokens(10.5, 1)
    r.on_tokens(10.6, 2)  # two tokens in one message
    r.on_tokens(10.9, 1)
    r.end_s = 10.9
    assert r.ttft_s == pytest.approx(0.5)
    assert r.tokens == 4
    assert r.gaps_s == pytest.approx([0.1, 0.0, 0.3])
    s = summarize([r], expected_tokens=4)
    assert s["generated_tokens"] == 4 and s["short_requests"] == 0
    assert s["tokens_per_s"] == pytest.approx(4 / 0.9, rel=1e-3)
    assert s["ttft_ms"]["p50"] == pytest.approx(500.0)


def test_summary_reports_errors_and_short_requests():
    ok = RequestRecord(prompt_index=0, start_s=0.0)
    ok.on_tokens(1.0, 3)
    ok.end_s = 1.0
    bad = RequestRecord(prompt_index=1, start_s=0.0, error="UNAVAILABLE: no worker")
    s = summarize([ok, bad], expected_tokens=4)
    assert s["completed"] == 1 and s["errors"] == 1
    assert s["first_errors"] == ["UNAVAILABLE: no worker"]
    assert s["short_requests"] == 1


def test_sse_events_reconcile_the_final_usage():
    r = RequestRecord(prompt_index=0, start_s=0.0)
    chunk = b'data: {"choices": [{"index": 0, "text": " Paris"}]}'
    assert not OpenAIStreamClient._on_event(chunk, 0.2, r)
    assert not OpenAIStreamClient._on_event(chunk, 0.3, r)
    final = (
        b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}], '
        b'"usage": {"completion_tokens": 3, "prompt_tokens": 5}}'
    )
    assert OpenAIStreamClient._on_event(final, 0.4, r)
    # A token with no visible text arrived with a neighbour: counted, 0 gap.
    assert r.tokens == 3 and r.server_tokens == 3
    assert r.gaps_s == pytest.approx([0.1, 0.0])
    assert r.end_s == 0.4
    with pytest.raises(RuntimeError, match="boom"):
        OpenAIStreamClient._on_event(b'data: {"error": "boom"}', 0.5, r)


def test_workload_is_seeded_and_within_lengths():
    from benchmarks.workload import build_workload, count_tokens, load_tokenizer
    from common.models import resolve_model

    tok = load_tokenizer(resolve_model(None).path)
    a = build_workload(tok, 12, 8, seed=3, min_prompt_tokens=16, max_prompt_tokens=200)
    b = build_workload(tok, 12, 8, seed=3, min_prompt_tokens=16, max_prompt_tokens=200)
    c = build_workload(tok, 12, 8, seed=4, min_prompt_tokens=16, max_prompt_tokens=200)
    assert a == b
    assert [p.text for p in a.prompts] != [p.text for p in c.prompts]
    lengths = [p.prompt_tokens for p in a.prompts]
    # Re-encoding at the cut can move a length by a token or two.
    assert all(14 <= n <= 202 for n in lengths)
    assert max(lengths) - min(lengths) > 20  # mixed lengths, not one size
    assert all(count_tokens(tok, p.text) == p.prompt_tokens for p in a.prompts)
    # The worker tokenises with transformers: the counts must agree.
    from common.models import load_tokenizer as hf_tokenizer

    hf = hf_tokenizer(resolve_model(None))
    assert [len(hf(p.text, add_special_tokens=True)["input_ids"]) for p in a.prompts] == lengths


def _round(tokens_per_s: float, transport_p50_ms: float = 1.0) -> dict:
    return {
        "tokens_per_s": tokens_per_s,
        "ttft_ms": {"p50": 100.0},
        "client_minus_server_ttft_ms": {"p50": transport_p50_ms, "p99": transport_p50_ms},
        "errors": 0,
        "requests": 8,
        "completed": 8,
        "first_errors": [],
    }


def test_rounds_combine_to_the_median_round_and_count_every_request():
    from benchmarks.serving import combine_rounds

    level = combine_rounds([_round(100.0), _round(80.0), _round(120.0)])
    assert level["tokens_per_s"] == 100.0
    assert [r["tokens_per_s"] for r in level["rounds"]] == [100.0, 80.0, 120.0]
    assert level["requests"] == level["completed"] == 24
    single = _round(90.0)
    assert combine_rounds([single]) is single  # one round: no rounds key


def test_ratios_of_interleaved_systems_pair_each_round():
    from benchmarks.serving import Settings, combine_rounds, compute_ratios

    # The machine slows in round 2: each round's ratio is 0.9, the medians' ratio is not.
    limit = combine_rounds([_round(100.0, 1.0), _round(50.0, 1.0), _round(120.0, 1.0)])
    ours = combine_rounds([_round(90.0, 3.0), _round(45.0, 4.0), _round(108.0, 5.0)])
    direct = combine_rounds([_round(95.0, 1.5), _round(48.0, 1.5), _round(110.0, 1.5)])
    systems = {
        name: {"status": "ok", "levels": {"32": level | {"concurrency": 32}}}
        for name, level in (("limit", limit), ("ours1", ours), ("direct", direct))
    }
    naive = _round(18.0)
    systems["naive"] = {"status": "ok", "levels": {"32": naive}}
    ratios = compute_ratios(systems, Settings(concurrency=(32,)))
    assert ratios["ours_limit_throughput"]["32"] == 0.9
    # A system measured once compares with the other's median round.
    assert ratios["ours_naive_throughput"]["32"] == 5.0
    assert ratios["router_ttft_overhead_ms"]["p50"] == 2.5  # median of 1.5, 2.5, 3.5


def test_a_system_measured_in_fewer_rounds_pairs_with_the_same_rounds():
    from benchmarks.serving import Settings, combine_rounds, compute_ratios

    ours = combine_rounds([_round(100.0), _round(50.0), _round(120.0)])
    # naive ran in rounds 0 and 1 only, each at a fifth of ours: the medians' ratio
    # (100 / 30 = 3.3) would mistake the slow round for naive's speed.
    naive = combine_rounds([_round(20.0), _round(10.0)])
    systems = {
        "ours1": {"status": "ok", "levels": {"32": ours}},
        "naive": {"status": "ok", "levels": {"32": naive}},
    }
    ratios = compute_ratios(systems, Settings(concurrency=(32,)))
    assert ratios["ours_naive_throughput"]["32"] == 5.0


def test_judged_levels_get_every_round():
    from benchmarks.serving import Settings

    s = Settings(concurrency=(1, 8, 32, 64), rounds=5, naive_rounds=3)
    by_system = {x: [s.rounds_at(c, x) for c in s.concurrency] for x in ALL_SYSTEMS}
    assert by_system == {
        "limit": [5, 1, 5, 1],
        # ours/llama.cpp is judged at every level: llamacpp_rounds (3) where nothing else is.
        "ours1": [5, 3, 5, 3],
        "direct": [5, 1, 5, 1],
        "peer": [1, 1, 5, 1],  # judged against ours1 at the target concurrency only
        "llamacpp_q4": [3, 3, 5, 3],
        "llamacpp_f32": [3, 3, 5, 3],
        "naive": [1, 1, 3, 1],
        "ours2": [1, 1, 1, 1],
        "null": [1, 1, 1, 1],
        "null_interval": [1, 1, 1, 1],
    }
    # Without the llama.cpp systems, ours1 runs once where nothing judges it.
    s = Settings(concurrency=(1, 8, 32, 64), systems=("limit", "ours1", "direct"))
    assert [s.rounds_at(c, "ours1") for c in s.concurrency] == [5, 1, 5, 1]


def test_schedule_rotates_the_order_and_runs_ours2_after():
    from benchmarks.serving import ModelPhase, Settings

    s = Settings(concurrency=(1, 32), rounds=3, naive_rounds=2, llamacpp_rounds=2)
    phase = ModelPhase(s, workload=None, registry=None)  # type: ignore[arg-type]
    schedule = phase.schedule()
    at_32 = [(system, r) for system, c, _, r in schedule if c == 32 and system != "ours2"]
    q4, f32 = "llamacpp_q4", "llamacpp_f32"
    assert at_32 == [
        ("limit", 0), ("ours1", 0), ("direct", 0), ("peer", 0), (q4, 0), (f32, 0), ("naive", 0),
        ("ours1", 1), ("direct", 1), ("peer", 1), (q4, 1), (f32, 1), ("naive", 1), ("limit", 1),
        ("direct", 2), ("peer", 2), (q4, 2), (f32, 2), ("limit", 2), ("ours1", 2),
    ]  # fmt: skip
    at_1 = [system for system, c, _, _ in schedule if c == 1]
    assert Counter(at_1) == {
        "limit": 3, "ours1": 3, "direct": 3, "peer": 1, q4: 2, f32: 2, "naive": 1, "ours2": 1
    }  # fmt: skip
    assert [x for x, *_ in schedule[-2:]] == ["ours2", "ours2"]


def test_smoke_runs_every_system_and_computes_every_ratio(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.Popen(
        # Two rounds: the interleaved limit / ours1 / direct path runs for real.
        [
            sys.executable,
            "-m",
            "benchmarks.serving",
            "--smoke",
            "--rounds",
            "2",
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        log, _ = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the benchmark stop every server it started.
        os.killpg(proc.pid, signal.SIGTERM)
        log, _ = proc.communicate(timeout=30)
        pytest.fail(f"smoke run timed out:\n{log[-5000:]}")
    assert proc.returncode == 0, log[-5000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke"
    assert "system " in log and "targets:" in log  # the table was printed

    peer_available = all(importlib.util.find_spec(m) for m in PEER_PACKAGES)
    # Built by `make bench` only: absent, the llama.cpp systems skip with the command.
    llamacpp_available = llamacpp.server_skip_reason(llamacpp.DEFAULT_SERVER) is None
    systems = report["systems"]
    assert set(systems) == set(ALL_SYSTEMS)
    for name, result in systems.items():
        if name == "peer" and not peer_available:
            assert result["status"] == "skipped"
            assert "pip install" in result["reason"], result
            continue
        if name in llamacpp.SYSTEMS and not llamacpp_available:
            assert result["status"] == "skipped"
            assert "install_llama_cpp.sh" in result["reason"], result
            continue
        assert result["status"] == "ok", (name, result)
        for level in result["levels"].values():
            assert level["completed"] == level["requests"] > 0, (name, level)
            assert level["errors"] == 0, (name, level)
            # ignore_eos: every request generated exactly max_new_tokens.
            assert level["short_requests"] == 0, (name, level)
            assert level["tokens_per_s"] > 0
            assert level["ttft_ms"]["p50"] is not None
            assert level["itl_ms"]["p50"] is not None
        for proc_name, info in result["processes"].items():
            assert info["peak_rss_mb"] and info["peak_rss_mb"] > 0, (name, proc_name)

    ratios = report["ratios"]
    (c,) = report["settings"]["concurrency"]
    for name in ("limit", "ours1", "direct"):
        rounds = systems[name]["levels"][str(c)]["rounds"]
        assert len(rounds) == 2 and all(r["tokens_per_s"] > 0 for r in rounds), (name, rounds)
    for key in ("ours_limit_throughput", "ours2_limit_throughput", "ours_naive_throughput"):
        assert ratios[key][str(c)] is not None, key
    for key in ("ours_peer_throughput", "ours_peer_ttft_p50"):
        assert (ratios[key][str(c)] is not None) == peer_available, key
    for key in ("ours_llamacpp_throughput", "ours_llamacpp_ttft_p50"):
        assert (ratios[key][str(c)] is not None) == llamacpp_available, key
    assert ratios["router_ttft_overhead_ms"]["p50"] is not None
    assert ratios["router_ttft_overhead_ms"]["p99"] is not None
    assert ratios["null_tokens_per_s"]["value"] > 0
    assert ratios["null_tokens_per_s"]["value_with_interval"] > 0
    assert ratios["router_peak_rss_mb"]["max"] > 0
    assert {t["status"] for t in report["targets"]} <= {"PASS", "MISS", "n/a"}


def test_llamacpp_systems_skip_with_the_build_command_when_llama_server_is_absent(tmp_path):
    from benchmarks.serving import ModelPhase, Settings

    s = Settings(systems=("ours1", *llamacpp.SYSTEMS), llama_server=str(tmp_path / "none"))
    reasons = ModelPhase(s, workload=None, registry=None).skip_reasons()  # type: ignore[arg-type]
    assert set(reasons) == set(llamacpp.SYSTEMS)
    assert all("bash scripts/install_llama_cpp.sh" in r for r in reasons.values()), reasons


def test_ours_against_llamacpp_takes_each_metric_from_the_best_configuration():
    from benchmarks.serving import Settings, combine_rounds, compute_ratios, evaluate_targets

    def level(tokens_per_s: float, ttft_p50_ms: float) -> dict:
        return _round(tokens_per_s) | {"ttft_ms": {"p50": ttft_p50_ms}}

    # Q4 decodes faster, F32 answers first: tokens/s is judged against Q4, TTFT against F32.
    systems = {
        "ours1": {"status": "ok", "levels": {"1": level(25.0, 250.0), "8": level(100.0, 900.0)}},
        "llamacpp_q4": {"status": "ok", "levels": {"1": level(40.0, 800.0)}},
        "llamacpp_f32": {"status": "ok", "levels": {"1": level(30.0, 350.0)}},
    }
    # Paired by round where both ran in rounds: each round's ratio, then the median.
    systems["ours1"]["levels"]["32"] = combine_rounds([level(100.0, 2000.0), level(50.0, 3000.0)])
    systems["llamacpp_f32"]["levels"]["32"] = combine_rounds(
        [level(80.0, 4000.0), level(50.0, 2000.0)]
    )
    settings = Settings(concurrency=(1, 8, 32))
    ratios = compute_ratios(systems, settings)
    assert ratios["ours_llamacpp_throughput"] == {"1": 0.625, "8": None, "32": 1.125}
    assert ratios["ours_llamacpp_ttft_p50"] == {"1": round(250 / 350, 3), "8": None, "32": 1.0}
    assert ratios["llamacpp_best"]["1"] == {"throughput": "llamacpp_q4", "ttft_p50": "llamacpp_f32"}
    assert ratios["llamacpp_best"]["8"] is None
    targets = {
        (t["name"], t["at"]): t["status"]
        for t in evaluate_targets(ratios, settings)
        if "llama.cpp" in t["name"]
    }
    assert targets == {
        ("ours/best llama.cpp throughput", "1 stream(s)"): "MISS",
        ("ours/best llama.cpp throughput", "8 stream(s)"): "n/a",
        ("ours/best llama.cpp throughput", "32 stream(s)"): "MISS",
        ("ours/best llama.cpp TTFT p50", "1 stream(s)"): "PASS",
        ("ours/best llama.cpp TTFT p50", "8 stream(s)"): "n/a",
        ("ours/best llama.cpp TTFT p50", "32 stream(s)"): "PASS",
    }


def test_f32_gguf_keeps_the_metadata_and_dequantises_every_tensor(tmp_path):
    """A small Q4_1 + Q8_0 + F32 GGUF written with the gguf package: its F32 copy has the
    same keys and values (but file_type), and each tensor equals gguf's de-quantisation."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    source = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    writer.add_block_count(1)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    writer.add_token_list(["<a>", "<b>", "c"])
    writer.add_chat_template("{{ messages }}")
    weights = {
        "q4.weight": (rng.standard_normal((8, 64)), gguf.GGMLQuantizationType.Q4_1),
        "q8.weight": (rng.standard_normal((4, 32)), gguf.GGMLQuantizationType.Q8_0),
        "norm.weight": (rng.standard_normal(16), gguf.GGMLQuantizationType.F32),
    }
    for name, (values, qtype) in weights.items():
        data = gguf.quants.quantize(values.astype(np.float32), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    dest = llamacpp.ensure_f32_gguf(source, tmp_path / "small.f32.gguf")
    src, out = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(dest))
    assert out.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    for key, field in src.fields.items():
        if key != "general.file_type" and not key.startswith("GGUF."):
            assert out.fields[key].contents() == field.contents(), key
    assert [t.name for t in out.tensors] == list(weights)
    for a, b in zip(src.tensors, out.tensors, strict=True):
        assert b.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(a.shape) == list(b.shape), a.name
        expected = gguf.quants.dequantize(a.data, a.tensor_type)
        np.testing.assert_array_equal(np.asarray(b.data), expected)
    # Cached: a second call returns the file as it is.
    mtime = dest.stat().st_mtime_ns
    assert llamacpp.ensure_f32_gguf(source, dest) == dest and dest.stat().st_mtime_ns == mtime


@pytest.mark.benchmark
@pytest.mark.skipif(
    llamacpp.server_skip_reason(llamacpp.DEFAULT_SERVER) is not None,
    reason="llama-server not built (bash scripts/install_llama_cpp.sh, run by make bench)",
)
def test_llamacpp_systems_tiny_stream_every_token_with_slots_per_level(tmp_path):
    """Both llama.cpp systems in a tiny run at two levels: every request streams exactly
    max_new_tokens (ignore_eos), and each level ran on its own server with slots = its
    concurrency."""
    out = tmp_path / "llamacpp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.serving", "--smoke",
         "--systems", ",".join(llamacpp.SYSTEMS), "--concurrency", "1,2", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    systems = json.loads(out.read_text())["systems"]
    for name in llamacpp.SYSTEMS:
        result = systems[name]
        assert result["status"] == "ok", (name, result)
        assert set(result["levels"]) == {"1", "2"}
        for level in result["levels"].values():
            assert level["completed"] == level["requests"] > 0, (name, level)
            assert level["errors"] == 0 and level["short_requests"] == 0, (name, level)
            assert level["generated_tokens"] == level["requests"] * 4, (name, level)
        assert set(result["processes"]) == {f"{name}-np1", f"{name}-np2"}
        assert all(p["peak_rss_mb"] > 0 for p in result["processes"].values()), result


@pytest.mark.benchmark
def test_structured_benchmark_tiny_reports_both_rates_mask_cost_and_ratio(tmp_path):
    """``python -m benchmarks.structured`` in a tiny configuration: both phases ran, the
    constrained and free rates, the per-step mask cost and the mixed/free ratio are
    reported, and the completed constrained outputs validate against the schema."""
    out = tmp_path / "structured.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.structured", "--streams", "2", "--requests", "2",
         "--rounds", "1", "--max-new-tokens", "48", "--no-fail", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["streams"] == 2 and report["constrained_streams"] == 1
    assert report["errors"] == []
    for key in ("free_tokens_per_s", "mixed_constrained_tokens_per_s", "mixed_free_tokens_per_s"):
        assert report[key] > 0, key
    assert report["mixed_free_ratio"] > 0
    assert report["mask_ms_per_step"]["p50"] > 0 and report["mask_ms_per_step"]["rows_p50"] == 1
    assert report["constrained_completed"] > 0
    assert report["constrained_valid"] == report["constrained_checked"]
    assert "mixed/free" in proc.stdout


@pytest.mark.benchmark
def test_fleet_benchmark_tiny_reports_per_token_router_cost(tmp_path):
    """``python -m benchmarks.fleet`` with 1 and 2 routers over 2 null workers: every
    stream completes and each row reports achieved vs offered tokens/s and CPU per token."""
    out = tmp_path / "fleet.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fleet", "--routers", "1", "2", "--workers", "2",
         "--streams-per-worker", "4", "--tokens", "8", "--requests-per-stream", "1",
         "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["routers"], r["workers"]) for r in results] == [(1, 2), (2, 2)]
    for r in results:
        assert r["errors"] == 0 and r["tokens"] == 8 * 8
        assert r["offered_tokens_per_s"] == 8 * 1000 / 20.0
        assert r["tokens_per_s"] > 0 and r["router_us_per_token"] is not None
        assert set(r["cpu_s"]) >= {f"router-{i}" for i in range(r["routers"])}


def test_weights_reach_our_workers_and_limit_and_bad_values_are_refused():
    import argparse

    from benchmarks.serving import Settings, add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--weights", "int4", "--concurrency", "1"]))
    assert settings.weights == "int4"
    assert Settings().weights == "auto"
    with pytest.raises(ValueError, match="weights must be one of auto, fp32, bf16, int8, int4"):
        Settings(weights="int3")
    with pytest.raises(SystemExit):
        parser.parse_args(["--weights", "int3"])
