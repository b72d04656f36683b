"""The text encoder on a tiny random BERT built in the test: no download, no weights shipped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionrec.core.errors import ConfigError
from fusionrec.models.embedder import VectorCache, latest_per_item
from fusionrec.models.encoder import ModelSpec, TextEncoder
from fusionrec.models.text import item_text, text_hash
from fusionrec.online.candidates.content import profile_vector
from fusionrec.online.ranking.ranker import spread
from fusionrec.streams.contract import CatalogEvent

TEXTS = ["organic whole milk", "car battery charger for the garage", "cola", "frozen pizza 12 oz",
         "apple", "greek yogurt plain 32 oz organic"]


@pytest.fixture(scope="module")
def path(tiny_bert: Callable[..., Path]) -> Path:
    return tiny_bert()


def encoder(path: Path, **kw: object) -> TextEncoder:
    spec_kw = {k: kw.pop(k) for k in ("pooling", "max_length", "normalize") if k in kw}
    return TextEncoder(ModelSpec.load(path, **spec_kw), device="cpu", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_batched_equals_one_at_a_time_in_callers_order(path: Path, pooling: str) -> None:
    enc = encoder(path, pooling=pooling)
    batched = enc.encode(TEXTS, batch_size=4)  # sorted by length inside, padded per pass
    single = np.stack([enc.encode([t])[0] for t in TEXTS])
    assert batched.shape == (len(TEXTS), enc.dim) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, single, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in batched}) == len(TEXTS)


def test_pooling_steps(path: Path) -> None:
    enc = encoder(path, pooling="mean", normalize=False)
    batch = enc.tokenize(["milk", "organic whole milk"])
    hidden = enc.forward(batch)
    mask = batch["attention_mask"]
    assert hidden.shape[:2] == mask.shape and int(mask[0].sum()) < int(mask[1].sum())
    mean = enc.pool(hidden, mask)
    n0 = int(mask[0].sum())
    np.testing.assert_allclose(mean[0], hidden[0, :n0].mean(0).numpy(), atol=1e-5)  # padding ignored
    enc.pooling = "cls"
    np.testing.assert_allclose(enc.pool(hidden, mask)[0], hidden[0, 0].numpy(), atol=1e-6)
    enc.pooling = "last"
    np.testing.assert_allclose(enc.pool(hidden, mask)[0], hidden[0, n0 - 1].numpy(), atol=1e-6)


def test_last_token_pooling_handles_left_and_right_padding(path: Path) -> None:
    enc = encoder(path, pooling="last", normalize=False)
    hidden = torch.randn(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # decoder LLM tokenizers pad on the left
    np.testing.assert_allclose(enc.pool(hidden, right)[0], hidden[0, 1].numpy())
    np.testing.assert_allclose(enc.pool(hidden, left)[0], hidden[0, 3].numpy())
    np.testing.assert_allclose(enc.pool(hidden, left)[1], hidden[1, 3].numpy())


def test_max_length_truncates(path: Path) -> None:
    enc = encoder(path, max_length=8)
    assert enc.tokenize(["organic whole milk " * 20])["input_ids"].shape[1] == 8
    enc.warmup()


def test_version_tracks_what_changes_vectors(path: Path, tiny_bert: Callable[..., Path]) -> None:
    base = ModelSpec.load(path)
    assert base.version("float32") == ModelSpec.load(path).version("float32")
    others = {ModelSpec.load(path, pooling="cls").version("float32"),
              ModelSpec.load(path, max_length=64).version("float32"),
              ModelSpec.load(path, normalize=False).version("float32"),
              base.version("float16"),
              ModelSpec.load(tiny_bert(hidden=48)).version("float32")}
    assert base.version("float32") not in others and len(others) == 5
    assert all("{" not in v and " " not in v for v in others)
    assert ModelSpec.load(tiny_bert(hidden=48)).dim == 48


def test_bad_configuration_is_a_clear_error(path: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.json"):
        ModelSpec.load(tmp_path)
    with pytest.raises(ConfigError, match="pooling"):
        ModelSpec.load(path, pooling="max")
    with pytest.raises(ConfigError, match="float16 needs a CUDA"):
        TextEncoder(ModelSpec.load(path), device="cpu", dtype="float16")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            TextEncoder(ModelSpec.load(path), device="cuda")


def test_item_text_template_and_hash() -> None:
    assert item_text("Whole milk", brand="Acme", category="Dairy", description="Fresh") == \
        "Whole milk. brand: Acme. category: Dairy. Fresh"
    assert item_text("  ACME   cola ", brand="acme", category="", description=None) == "ACME cola"
    assert text_hash("a") == text_hash("a") != text_hash("b")


def test_cache_evicts_least_recently_used() -> None:
    cache = VectorCache(2)
    for key in "abc":
        cache.put(key, np.zeros(2))
        if key == "b":
            cache.get("a")
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None


def test_latest_event_per_item_wins() -> None:
    evs = [CatalogEvent(item_id="1", op="upsert", ts=5, title="a"), CatalogEvent(item_id="1", op="delete", ts=4),
           CatalogEvent(item_id="2", op="upsert", ts=1, title="b"), CatalogEvent(item_id="2", op="upsert", ts=1,
                                                                                 title="c")]
    out = {e.item_id: e for e in latest_per_item(evs)}
    assert out["1"].title == "a" and out["2"].title == "c"


def test_profile_vector_is_weighted_mean_and_spread_scales() -> None:
    vecs = {"a": np.array([1.0, 0.0], dtype=np.float32), "b": np.array([0.0, 1.0], dtype=np.float32)}
    p = profile_vector(vecs, [("a", 3.0), ("b", 1.0), ("missing", 9.0)])
    assert p is not None and p[0] > p[1] > 0 and abs(float(np.linalg.norm(p)) - 1.0) < 1e-6
    assert profile_vector(vecs, [("missing", 1.0)]) is None
    assert spread([("x", 0.9), ("y", 0.8), ("z", 0.85)]) == pytest.approx({"x": 1.0, "y": 0.0, "z": 0.5})
    assert spread([("x", 0.4)]) == {"x": 1.0}
