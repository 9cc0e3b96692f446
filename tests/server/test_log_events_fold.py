"""Logged events on items and users no bundle knows become part of the next bundle via ``train --fold-events``."""

import pytest

from funnel.events.eventlog import EventStore, UserEvent
from funnel.events.readers import read_events
from funnel.events.synth import SynthConfig, generate
from funnel.rank.train import RankerTrainConfig
from funnel.recall.train import TwoTowerTrainConfig
from funnel.server.engine import Engine
from funnel.server.query import RecommendQuery
from funnel.server.state import open_state
from funnel.tools.train import train


@pytest.mark.slow
def test_train_folds_the_event_log_into_the_next_bundle(tmp_path):
    log_path = str(tmp_path / "events.csv")
    generate(log_path, SynthConfig(n_users=40, n_items=80, n_categories=4, events_per_user=12.0, seed=3), progress=False)
    base = read_events(log_path)
    known = list(base.items["item"][:5])
    end = int(base.events["ts"].max())
    store = EventStore(str(tmp_path / "events.db"))
    # A new item viewed by several new users amid known items (sent without a category, as
    # clients may), never as their last event, so training sees it.
    logged = []
    for u in range(6):
        user = f"folded-user-{u}"
        logged += [UserEvent(user, known[u % 5], "", "pv", end + 10 * u + 1), UserEvent(user, "brand-new-item", "brand-new-cat", "cart", end + 10 * u + 2)]
        logged += [UserEvent(user, known[(u + 1) % 5], "", "pv", end + 10 * u + 3 + k) for k in range(3)]
    store.append(logged)
    store.close()

    version = train(
        events=log_path,
        out=str(tmp_path / "bundle"),
        fold_events=str(tmp_path / "events.db"),
        two_tower=TwoTowerTrainConfig(epochs=1, batch_size=128, uniform_negatives=32),
        ranker=RankerTrainConfig(epochs=1, batch_size=128),
        progress=False,
    )
    engine = Engine.load(version, open_state("memory", event_log=str(tmp_path / "events.db")))
    data = engine.bundle.data
    assert engine.bundle.manifest["data"]["folded_events"]["rows"] == len(logged)
    assert len(data.seqs) == len(base.events) + len(logged)
    item = int(data.items.encode(["brand-new-item"])[0])
    assert item != 0 and data.categories.decode(data.item_category[[item]])[0] == "brand-new-cat"
    # Known items logged without a category keep the log's category.
    assert list(data.categories.decode(data.item_category[data.items.encode(known)])) == list(base.items["category"][:5])
    assert int(data.users.encode(["folded-user-0"])[0]) != 0
    # Recommendable now: a user who has not touched it can be offered it.
    offered = {r.item_id for r in engine.recommend(RecommendQuery(user_id="someone-else", k=1000)).items}
    assert "brand-new-item" in offered
    # The folded events are in the bundle and in the replayed state: they count once.
    assert len(engine.history.sequence(RecommendQuery(user_id="folded-user-0", k=5))) == 5
