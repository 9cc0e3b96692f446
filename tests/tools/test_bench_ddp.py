"""The DDP benchmark runs end to end on the tiny log and reports every field (no timing asserts)."""

import json

from funnel.tools.bench_ddp import format_report, run_benchmark


def test_bench_ddp_reports_both_sides_and_their_ratio(tiny_log_path, tmp_path):
    out = tmp_path / "ddp.json"
    report = run_benchmark(events=tiny_log_path, fmt="taobao", split="leave-last-out", samples=600, repeats=1, json_out=str(out))
    saved = json.loads(out.read_text())
    assert [r["processes"] for r in saved["runs"]["one"]] == [1] and [r["processes"] for r in saved["runs"]["many"]] == [2]
    assert all(r["threads"] == 1 and r["samples"] == 600 and r["samples_per_s"] > 0 for rs in saved["runs"].values() for r in rs)
    assert saved["speedup"] > 0 and "speed-up" in format_report(report)
