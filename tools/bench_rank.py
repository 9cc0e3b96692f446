"""``python -m funnel.tools.bench_rank``: cost of ranking one user's candidates on one CPU thread.

Every call is :meth:`rank.pipeline.TwoStage.rank` for one user and ``--candidates``
recall candidates (features, model forward, sort), as a server pays it per request.
Users are drawn from the bundle's log and their candidates come from the bundle's own
recall stage, computed once up front; calls cycle through the users so no call sees
warm caches for its own inputs only. As on the server, the request time is the
bundle's last event (the popularity features at that time are tabulated once), and
the items a user must not get are the user's history as an id array.

Both runtimes are measured in the same run, taking turns in rounds: ``onnx`` (ONNX
Runtime over the bundle's exports, what the server runs) and ``torch`` (the frozen
PyTorch models, the baseline). Recall, all channels, is timed for the same users.

Reported: median, p99 and mean milliseconds per call, wall-clock and this thread's
CPU time (on a shared machine the wall figure includes waiting for a core), per runtime
and stage against the per-request targets; the onnx/torch ratio of median CPU times;
and, from a separate profiled pass over the onnx path, the share of the ranking time in
each function ``rank`` calls (``features`` vs ``order``: the model's forward and the sort)
and in the most expensive functions anywhere beneath it.

A lone request on a server follows idle time, and on a shared virtual machine that
costs more than the code: the hypervisor interrupts a running vCPU (about a thousand
times a second on the hosts this was measured on) and whatever runs meanwhile evicts
the caches. ``--pause-ms`` also times calls that each follow that long a pause (the
thread spins, so the core never idles: what remains is the host's doing), and every
report says how often a spinning thread of this machine is interrupted
(:func:`probe_host`), so figures from different hosts can be read side by side.
"""

import argparse
import cProfile
import dataclasses
import os
import pstats
import time
from collections.abc import Callable, Sequence

import faiss
import numpy as np
import torch

from funnel.bundle import load_bundle
from funnel.rank.pipeline import TwoStage
from funnel.recall.plugin import Excluded
from funnel.recall.retriever import Candidates
from funnel.recall.runtime import RUNTIMES
from funnel.server.app import configure_threads
from funnel.tools.cli import add_candidates_argument
from funnel.tools.output import write_json

TARGET_MS = {"rank": 0.7, "recall": 0.5}
"""Per-request targets, median CPU or wall milliseconds on one thread."""
ROUNDS = 4
INTERRUPTION_US = 20.0
"""A gap between two clock reads of a spinning thread longer than this is an interruption (a
read takes well under a microsecond; a timer interrupt handled by the guest alone, a few)."""


@dataclasses.dataclass
class _Request:
    """One user's inputs to both stages, batch size 1."""

    window: object
    now: np.ndarray
    activity: np.ndarray
    exclude: np.ndarray
    candidates: Candidates


def run_benchmark(
    *,
    bundle: str,
    candidates: int = 200,
    calls: int = 2000,
    users: int = 64,
    warmup: int = 100,
    profile_calls: int = 300,
    seed: int = 0,
    recall_candidates: dict[str, int] | None = None,
    pause_ms: float = 0.0,
    pause_calls: int = 200,
    host_probe_s: float = 1.0,
    json_out: str | None = None,
) -> dict:
    """Time ranking ``candidates`` items for one user at a time on one thread.

    Args:
        bundle: bundle root or version directory.
        candidates: candidates per call (recall's merged list cut to this many).
        calls: timed ranking calls.
        users: distinct users cycled through.
        warmup: untimed calls first (allocator and caches).
        profile_calls: calls under cProfile for the breakdown (not timed); 0 skips it.
        seed: picks the users.
        recall_candidates: per-channel recall counts replacing the bundle's (as ``funnel serve --candidates``).
        pause_ms: when > 0, also time ``pause_calls`` calls per runtime and stage, each
            after spinning this many milliseconds (what a lone request pays).
        pause_calls: see ``pause_ms``.
        host_probe_s: seconds :func:`probe_host` spins for the ``host`` entry; 0 skips it.
        json_out: also write the report here (atomically).

    Returns:
        The report: ``setting``, ``rank_ms`` and ``recall_ms`` ({runtime: {"wall"|"cpu":
        median/p99/mean}}), ``onnx_over_torch`` ({"rank"|"recall": ratio of median CPU
        times}), ``target_ms``, ``meets_target`` ({runtime: {"rank"|"recall": bool}, by the
        median CPU time}) and ``breakdown`` (``callees`` and ``top``: shares of the onnx
        ranking time, see :func:`_breakdown`; None when ``profile_calls`` is 0),
        ``after_pause`` (None, or ``pause_ms``, ``calls``, ``rank_ms`` and ``recall_ms`` as
        above for the calls after a pause, and ``over_back_to_back``: {runtime: {stage:
        ratio of median wall times}}) and ``host`` (:func:`probe_host`; None when skipped).
    """
    if pause_ms < 0 or pause_calls < 1:
        raise ValueError(f"pause_ms must be >= 0 and pause_calls >= 1, got {pause_ms} and {pause_calls}")
    configure_threads(1)  # as a server process with one core: torch and faiss on one thread
    b = load_bundle(bundle, candidates=recall_candidates)
    pipes = {runtime: b.pipeline(runtime) for runtime in RUNTIMES}
    pipe = pipes["onnx"]
    requests = _requests(b, pipe, users, candidates, seed)
    rank_calls = {rt: (lambda r, p=p: p.rank(r.window, r.now, r.activity, r.candidates)) for rt, p in pipes.items()}
    width = b.data.items.size
    recall_calls = {
        rt: (lambda r, p=p: p.retriever.retrieve(r.window.tail(p.retriever.model.cfg.history), r.now, Excluded([r.exclude], width=width))) for rt, p in pipes.items()
    }
    # The runtimes take turns in rounds, so a change in the machine's load hits both alike.
    rank_times = _time_rounds(rank_calls, requests, calls, warmup)
    recall_times = _time_rounds(recall_calls, requests, max(calls // 4, len(requests)), warmup // 4)
    med = lambda times, rt: float(np.median(times[rt][1]))
    after_pause = None
    if pause_ms > 0:
        paused = {stage: _time_rounds(fns, requests, pause_calls, 0, pause_s=pause_ms / 1e3) for stage, fns in (("rank", rank_calls), ("recall", recall_calls))}
        back_to_back = {"rank": rank_times, "recall": recall_times}
        wall = lambda times, rt: float(np.median(times[rt][0]))
        after_pause = {
            "pause_ms": pause_ms,
            "calls": pause_calls,
            **{f"{stage}_ms": {rt: _summaries(t) for rt, t in times.items()} for stage, times in paused.items()},
            "over_back_to_back": {rt: {stage: round(wall(paused[stage], rt) / wall(back_to_back[stage], rt), 2) for stage in paused} for rt in RUNTIMES},
        }
    report = {
        "setting": {
            "bundle": b.path,
            "model_version": b.model_version,
            "candidates": int(requests[0].candidates.items.shape[1]),
            "recall_config": pipe.retriever.config.to_dict(),
            "calls": calls,
            "rounds": ROUNDS,
            "users": len(requests),
            "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "history": int(pipe.ranker.cfg.history),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
        },
        "rank_ms": {rt: _summaries(t) for rt, t in rank_times.items()},
        "recall_ms": {rt: _summaries(t) for rt, t in recall_times.items()},
        "onnx_over_torch": {"rank": round(med(rank_times, "onnx") / med(rank_times, "torch"), 3), "recall": round(med(recall_times, "onnx") / med(recall_times, "torch"), 3)},
        "target_ms": TARGET_MS,
        "meets_target": {
            rt: {stage: bool(med(times, rt) * 1e3 <= TARGET_MS[stage]) for stage, times in (("rank", rank_times), ("recall", recall_times))} for rt in RUNTIMES
        },
        "breakdown": _breakdown(rank_calls["onnx"], requests, profile_calls, TwoStage.rank) if profile_calls > 0 else None,
        "after_pause": after_pause,
        "host": probe_host(host_probe_s) if host_probe_s > 0 else None,
    }
    if json_out:
        write_json(json_out, report)
    return report


def _requests(b, pipe: TwoStage, n_users: int, width: int, seed: int) -> list[_Request]:
    """``n_users`` random users with history, each with their recall candidates cut to ``width``."""
    seqs = b.data.seqs
    active = np.flatnonzero(seqs.lengths > 0)
    picked = np.sort(np.random.default_rng(seed).choice(active, min(n_users, len(active)), replace=False))
    window = seqs.user_window(picked, pipe.history)
    now = np.full(len(picked), b.data_end)  # as the server asks: "now" is the bundle's last event
    exclude = seqs.history_matrix(picked, seqs.offsets[picked + 1], b.data.items.size)
    cands = pipe.retriever.retrieve(window.tail(pipe.retriever.model.cfg.history), now, exclude, two_tower=width)
    if cands.items.shape[1] < width:
        raise ValueError(f"the recall stage returns {cands.items.shape[1]} candidates per user, fewer than --candidates {width}")
    out = []
    for i in range(len(picked)):
        row = slice(i, i + 1)
        one = Candidates(
            items=cands.items[row, :width], scores=cands.scores[row, :width], channels=cands.channels[row, :width], user_vecs=cands.user_vecs[row]
        )
        win = dataclasses.replace(window, **{f.name: getattr(window, f.name)[row] for f in dataclasses.fields(window)})
        out.append(_Request(win, now[row], seqs.lengths[picked[row]], np.unique(exclude[row].indices).astype(np.int64), one))
    return out


def _time_calls(fn: Callable[[_Request], object], requests: list[_Request], calls: int, warmup: int, pause_s: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Wall and CPU seconds of each of ``calls`` calls cycling through ``requests``, after ``warmup`` untimed ones.

    CPU time is this thread's: on a shared machine wall time also counts the waits for
    a free core, which say more about the neighbours than about the code. With
    ``pause_s``, the thread spins that long (untimed) before each timed call.
    """
    for i in range(warmup):
        fn(requests[i % len(requests)])
    wall, cpu = np.empty(calls), np.empty(calls)
    for i in range(calls):
        r = requests[i % len(requests)]
        if pause_s:
            _spin(pause_s)
        w0, c0 = time.perf_counter(), time.thread_time()
        fn(r)
        cpu[i] = time.thread_time() - c0
        wall[i] = time.perf_counter() - w0
    return wall, cpu


def _time_rounds(
    fns: dict[str, Callable[[_Request], object]], requests: list[_Request], calls: int, warmup: int, pause_s: float = 0.0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:func:`_time_calls` for each of ``fns`` in :data:`ROUNDS` alternating rounds; ``calls`` in all per function."""
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in fns}
    for round_ in range(ROUNDS):
        for name, fn in fns.items():
            parts[name].append(_time_calls(fn, requests, max(calls // ROUNDS, 1), warmup if round_ == 0 else 0, pause_s))
    return {name: (np.concatenate([w for w, _ in p]), np.concatenate([c for _, c in p])) for name, p in parts.items()}


def _spin(seconds: float) -> None:
    """Busy-wait: the core stays busy, so a slower call after it is not the core waking up."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def probe_host(seconds: float = 1.0, threshold_us: float = INTERRUPTION_US) -> dict[str, float]:
    """How often a thread that spins reading the clock is interrupted, and for how long.

    Args:
        seconds: how long to spin.
        threshold_us: a gap between two reads longer than this is an interruption.

    Returns:
        :func:`interruption_report` of the gaps.
    """
    clock, gaps = time.perf_counter, []
    start = prev = clock()
    end = start + seconds
    threshold = threshold_us / 1e6
    while prev < end:
        now = clock()
        if now - prev > threshold:
            gaps.append(now - prev)
        prev = now
    return interruption_report(np.array(gaps), prev - start)


def interruption_report(gaps_s: np.ndarray, elapsed_s: float) -> dict[str, float]:
    """Summary of the interruptions a spinning thread saw.

    Args:
        gaps_s: [n] lengths of the interruptions, seconds.
        elapsed_s: how long the thread spun, seconds (> 0).

    Returns:
        ``per_s`` (interruptions a second), ``median_us`` and ``p99_us`` (their lengths;
        0 when there were none) and ``share`` (the fraction of the time they took).
    """
    us = gaps_s * 1e6
    pct = lambda q: round(float(np.percentile(us, q)), 1) if len(us) else 0.0
    return {"per_s": round(len(us) / elapsed_s, 1), "median_us": pct(50), "p99_us": pct(99), "share": round(float(gaps_s.sum()) / elapsed_s, 4)}


def _summary(seconds: np.ndarray) -> dict[str, float]:
    ms = seconds * 1e3
    return {"median": round(float(np.median(ms)), 4), "p99": round(float(np.percentile(ms, 99)), 4), "mean": round(float(ms.mean()), 4)}


def _summaries(times: tuple[np.ndarray, np.ndarray]) -> dict[str, dict[str, float]]:
    wall, cpu = times
    return {"wall": _summary(wall), "cpu": _summary(cpu)}


def _breakdown(fn: Callable[[_Request], object], requests: list[_Request], calls: int, root: Callable, top: int = 15) -> dict[str, dict[str, float]]:
    """Where ``root``'s time goes under cProfile, as shares of its cumulative time.

    Shares rather than milliseconds: the profiler's overhead inflates absolute times.
    cProfile keeps caller-callee pairs, not a call tree, so deeper levels are given as a
    flat list of the most expensive functions anywhere under ``root`` (cumulative time,
    so nested entries overlap) rather than as a tree whose branches would mix callers.

    Returns:
        ``{"callees": {name: share}`` for the functions ``root`` calls directly plus its own
        code, ``"top": {name: share}`` for the ``top`` functions with the most cumulative
        time, torch's module-call wrappers left out}; names are ``file:line:function``.
    """
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(calls):
        fn(requests[i % len(requests)])
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    code = root.__code__
    key = next(k for k in stats if k[0] == code.co_filename and k[1] == code.co_firstlineno and k[2] == code.co_name)
    total = stats[key][3]
    callees = {"(own code)": stats[key][2]}
    for callee, (_, _, _, _, callers) in stats.items():
        if key in callers:
            callees[_name(callee)] = callers[key][3]
    wrappers = ("_wrapped_call_impl", "_call_impl")
    under = {_name(k): v[3] for k, v in stats.items() if k != key and k[2] not in wrappers and v[3] <= total}
    share = lambda d, n=None: {name: round(t / total, 4) for name, t in sorted(d.items(), key=lambda kv: -kv[1])[:n] if t / total >= 0.005}
    return {"callees": share(callees), "top": share(under, top)}


def _name(key: tuple) -> str:
    filename, line, function = key
    return f"{_short(filename)}:{line}:{function}" if line else function


def _short(filename: str) -> str:
    """``.../site-packages/torch/nn/modules/module.py`` → ``torch/nn/modules/module.py``; repo files relative to the repo."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.relpath(filename, root) if filename.startswith(root) else filename


def format_report(report: dict) -> str:
    """The report as text: setting, per-call times against the target and the recall baseline, breakdown."""
    s = report["setting"]
    lines = [
        f"ranking {s['candidates']} candidates for one user, {s['calls']} calls over {s['users']} users, "
        f"torch threads {s['torch_threads']}, faiss threads {s['faiss_threads']}, load average {s['load_average_1m']} on {s['cpus']} cpus",
        "recall candidates per channel: " + ", ".join(f"{name} {count}" for name, count in s["recall_config"].items()),
    ]
    for runtime in RUNTIMES:
        for kind in ("cpu", "wall"):
            for stage in ("rank", "recall"):
                t = report[f"{stage}_ms"][runtime][kind]
                verdict = "meets" if t["median"] <= report["target_ms"][stage] else "MISSES"
                lines.append(
                    f"  {runtime:5} {kind:4} {stage:6} median {t['median']:.3f} ms  p99 {t['p99']:.3f} ms  mean {t['mean']:.3f} ms  ({verdict} the {report['target_ms'][stage]:g} ms target)"
                )
    ratio = report["onnx_over_torch"]
    lines.append(f"  onnx / torch (median CPU, same run): rank {ratio['rank']:.2f}, recall {ratio['recall']:.2f}")
    paused = report["after_pause"]
    if paused is not None:
        lines.append(f"  after a {paused['pause_ms']:g} ms pause (spinning), {paused['calls']} calls each, median wall:")
        for runtime in RUNTIMES:
            lines.append(
                "    "
                + f"{runtime:5} "
                + ", ".join(f"{stage} {paused[f'{stage}_ms'][runtime]['wall']['median']:.3f} ms ({paused['over_back_to_back'][runtime][stage]:.2f}x back to back)" for stage in ("rank", "recall"))
            )
    host = report["host"]
    if host is not None:
        lines.append(
            f"  host: a spinning thread was interrupted {host['per_s']:,.0f} times a second "
            f"(median {host['median_us']:g} us, p99 {host['p99_us']:g} us; {host['share']:.1%} of its time)"
        )
    if report["breakdown"] is None:
        return "\n".join(lines)
    lines.append("  where the onnx ranking time goes (profiled pass; share of rank), functions rank calls:")
    lines += [f"    {share:6.1%}  {name}" for name, share in report["breakdown"]["callees"].items()]
    lines.append("  most expensive functions under rank (cumulative, so nested ones overlap):")
    lines += [f"    {share:6.1%}  {name}" for name, share in report["breakdown"]["top"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m funnel.tools.bench_rank --bundle DIR [--candidates 200] [--calls 2000] [--json out.json]``."""
    p = argparse.ArgumentParser(prog="python -m funnel.tools.bench_rank", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="bundle root (with CURRENT) or a version directory")
    p.add_argument("--candidates", type=int, default=200, help="candidates ranked per call (default: 200)")
    p.add_argument("--calls", type=int, default=2000, help="timed calls (default: 2000)")
    p.add_argument("--users", type=int, default=64, help="distinct users the calls cycle through (default: 64)")
    p.add_argument("--warmup", type=int, default=100, help="untimed calls first (default: 100)")
    p.add_argument("--profile-calls", type=int, default=300, help="calls in the profiled pass for the breakdown; 0 skips it (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="picks the users (default: 0)")
    add_candidates_argument(p, "recall is timed at these counts", flag="--recall-candidates")
    p.add_argument(
        "--pause-ms", type=float, default=0.0,
        help="also time calls that each follow this long a pause (spinning), as a lone request on a server does; e.g. 10 (default: 0, off)",
    )
    p.add_argument("--pause-calls", type=int, default=200, help="calls per runtime and stage after a pause (default: 200)")
    p.add_argument("--host-probe-s", type=float, default=1.0, help="seconds spent measuring how often this machine interrupts a spinning thread; 0 skips it (default: 1)")
    p.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    args = p.parse_args(argv)
    try:
        report = run_benchmark(
            bundle=args.bundle, candidates=args.candidates, calls=args.calls, users=args.users, warmup=args.warmup,
            profile_calls=args.profile_calls, seed=args.seed, recall_candidates=args.recall_candidates,
            pause_ms=args.pause_ms, pause_calls=args.pause_calls, host_probe_s=args.host_probe_s, json_out=args.json_out,
        )
    except ValueError as err:
        p.error(str(err))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
