"""Several evaluation runs summarised: every metric's mean, spread and range (``funnel seeds``)."""

import numpy as np

SECTIONS = ("recall", "recall_channels", "final", "lift")
"""The report sections whose metrics are summarised."""
SHOWN = ("recall_channels.two_tower.hr@10", "recall_channels.two_tower.ndcg@10", "recall_channels.two_tower.hr@200", "final.hr@10", "final.ndcg@10", "lift.ndcg@10_ratio", "train_seconds", "evaluate_seconds")
"""The metrics :func:`format_summary` prints."""


def summarize_runs(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, population std, min and max of each metric present in every run."""
    keys = [k for k in runs[0] if all(isinstance(r.get(k), (int, float)) for r in runs)] if runs else []
    out = {}
    for key in keys:
        values = np.array([r[key] for r in runs], dtype=np.float64)
        out[key] = {"mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4), "min": round(float(values.min()), 4), "max": round(float(values.max()), 4)}
    return out


def flatten_report(tree: dict, prefix: str = "") -> dict:
    """Every number of a nested report under its dotted path, e.g. ``final.ndcg@10`` (booleans left out)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_report(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def format_summary(result: dict) -> str:
    """The headline metrics as a table: one row each, mean ± std and the range over seeds."""
    summary = result["summary"]
    lines = [f"{len(result['runs'])} seeds on {result['events']} ({result['split']})"]
    for key in SHOWN:
        if key in summary:
            s = summary[key]
            lines.append(f"{key:36} {s['mean']:>9.4f} ± {s['std']:.4f}   [{s['min']:.4f} .. {s['max']:.4f}]")
    return "\n".join(lines)
