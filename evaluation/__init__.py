"""Offline evaluation: ranking metrics (pure numpy), the non-learned baselines, the full-ranking protocols and the HTML report.

``funnel evaluate`` and ``funnel seeds`` are command lines over :mod:`evaluation.protocol`;
training validates with :mod:`evaluation.metrics`.
"""
