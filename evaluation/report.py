"""The HTML evaluation report: one self-contained file with inline SVG plots.

Plots are drawn here as SVG text rather than with a plotting library: three line charts
do not justify a dependency, and the file opens anywhere without images beside it.
"""

import html
import json
import math
from collections.abc import Sequence

import numpy as np

WIDTH, HEIGHT = 560, 340
MARGIN = {"left": 62, "right": 16, "top": 34, "bottom": 48}
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
LOG_TICKS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def render_report(report: dict, curves: dict[str, dict[str, np.ndarray]], summary: str) -> str:
    """The HTML page of an evaluation report.

    Args:
        report: the evaluation report (uses ``users``, ``split``, ``bundle``, ``lift`` and ``ranker``).
        curves: {method: {"hr": [K], "ndcg": [K]}}, element ``K - 1`` being the metric at cut-off K.
        summary: the plain-text metric tables, shown as they are.

    Returns:
        A self-contained HTML document.
    """
    charts = [
        _metric_chart(curves, "hr", "HR@K"),
        _metric_chart(curves, "ndcg", "NDCG@K"),
    ]
    if "calibration" in report.get("ranker", {}):
        charts.append(reliability_chart(report["ranker"]["calibration"]))
    bundle = report.get("bundle", {})
    title = f"Funnel evaluation: model {bundle.get('model_version', '?')}, split {report.get('split', '?')}"
    body = "\n".join(
        [
            f"<h1>{html.escape(title)}</h1>",
            f"<p>{report.get('users', 0):,} test users; bundle <code>{html.escape(str(bundle.get('path', '')))}</code></p>",
            "<h2>Metrics</h2>",
            f"<pre>{html.escape(summary)}</pre>",
            "<h2>Metric vs cut-off K</h2>",
            "<p>Recall is the merged candidate list in recall-score order; final is the same candidates re-ordered by the ranker.</p>",
            *charts[:2],
            "<h2>Ranker calibration</h2>",
            "<p>Held-out pairs (the recalled target against the user's other candidates), binned by predicted probability.</p>",
            *charts[2:],
        ]
    )
    return f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>\n<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"


def curves_json(curves: dict[str, dict[str, np.ndarray]]) -> str:
    """The curves as JSON text: ``{method: {metric: [value at K = 1, 2, ...]}}``, rounded to 6 decimals."""
    return json.dumps({name: {metric: [round(float(v), 6) for v in values] for metric, values in c.items()} for name, c in curves.items()})


_CSS = "body{font-family:sans-serif;max-width:1180px;margin:1em auto;color:#222}pre{background:#f6f6f6;padding:.6em;overflow-x:auto}svg{margin:.4em;border:1px solid #ddd}"


def _metric_chart(curves: dict[str, dict[str, np.ndarray]], metric: str, label: str) -> str:
    series = [(name, np.arange(1, len(c[metric]) + 1), np.asarray(c[metric], dtype=np.float64)) for name, c in curves.items()]
    return line_chart(series, title=f"{label} vs K", x_label="K (log scale)", y_label=label, log_x=True)


def reliability_chart(calibration: dict) -> str:
    """Reliability diagram: observed positive rate against mean predicted probability per bin, with the diagonal.

    Args:
        calibration: ``{"mean_prob": [...], "positive_rate": [...], "count": [...]}``; empty bins are None.

    Returns:
        An ``<svg>`` element as text.
    """
    pairs = [(p, r) for p, r in zip(calibration["mean_prob"], calibration["positive_rate"]) if p is not None and r is not None]
    xs = np.array([p for p, _ in pairs], dtype=np.float64)
    ys = np.array([r for _, r in pairs], dtype=np.float64)
    top = _nice_ceiling(max(xs.max(initial=0.0), ys.max(initial=0.0), 1e-3))
    return line_chart(
        [("ranker", xs, ys)],
        title="Reliability: observed positive rate vs predicted probability",
        x_label="mean predicted probability (bin)",
        y_label="observed positive rate",
        x_range=(0.0, top),
        y_range=(0.0, top),
        diagonal=True,
        markers=True,
    )


def line_chart(
    series: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    log_x: bool = False,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    diagonal: bool = False,
    markers: bool = False,
) -> str:
    """An SVG line chart with axes, ticks and a legend.

    Args:
        series: (name, xs, ys) per line; non-finite points are skipped.
        title, x_label, y_label: text.
        log_x: logarithmic x axis (x must be positive).
        x_range, y_range: axis limits; default from the data (y from 0).
        diagonal: draw y = x as a dashed reference.
        markers: a dot at every point.

    Returns:
        An ``<svg>`` element as text.
    """
    finite = [(n, np.asarray(x, np.float64), np.asarray(y, np.float64)) for n, x, y in series]
    finite = [(n, x[np.isfinite(x) & np.isfinite(y)], y[np.isfinite(x) & np.isfinite(y)]) for n, x, y in finite]
    all_x = np.concatenate([x for _, x, _ in finite] + [np.zeros(0)])
    all_y = np.concatenate([y for _, _, y in finite] + [np.zeros(0)])
    x0, x1 = x_range or ((float(all_x.min()), float(all_x.max())) if all_x.size else (0.0, 1.0))
    y0, y1 = y_range or (0.0, _nice_ceiling(float(all_y.max())) if all_y.size and all_y.max() > 0 else 1.0)
    if x1 <= x0:
        x1 = x0 + 1.0
    left, top = MARGIN["left"], MARGIN["top"]
    pw, ph = WIDTH - left - MARGIN["right"], HEIGHT - top - MARGIN["bottom"]
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)

    def sx(v: float) -> float:
        return left + (fx(v) - fx(x0)) / (fx(x1) - fx(x0)) * pw

    def sy(v: float) -> float:
        return top + ph - (v - y0) / (y1 - y0) * ph

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' viewBox='0 0 {WIDTH} {HEIGHT}' font-size='11'>",
        f"<text x='{WIDTH / 2:.0f}' y='18' text-anchor='middle' font-size='13'>{html.escape(title)}</text>",
        f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#888'/>",
    ]
    x_ticks = [t for t in LOG_TICKS if x0 <= t <= x1] if log_x else nice_ticks(x0, x1)
    for t in x_ticks:
        parts.append(f"<line x1='{sx(t):.1f}' y1='{top}' x2='{sx(t):.1f}' y2='{top + ph}' stroke='#eee'/>")
        parts.append(f"<text x='{sx(t):.1f}' y='{top + ph + 14}' text-anchor='middle'>{_tick_label(t)}</text>")
    for t in nice_ticks(y0, y1):
        parts.append(f"<line x1='{left}' y1='{sy(t):.1f}' x2='{left + pw}' y2='{sy(t):.1f}' stroke='#eee'/>")
        parts.append(f"<text x='{left - 4}' y='{sy(t) + 4:.1f}' text-anchor='end'>{_tick_label(t)}</text>")
    parts.append(f"<text x='{left + pw / 2:.0f}' y='{HEIGHT - 10}' text-anchor='middle'>{html.escape(x_label)}</text>")
    parts.append(f"<text transform='translate(14 {top + ph / 2:.0f}) rotate(-90)' text-anchor='middle'>{html.escape(y_label)}</text>")
    if diagonal:
        lo, hi = max(x0, y0), min(x1, y1)
        parts.append(f"<line x1='{sx(lo):.1f}' y1='{sy(lo):.1f}' x2='{sx(hi):.1f}' y2='{sy(hi):.1f}' stroke='#999' stroke-dasharray='4 3'/>")
    for i, (name, xs, ys) in enumerate(finite):
        color = COLORS[i % len(COLORS)]
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
        parts.append(f"<polyline class='series' data-name='{html.escape(name, quote=True)}' fill='none' stroke='{color}' stroke-width='1.8' points='{points}'/>")
        if markers:
            parts.extend(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{color}'/>" for x, y in zip(xs, ys))
        ly = top + 14 + 15 * i
        parts.append(f"<line x1='{left + 10}' y1='{ly - 4}' x2='{left + 28}' y2='{ly - 4}' stroke='{color}' stroke-width='2.5'/>")
        parts.append(f"<text x='{left + 33}' y='{ly}'>{html.escape(name)}</text>")
    parts.append("</svg>")
    return "\n".join(parts)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering ``[lo, hi]``.

    Args:
        lo, hi: the axis range.
        target: about how many ticks are wanted.

    Returns:
        Ascending tick values inside the range.
    """
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / target
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    count = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [round(first + i * step, 12) for i in range(count)]


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value - 1e-12)


def _tick_label(value: float) -> str:
    return f"{value:g}"
