"""The ranking benchmark runs end to end on a tiny bundle and reports every field (no timing asserts)."""

import json

import numpy as np
import pytest

from funnel.tools.bench_rank import format_report, interruption_report, main, run_benchmark


def test_bench_rank_reports_both_runtimes_and_breakdown(tiny_bundle, tmp_path):
    out = tmp_path / "bench.json"
    report = run_benchmark(bundle=tiny_bundle, candidates=50, calls=20, users=4, warmup=2, profile_calls=8, host_probe_s=0.05, json_out=str(out))
    saved = json.loads(out.read_text())
    assert saved["setting"]["candidates"] == 50 and saved["setting"]["users"] == 4 and saved["setting"]["torch_threads"] == 1 and saved["setting"]["faiss_threads"] == 1
    for stage in ("rank_ms", "recall_ms"):
        for runtime in ("onnx", "torch"):
            for kind in ("wall", "cpu"):
                t = saved[stage][runtime][kind]
                assert 0 < t["median"] <= t["p99"]
    assert set(saved["meets_target"]) == {"onnx", "torch"} and set(saved["meets_target"]["onnx"]) == {"rank", "recall"}
    assert all(ratio > 0 for ratio in saved["onnx_over_torch"].values())
    callees, top = saved["breakdown"]["callees"], saved["breakdown"]["top"]
    # The direct callees plus rank's own code account for (nearly) all of rank's time.
    assert 0.9 < sum(callees.values()) <= 1.0 + 1e-3
    # The ONNX Runtime session runs inside order, out of the profiler's sight.
    assert any(name.endswith(":build_features") for name in top) and any(name.endswith(":order") for name in top), top
    assert all(0 < share <= 1 for share in top.values())
    assert "rank" in format_report(report) and "where the onnx ranking time goes" in format_report(report)
    assert saved["after_pause"] is None and "after a" not in format_report(report)
    host = saved["host"]
    assert host["per_s"] >= 0 and 0 <= host["share"] < 1 and host["median_us"] <= host["p99_us"]
    assert "host: a spinning thread was interrupted" in format_report(report)


def test_bench_rank_refuses_more_candidates_than_recall_returns(tiny_bundle):
    with pytest.raises(ValueError, match="fewer than --candidates"):
        run_benchmark(bundle=tiny_bundle, candidates=100_000, calls=1, users=2, warmup=0, profile_calls=1, host_probe_s=0)


def test_bench_rank_times_recall_at_the_given_counts(tiny_bundle):
    report = run_benchmark(
        bundle=tiny_bundle, candidates=10, calls=4, users=2, warmup=0, profile_calls=2, recall_candidates={"two_tower": 30, "popular": 0}, host_probe_s=0
    )
    counts = report["setting"]["recall_config"]
    assert counts["two_tower"] == 30 and counts["popular"] == 0
    assert "two_tower 30" in format_report(report)


def test_bench_rank_without_profiled_calls_has_no_breakdown(tiny_bundle):
    report = run_benchmark(bundle=tiny_bundle, candidates=10, calls=4, users=2, warmup=0, profile_calls=0, host_probe_s=0)
    assert report["breakdown"] is None and report["host"] is None
    text = format_report(report)
    assert "onnx / torch" in text and "where the onnx ranking time goes" not in text


def test_bench_rank_times_calls_after_a_pause(tiny_bundle):
    report = run_benchmark(bundle=tiny_bundle, candidates=10, calls=8, users=2, warmup=0, profile_calls=0, pause_ms=2, pause_calls=4, host_probe_s=0)
    paused = report["after_pause"]
    assert paused["pause_ms"] == 2 and paused["calls"] == 4
    for stage in ("rank_ms", "recall_ms"):
        for runtime in ("onnx", "torch"):
            assert 0 < paused[stage][runtime]["wall"]["median"] <= paused[stage][runtime]["wall"]["p99"]
            assert paused["over_back_to_back"][runtime][stage.removesuffix("_ms")] > 0
    assert "after a 2 ms pause (spinning), 4 calls each" in format_report(report)


@pytest.mark.parametrize("pause_ms, pause_calls", [(-1, 200), (5, 0)])
def test_bench_rank_refuses_a_negative_pause(tiny_bundle, pause_ms, pause_calls):
    with pytest.raises(ValueError, match="pause_ms must be >= 0 and pause_calls >= 1"):
        run_benchmark(bundle=tiny_bundle, pause_ms=pause_ms, pause_calls=pause_calls)


def test_bench_rank_cli_reports_a_bad_pause_as_a_usage_error(tiny_bundle, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--bundle", tiny_bundle, "--pause-ms", "-1"])
    assert exit_.value.code == 2 and "error: pause_ms must be >= 0" in capsys.readouterr().err


def test_interruption_report_on_hand_computed_gaps():
    report = interruption_report(np.array([30e-6, 50e-6, 100e-6]), elapsed_s=0.5)
    # 3 gaps in 0.5 s; median 50 us; p99 interpolates 50 + 0.98 * 50; 180 us of 0.5 s.
    assert report == {"per_s": 6.0, "median_us": 50.0, "p99_us": 99.0, "share": 0.0004}
    assert interruption_report(np.array([]), elapsed_s=1.0) == {"per_s": 0.0, "median_us": 0.0, "p99_us": 0.0, "share": 0.0}
