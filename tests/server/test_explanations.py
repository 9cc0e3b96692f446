"""Per-request head weights and per-item explanations over a real gRPC channel: a fake engine for the protocol, the real one for the content."""

import math

import grpc
import numpy as np
import pytest

from funnel.events.schema import BEHAVIORS
from funnel.server.app import create_server
from funnel.server.engine import Engine
from funnel.server.query import Attended, RecommendQuery, RecommendResult, Recommendation
from funnel.tools.recommend import format_result, recommend

TIMEOUT = 10.0


class ExplainingEngine:
    """Answers with two items carrying explanations and head scores; records the last query."""

    model_version = "m"
    index_version = "i"

    def __init__(self) -> None:
        self.last_query: RecommendQuery | None = None

    def recommend(self, query: RecommendQuery) -> RecommendResult:
        self.last_query = query
        because = (Attended("seen-1", "buy", 1_500_000_000, 0.75, 0.125), Attended("seen-2", "pv", 1_500_000_100, 0.25, 0.0625))
        items = [
            Recommendation("a", 0.9, 0.5, "two_tower", because=because, head_scores={"click": 0.9, "buy": 0.1}),
            Recommendation("b", 0.8, 0.4, "covisit"),
        ]
        return RecommendResult(items, self.model_version, self.index_version, {"recall": 1, "rank": 1, "total": 2})


@pytest.fixture(scope="module")
def fake():
    engine = ExplainingEngine()
    server, port = create_server("127.0.0.1:0", engine, max_workers=2)
    server.start()
    yield engine, f"127.0.0.1:{port}"
    server.stop(None)


def test_explanations_and_head_scores_cross_the_wire(fake):
    engine, addr = fake
    result = recommend(addr=addr, user_id="u", k=2, head_weights={"click": 0.5, "buy": 2.0}, explain=True, timeout=TIMEOUT)
    first, second = result.items
    assert [(a.item_id, a.behavior, a.timestamp) for a in first.because] == [("seen-1", "buy", 1_500_000_000), ("seen-2", "pv", 1_500_000_100)]
    assert [a.weight for a in first.because] == pytest.approx([0.75, 0.25])
    assert [a.effect for a in first.because] == pytest.approx([0.125, 0.0625])
    assert first.head_scores == pytest.approx({"click": 0.9, "buy": 0.1})
    assert second.because == () and second.head_scores == {}
    # The servicer hands the weights to the engine sorted by head name.
    assert engine.last_query.head_weights == (("buy", 2.0), ("click", 0.5)) and engine.last_query.explain
    text = format_result(result, why=True)
    assert "because buy seen-1" in text and "score +0.1250 with it" in text and "buy 0.1000" in text
    assert "because" not in format_result(result)


@pytest.mark.parametrize(
    "weights, needle",
    [({"ctr": 1.0}, "'ctr'"), ({"buy": -0.5}, "buy"), ({"click": math.nan}, "click"), ({"click": math.inf}, "click")],
)
def test_bad_head_weights_are_invalid_argument(fake, weights, needle):
    engine, addr = fake
    engine.last_query = None
    with pytest.raises(grpc.RpcError) as err:
        recommend(addr=addr, user_id="u", k=2, head_weights=weights, timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details() and "head_weights" in err.value.details()
    assert engine.last_query is None  # rejected before the engine runs


def _history(engine: Engine) -> tuple[str, set[tuple[str, str, int]]]:
    """The most active user and their logged (item, behaviour, timestamp) events."""
    data = engine.bundle.data
    user = int(np.argmax(data.seqs.lengths))
    lo, hi = data.seqs.offsets[user], data.seqs.offsets[user + 1]
    items = data.items.decode(data.seqs.items[lo:hi])
    events = {(str(i), BEHAVIORS[b - 1], int(t)) for i, b, t in zip(items, data.seqs.behaviors[lo:hi], data.seqs.ts[lo:hi])}
    return str(data.users.decode(np.array([user]))[0]), events


def test_real_engine_explains_items_from_the_users_own_history_on_request(live):
    engine, addr = live
    user, history = _history(engine)
    cfg = engine.pipeline.ranker.cfg
    result = recommend(addr=addr, user_id=user, k=10, explain=True, timeout=TIMEOUT)
    assert len(result.items) == 10
    assert sum(bool(r.because) for r in result.items) >= 8  # an item no behaviour raises has no explanation
    for r in result.items:
        assert len(r.because) <= 3
        lines = [(a.item_id, a.behavior, a.timestamp) for a in r.because]
        assert len(set(lines)) == len(lines) and set(lines) <= history
        effects = [a.effect for a in r.because]
        assert effects == sorted(effects, reverse=True) and all(e > 0 for e in effects)
        assert all(0 <= a.weight <= 1 for a in r.because)
        assert set(r.head_scores) == set(cfg.heads)
        # The score is the documented combination of the head scores under the server's weights.
        w = {h: cfg.head_weights.get(h, 0.0) for h in cfg.heads}
        assert r.score == pytest.approx(sum(w[h] * r.head_scores[h] for h in cfg.heads) / sum(w.values()), rel=1e-4)


def test_explanations_are_off_unless_asked_for(live):
    engine, addr = live
    user, _ = _history(engine)
    result = recommend(addr=addr, user_id=user, k=10, timeout=TIMEOUT)
    assert len(result.items) == 10 and all(r.because == () for r in result.items)


def test_request_head_weights_reorder_by_the_weighted_heads(live):
    engine, addr = live
    user, _ = _history(engine)
    heads = engine.pipeline.ranker.cfg.heads
    assert len(heads) > 1, "the synthetic log has every behaviour, so the ranker has several heads"
    for only in heads:
        result = recommend(addr=addr, user_id=user, k=20, head_weights={h: float(h == only) for h in heads}, timeout=TIMEOUT)
        scores = [r.score for r in result.items]
        assert scores == pytest.approx([r.head_scores[only] for r in result.items], rel=1e-5)
        assert scores == sorted(scores, reverse=True)


def test_cold_user_gets_no_explanations(live):
    _, addr = live
    result = recommend(addr=addr, user_id="never-seen-anywhere", k=5, explain=True, timeout=TIMEOUT)
    assert result.items and all(r.because == () for r in result.items)
    assert all(r.head_scores for r in result.items)


def test_head_the_bundle_lacks_is_invalid_argument(live, monkeypatch):
    engine, addr = live
    monkeypatch.setattr(engine.pipeline.ranker.cfg, "heads", ("click",))
    with pytest.raises(grpc.RpcError) as err:
        recommend(addr=addr, user_id="u", k=3, head_weights={"buy": 1.0}, timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'buy'" in err.value.details() and "click" in err.value.details()
