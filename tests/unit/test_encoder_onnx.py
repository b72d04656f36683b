"""The encoder on ONNX Runtime (fp32 and int8), on a tiny random BERT exported in the test."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fusionrec.core.errors import ConfigError
from fusionrec.core.settings import Settings
from fusionrec.models import export
from fusionrec.models.backfill import encoder_for_version, version_info
from fusionrec.models.encoder import RECIPES, ModelSpec, TextEncoder, checkpoint_digest, resolve_runtime

TEXTS = ["organic whole milk", "car battery charger for the garage", "cola", "frozen pizza 12 oz",
         "apple", "greek yogurt plain 32 oz organic"]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def path(tiny_bert: Callable[..., Path]) -> Path:
    return tiny_bert()


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1))


def test_onnx_fp32_equals_torch_and_int8_stays_close(path: Path, exports: Path) -> None:
    reference = TextEncoder(ModelSpec.load(path), device="cpu").encode(TEXTS, batch_size=4)
    fp32 = TextEncoder(ModelSpec.load(path, runtime="onnx"), device="cpu", export_dir=exports)
    np.testing.assert_allclose(fp32.encode(TEXTS, batch_size=4), reference, atol=1e-5)
    int8 = TextEncoder(ModelSpec.load(path, runtime="onnx-int8"), device="cpu", export_dir=exports)
    vectors = int8.encode(TEXTS, batch_size=4)
    assert vectors.shape == reference.shape and vectors.dtype == np.float32
    assert cosines(vectors, reference).min() > 0.99
    # quantised for real, not the fp32 graph again: integer matmuls in the graph, other numbers out
    ops = {node.op_type for node in onnx.load(next(exports.rglob("int8.onnx"))).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert np.abs(vectors - reference).max() > 1e-6
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Activations are quantised per call, so a text's vector moves slightly with its batch, no more.
    single = np.stack([int8.encode([t])[0] for t in TEXTS])
    assert cosines(single, vectors).min() > 0.999
    assert int8.model is None and int8.describe()["runtime"] == "onnx-int8" and int8.describe()["dtype"] == "int8"


def test_int8_keeps_the_feed_forward_down_projections_in_float(path: Path, exports: Path) -> None:
    TextEncoder(ModelSpec.load(path, runtime="onnx-int8"), device="cpu", export_dir=exports)
    folder = exports / f"{checkpoint_digest(path)}-{RECIPES['onnx-int8']}"
    kept = export.feed_forward_down_projections(folder / "fp32.onnx")
    assert len(kept) == 2  # one per layer of the tiny BERT
    graph = onnx.load(str(folder / "int8.onnx")).graph
    ops = {node.name: node.op_type for node in graph.node}
    assert all(ops[name] == "MatMul" for name in kept)
    assert sum(op == "MatMulInteger" for op in ops.values()) == 2 * 5  # Q, K, V, attention output, FFN up


def test_an_export_is_cached_per_checkpoint_content(path: Path, exports: Path, tiny_bert: Callable[..., Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    TextEncoder(ModelSpec.load(path, runtime="onnx"), device="cpu", export_dir=exports)

    def no_export(*_: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_fp32", no_export)
    TextEncoder(ModelSpec.load(path, runtime="onnx"), device="cpu", export_dir=exports)  # from the cache
    other = tiny_bert(seed=1)  # same shapes and file sizes, other weights
    assert ModelSpec.load(other).version("float32") != ModelSpec.load(path).version("float32")
    with pytest.raises(ConfigError, match="FUSIONREC_EMBED_RUNTIME=torch"):
        TextEncoder(ModelSpec.load(other, runtime="onnx"), device="cpu", export_dir=exports)


def test_workers_starting_together_export_once(tiny_bert: Callable[..., Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = tiny_bert(seed=2)
    calls = []
    real = export.export_fp32

    def counted(source: Path, target: Path) -> None:
        calls.append(target)
        real(source, target)

    monkeypatch.setattr(export, "export_fp32", counted)
    found: list[Path] = []
    threads = [threading.Thread(target=lambda: found.append(export.exported(checkpoint, "onnx", "r", tmp_path)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(found)) == 1 and len(found) == 3 and found[0].exists()
    assert [p.name for p in found[0].parent.iterdir() if p.name.endswith(".tmp")] == []


def test_runtime_choice_and_versions(path: Path) -> None:
    assert resolve_runtime("auto", CPU, "mean") == "onnx-int8"
    assert resolve_runtime("auto", CPU, "last") == "torch"  # decoder LLM embedders stay on torch
    assert resolve_runtime("auto", CUDA, "mean") == "torch"
    assert resolve_runtime("onnx", CPU, "cls") == "onnx"
    with pytest.raises(ConfigError, match="runs on CPU"):
        resolve_runtime("onnx-int8", CUDA, "mean")
    with pytest.raises(ConfigError, match="runtime"):
        resolve_runtime("tensorrt", CPU, "mean")
    with pytest.raises(ConfigError, match="float32"):
        TextEncoder(ModelSpec.load(path, runtime="onnx"), device="cpu", dtype="bfloat16")
    with pytest.raises(ConfigError, match="EMBED_RUNTIME"):
        Settings.from_env({}, embed_runtime="tensorrt")
    torch_v, onnx_v, int8_v = (ModelSpec.load(path, runtime=r).version("float32") for r in ("torch", "onnx",
                                                                                             "onnx-int8"))
    assert torch_v == onnx_v != int8_v  # the same vectors share a version; quantised ones get their own
    assert RECIPES["onnx-int8"] and RECIPES["torch"] is None
    spec = ModelSpec.from_settings(Settings.from_env({}, embed_model_path=str(path), embed_device="cpu"))
    assert spec.runtime == "onnx-int8"


def test_passes_are_padded_to_their_own_longest_by_token_count(path: Path) -> None:
    enc = TextEncoder(ModelSpec.load(path), device="cpu")
    # Few characters, many word pieces, and the reverse: ordered by characters they would share passes.
    texts = ["qzqzqzqzqz", "milk cheese yogurt butter", "xjxjxjxjxj", "organic whole bread pizza"]
    widths: list[int] = []
    forward = enc.forward

    def spy(batch):  # type: ignore[no-untyped-def]
        widths.append(int(batch["input_ids"].shape[1]))
        return forward(batch)

    enc.forward = spy  # type: ignore[method-assign]
    vectors = enc.encode(texts, batch_size=2)
    lengths = [len(enc.tokenizer(t)["input_ids"]) for t in texts]
    assert widths == [max(sorted(lengths)[:2]), max(lengths)] and widths[0] < widths[1]
    np.testing.assert_allclose(vectors, np.stack([enc.encode([t])[0] for t in texts]), atol=2e-5)


def test_a_query_encoder_follows_the_runtime_that_wrote_the_vectors(path: Path, exports: Path) -> None:
    s = Settings.from_env({}, embed_model_path=str(path), embed_device="cpu", embed_export_dir=str(exports))
    torch_version = version_info(dataclasses.replace(ModelSpec.from_settings(s), runtime="torch"), s).version
    int8_version = version_info(ModelSpec.from_settings(s), s).version
    assert torch_version != int8_version
    assert encoder_for_version(s, torch_version).runtime == "torch"  # vectors a GPU pool wrote
    assert encoder_for_version(s, int8_version).runtime == "onnx-int8"
    assert encoder_for_version(s, "other-model-32d-00000000").runtime == "onnx-int8"  # search then says why not
    assert encoder_for_version(s.replace(embed_runtime="onnx-int8"), torch_version).runtime == "onnx-int8"


def test_the_gpu_path_on_cpu_everything_but_the_device(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: the CUDA plan, runtime and dtype choices, and the half-precision torch path on CPU."""
    from fusionrec.models.encoder import resolve_dtype
    from fusionrec.models.pool import plan

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    s = Settings.from_env({}, embed_model_path=str(path))
    assert [(slot.device, slot.threads) for slot in plan(s)] == [("cuda:0", 0), ("cuda:1", 0)]  # one per GPU
    assert [slot.device for slot in plan(s, workers=3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [slot.device for slot in plan(s.replace(embed_device="cpu"), workers=2)] == ["cpu", "cpu"]
    assert resolve_runtime("auto", CUDA, "mean") == "torch" and resolve_dtype("auto", CUDA) == torch.float16
    reference = TextEncoder(ModelSpec.load(path), device="cpu").encode(TEXTS, batch_size=4)
    half = TextEncoder(ModelSpec.load(path), device="cpu", dtype="bfloat16")  # fp16 needs CUDA; same code path
    vectors = half.encode(TEXTS, batch_size=4)
    assert vectors.dtype == np.float32 and cosines(vectors, reference).min() > 0.99
