"""Signed checkpoints against the real Redis: a value planted under a checkpoint key is never unpickled,
whoever loads it (rankers, a resuming learner), and what was served stays served."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest

from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.online.learning.checkpoints import (
    Checkpoint,
    CheckpointRefused,
    CheckpointStore,
    ModelMetrics,
    ServingModel,
    model_key,
)
from fusionrec.online.learning.learner import Learner
from fusionrec.online.learning.model import FusionModel
from tests.integration.helpers import make_settings


class Planted:
    """Unpickling this creates a file: the proof that a planted value ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def setup(services, tmp_path):
    s = make_settings(services, model_key="k" * 32, learn_reload_s=0.0)
    client = connect(s)
    store = CheckpointStore(client, s)
    good = store.save(Checkpoint(model=FusionModel(use_vectors=False, seed=1), examples=7))
    return s, client, store, good, tmp_path / "ran"


def _plant(client, store, number: int, blob: bytes) -> None:
    client.set(store.keys.fusion(number), blob)
    client.zadd(store.keys.fusion("index"), {str(number): number})
    client.set(store.keys.fusion("head"), number)


def test_a_planted_pickle_is_never_loaded(setup):
    s, client, store, good, marker = setup
    metrics = Metrics()
    serving = ServingModel(store, s, metrics)
    assert serving.current()[0] == good
    for number, blob in ((good + 1, pickle.dumps(Planted(marker))),  # no signature at all
                         (good + 2, b"FRCK1" + b"\0" * 32 + pickle.dumps(Planted(marker)))):  # a made-up one
        _plant(client, store, number, blob)
        with pytest.raises(CheckpointRefused):
            store.load()
        assert serving.current()[0] == good  # still serving the signed one
    assert not marker.exists()
    assert metrics.of(ModelMetrics).refused._value.get() == 2
    # a learner resuming takes the newest checkpoint that verifies
    learner = Learner(s, store, None)
    assert learner.resume().number == good
    assert not marker.exists()


def test_a_tampered_or_foreign_checkpoint_is_refused(setup):
    s, client, store, good, _marker = setup
    blob = client.get(store.keys.fusion(good))
    assert store.load(good).examples == 7
    tampered = bytearray(blob)
    tampered[-10] ^= 1
    client.set(store.keys.fusion(good), bytes(tampered))
    with pytest.raises(CheckpointRefused, match="does not verify"):
        store.load(good)
    client.set(store.keys.fusion(good), blob)
    other = CheckpointStore(client, s.replace(model_key="x" * 32))
    with pytest.raises(CheckpointRefused, match="does not verify"):
        other.load(good)


def test_without_a_configured_key_the_run_dir_holds_one(services, tmp_path):
    s = make_settings(services, run_dir=str(tmp_path / "run"))
    assert s.learn.model_key is None
    key = model_key(s)
    path = tmp_path / "run" / "model.key"
    assert len(key) >= 32 and model_key(s) == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path / "run") == ["model.key"]


def test_a_signed_checkpoint_this_release_cannot_load_is_skipped(setup):
    """An incompatible checkpoint (a class another release had) or one cut short: refused, counted,
    and the rankers keep serving what they served; a resuming learner takes the older one."""
    from fusionrec.online.learning.checkpoints import sign

    s, client, store, good, _marker = setup
    metrics = Metrics()
    serving = ServingModel(store, s, metrics)
    assert serving.current()[0] == good
    key = store.key
    incompatible = b"\x80\x04cfusionrec_old_release.model\nFusionModelV0\n)\x81."  # an unknown class
    truncated = pickle.dumps(Checkpoint(model=FusionModel(use_vectors=False, seed=2), examples=9))[:-20]
    for number, payload in ((good + 1, incompatible), (good + 2, truncated)):
        _plant(client, store, number, sign(key, payload))
        with pytest.raises(CheckpointRefused, match="cannot be loaded by this release"):
            store.load()
        assert serving.current()[0] == good
    assert metrics.of(ModelMetrics).refused._value.get() == 2
    assert Learner(s, store, None).resume().number == good
