"""Shared fixtures: a tiny synthetic log (generated, never read from ../shared) and a bundle trained on it."""

import pytest

from funnel.events.dataset import Dataset
from funnel.events.readers import read_events


@pytest.fixture(scope="session")
def tiny_log_path(tmp_path_factory) -> str:
    from funnel.events.synth import SynthConfig, generate

    path = str(tmp_path_factory.mktemp("data") / "events.csv")
    generate(path, SynthConfig(n_users=150, n_items=400, n_categories=8, events_per_user=30.0, seed=7), progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_data(tiny_log_path) -> Dataset:
    return Dataset.from_log(read_events(tiny_log_path))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_log_path, tmp_path_factory) -> str:
    """A bundle root trained on the tiny log with short schedules."""
    from funnel.rank.train import RankerTrainConfig
    from funnel.recall.train import TwoTowerTrainConfig
    from funnel.tools.train import train

    root = str(tmp_path_factory.mktemp("bundle"))
    train(
        events=tiny_log_path,
        out=root,
        two_tower=TwoTowerTrainConfig(epochs=3, batch_size=128, uniform_negatives=64),
        # Held-out training positions are few on this log (10 per user): a few more epochs.
        ranker=RankerTrainConfig(epochs=6, batch_size=128),
        progress=False,
    )
    return root
