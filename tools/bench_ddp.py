"""``python -m funnel.tools.bench_ddp``: two-tower training samples/s of N torchrun processes against one process.

Both sides run one thread per process on the same log and split, alternating so that a
noisy machine slows both alike; the report gives each run, the medians and their ratio.
Each run trains one epoch of ``--samples`` positions; samples/s counts training time
only (validation excluded), as the bundle's history does.

With ``--worker`` the module is one run (what the benchmark starts, alone or under
torchrun) and prints one JSON line.
"""

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

from funnel.tools.output import write_json


def worker(*, events: str, fmt: str, split: str, samples: int) -> dict:
    """One run: read, split, one two-tower epoch of ``samples`` positions (shared out among the torchrun processes).

    Returns:
        ``{"processes", "threads", "samples", "samples_per_s"}`` (rank 0's view; the others return the same).
    """
    import torch

    from funnel.events.dataset import Dataset
    from funnel.events.readers import read_events, release_read_memory
    from funnel.events.split import make_split
    from funnel.recall import distributed
    from funnel.recall.train import TwoTowerTrainConfig, train_two_tower

    world = distributed.init_from_env()
    try:
        data = Dataset.from_log(read_events(events, fmt))
        release_read_memory()
        cfg = TwoTowerTrainConfig(epochs=1, samples_per_epoch=samples, max_valid_users=200)
        _, history = train_two_tower(data, make_split(data.seqs, split), train_config=cfg, progress=False)
    finally:
        distributed.shutdown()
    epoch = history["epochs"][0]
    return {"processes": world.size, "threads": torch.get_num_threads(), "samples": epoch["samples"], "samples_per_s": epoch["samples_per_s"]}


def run_benchmark(*, events: str, fmt: str = "parquet", split: str = "comirec", samples: int = 120_000, nproc: int = 2, repeats: int = 2, json_out: str | None = None) -> dict:
    """Alternate one-process and ``nproc``-process runs ``repeats`` times each.

    Returns:
        The report: the setting, every run, the median samples/s of each side and ``speedup`` (their ratio).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    worker_args = ["-m", "funnel.tools.bench_ddp", "--worker", "--events", events, "--format", fmt, "--split", split, "--samples", str(samples)]
    commands = {
        "one": [sys.executable, *worker_args],
        "many": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *worker_args],
    }
    runs: dict[str, list[dict]] = {"one": [], "many": []}
    for _ in range(repeats):
        for side, cmd in commands.items():
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
            runs[side].append(json.loads(lines[0]))
    median = {side: float(np.median([r["samples_per_s"] for r in rs])) for side, rs in runs.items()}
    report = {
        "setting": {"events": events, "split": split, "samples_per_run": samples, "processes": nproc, "threads_per_process": 1, "repeats": repeats},
        "runs": runs,
        "median_samples_per_s": median,
        "speedup": round(median["many"] / median["one"], 3),
    }
    if json_out:
        write_json(json_out, report)
    return report


def format_report(report: dict) -> str:
    s = report["setting"]
    m = report["median_samples_per_s"]
    return (
        f"two-tower samples/s on {s['events']} ({s['samples_per_run']:,} per run, {s['repeats']} runs each, median):\n"
        f"  1 process x 1 thread: {m['one']:,.0f}\n"
        f"  {s['processes']} processes x 1 thread (torchrun, DDP on gloo): {m['many']:,.0f}\n"
        f"  speed-up {report['speedup']:.2f}x"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: the benchmark, or with ``--worker`` one run of it."""
    p = argparse.ArgumentParser(prog="python -m funnel.tools.bench_ddp", description=__doc__.splitlines()[0])
    p.add_argument("--events", required=True, help="behaviour log (a parquet file from 'funnel ingest' reads fastest)")
    p.add_argument("--format", dest="fmt", default="parquet", help="log format (default: parquet)")
    p.add_argument("--split", default="comirec", help="split (default: comirec)")
    p.add_argument("--samples", type=int, default=120_000, help="training positions per run (default: 120000)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed side (default: 2)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating (default: 2)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the report to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = worker(events=args.events, fmt=args.fmt, split=args.split, samples=args.samples)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        return 0
    report = run_benchmark(events=args.events, fmt=args.fmt, split=args.split, samples=args.samples, nproc=args.nproc, repeats=args.repeats, json_out=args.json_out)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
