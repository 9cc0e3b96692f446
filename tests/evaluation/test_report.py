"""The HTML report's SVG drawing on small inputs."""

import json

import numpy as np

from funnel.evaluation.report import line_chart, nice_ticks, reliability_chart
from funnel.tools.evaluate import write_report


def test_nice_ticks_hand_examples():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.0, 0.17) == [0.0, 0.05, 0.1, 0.15]
    assert nice_ticks(3.0, 3.0) == [3.0]


def test_line_chart_draws_one_polyline_per_series_and_skips_nan():
    chart = line_chart(
        [("a", np.array([1, 2, 3]), np.array([0.1, np.nan, 0.3])), ("b <x>", np.array([1, 2]), np.array([0.2, 0.2]))],
        title="t", x_label="K", y_label="HR", log_x=True,
    )
    assert chart.count("<polyline") == 2
    first = chart.split("<polyline", 2)[1]
    assert first.split("points='")[1].split("'")[0].count(",") == 2  # the nan point is dropped
    assert "b &lt;x&gt;" in chart  # names are escaped


def test_reliability_chart_skips_empty_bins():
    chart = reliability_chart({"mean_prob": [0.1, None, 0.5], "positive_rate": [0.05, None, 0.4], "count": [10, 0, 3]})
    assert chart.count("<circle") == 2 and "stroke-dasharray" in chart


def test_write_report_without_calibration(tmp_path):
    curves = {"recall (merged)": {"hr": np.array([0.1, 0.2]), "ndcg": np.array([0.1, 0.15])}}
    path = write_report(str(tmp_path / "r"), {"users": 3, "split": "leave-last-out", "ranker": {"pairs": 0, "users": 0}}, curves, "table <1>")
    page = open(path).read()
    assert page.count("<svg") == 2 and "table &lt;1&gt;" in page
    assert json.loads((tmp_path / "r" / "curves.json").read_text())["recall (merged)"]["hr"] == [0.1, 0.2]
