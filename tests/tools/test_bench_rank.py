"""The ranking benchmark runs end to end on a tiny bundle and reports every field (no timing asserts)."""

import json

import pytest

from funnel.tools.bench_rank import format_report, run_benchmark


def test_bench_rank_reports_both_runtimes_and_breakdown(tiny_bundle, tmp_path):
    out = tmp_path / "bench.json"
    report = run_benchmark(bundle=tiny_bundle, candidates=50, calls=20, users=4, warmup=2, profile_calls=8, json_out=str(out))
    saved = json.loads(out.read_text())
    assert saved["setting"]["candidates"] == 50 and saved["setting"]["users"] == 4 and saved["setting"]["torch_threads"] == 1
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


def test_bench_rank_refuses_more_candidates_than_recall_returns(tiny_bundle):
    with pytest.raises(ValueError, match="fewer than --candidates"):
        run_benchmark(bundle=tiny_bundle, candidates=100_000, calls=1, users=2, warmup=0, profile_calls=1)


def test_bench_rank_times_recall_at_the_given_counts(tiny_bundle):
    report = run_benchmark(
        bundle=tiny_bundle, candidates=10, calls=4, users=2, warmup=0, profile_calls=2, recall_candidates={"two_tower": 30, "popular": 0}
    )
    counts = report["setting"]["recall_config"]
    assert counts["two_tower"] == 30 and counts["popular"] == 0
    assert "two_tower 30" in format_report(report)


def test_bench_rank_without_profiled_calls_has_no_breakdown(tiny_bundle):
    report = run_benchmark(bundle=tiny_bundle, candidates=10, calls=4, users=2, warmup=0, profile_calls=0)
    assert report["breakdown"] is None
    text = format_report(report)
    assert "onnx / torch" in text and "where the onnx ranking time goes" not in text
