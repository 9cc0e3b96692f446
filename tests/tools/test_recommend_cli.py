"""Parsing of the recommend tool's --head-weight flag."""

import argparse

import pytest

from funnel.tools.recommend import parse_head_weight


def test_parse_head_weight():
    assert parse_head_weight("buy=2.5") == ("buy", 2.5)
    assert parse_head_weight("click=0") == ("click", 0.0)


@pytest.mark.parametrize("text, needle", [("buy", "HEAD=WEIGHT"), ("=1", "HEAD=WEIGHT"), ("buy=lots", "not a number")])
def test_parse_head_weight_rejects(text, needle):
    with pytest.raises(argparse.ArgumentTypeError, match=needle):
        parse_head_weight(text)
