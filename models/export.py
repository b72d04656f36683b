"""The encoder on ONNX Runtime: exported from the local checkpoint at first use, optionally int8, cached.

Runtimes (``FUSIONREC_EMBED_RUNTIME``; :func:`fusionrec.models.encoder.resolve_runtime` picks for ``auto``):

``onnx``
    The checkpoint's forward pass (last hidden state) exported with ``torch.onnx.export`` — the
    ``torch.export``-based exporter, dynamic batch and sequence axes, fp32 — and run by ONNX Runtime's
    CPU provider with all graph optimisations. Its vectors equal torch's to float rounding, so it keeps
    the torch path's vector version.
``onnx-int8``
    The same export, then ONNX Runtime's dynamic quantisation: int8 weights per output channel,
    activations quantised per call, on every ``MatMul`` whose weight is a constant (attention
    scores stay float) *except* the feed-forward down-projections (a weight with more input than
    output features). Their inputs come straight out of GELU and carry the outliers that cost int8
    most of its error: on Complete Journey titles, all-MiniLM-L6-v2 keeps a mean cosine of 0.996
    with fp32 and 0.93 of each item's 10 nearest neighbours this way, against 0.991 and 0.90 with
    them quantised (``bench/embed.py``, BENCHMARKS.md). Different vectors, so a version of its own
    (:data:`~fusionrec.models.encoder.RECIPES`): switching to it goes through backfill and flip.

Exports are cached under ``<export dir>/<digest>/`` where the digest covers the weights' bytes, the
config and the recipe, so a changed checkpoint or recipe exports again and an unchanged one never
does. Workers starting together export once: a file lock serialises them, and each file is written
under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionrec.core.errors import ConfigError
from fusionrec.models.encoder import MODEL_INPUTS, checkpoint_digest

log = logging.getLogger(__name__)

_EXAMPLES = ["an example item title", "a second, somewhat longer example of an item title with a brand"]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _atomic(target: Path) -> Path:
    """A temporary name beside ``target``, in the same directory, for write-then-rename."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's and quantiser's progress lines, warnings and root-logger advice, kept out of worker logs."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _LastHidden(torch.nn.Module):
    """The model with keyword inputs and one output, the shape an ONNX graph wants."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state


def export_fp32(checkpoint: Path, target: Path) -> None:
    """The checkpoint's last hidden state as a self-contained fp32 ONNX file (dynamic batch and length)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    model = AutoModel.from_pretrained(checkpoint, local_files_only=True, dtype=torch.float32).eval()
    example = tokenizer(_EXAMPLES, padding=True, return_tensors="pt")
    names = tuple(n for n in MODEL_INPUTS if n in example)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    tmp = _atomic(target)
    try:
        with _quiet():
            torch.onnx.export(_LastHidden(model).eval(), tuple(example[n] for n in names), str(tmp),
                              dynamo=True, input_names=list(names), output_names=["last_hidden_state"],
                              dynamic_shapes={n: {0: batch, 1: length} for n in names}, external_data=False,
                              verbose=False)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def feed_forward_down_projections(model_path: Path) -> list[str]:
    """Names of the ``MatMul`` nodes whose constant weight maps more features to fewer (FFN outputs)."""
    import onnx

    model = onnx.load(str(model_path))
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and len(shapes.get(node.input[1], ())) == 2
            and shapes[node.input[1]][0] > shapes[node.input[1]][1]]


def quantize_int8(source: Path, target: Path) -> None:
    """The ``onnx-int8`` recipe described in the module docstring."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = _atomic(target)
    try:
        with _quiet():
            quantize_dynamic(source, tmp, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"], nodes_to_exclude=feed_forward_down_projections(source),
                             extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def exported(checkpoint: Path, runtime: str, recipe: str, export_dir: Path) -> Path:
    """The ONNX file for ``runtime`` (``onnx`` or ``onnx-int8``), exporting it first if not cached."""
    folder = export_dir / f"{checkpoint_digest(checkpoint)}-{recipe}"
    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    wanted = int8 if runtime == "onnx-int8" else fp32
    if wanted.exists():
        return wanted
    with _locked(folder):
        if wanted.exists():  # another worker exported it while we waited
            return wanted
        t0 = time.perf_counter()
        try:
            if not fp32.exists():
                export_fp32(checkpoint, fp32)
            if wanted is int8:
                quantize_int8(fp32, int8)
        except Exception as exc:
            raise ConfigError(f"cannot export the encoder in {checkpoint} to ONNX ({type(exc).__name__}: {exc}); "
                              "set FUSIONREC_EMBED_RUNTIME=torch to run it on torch") from exc
        log.info("exported %s for runtime %s in %.1f s: %s", checkpoint, runtime, time.perf_counter() - t0, wanted)
    return wanted


class OnnxForward:
    """One ONNX Runtime CPU session: a padded batch in, the last hidden states out (a torch tensor)."""

    def __init__(self, model_path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per core
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: Any) -> torch.Tensor:
        feeds = {name: np.ascontiguousarray(batch[name].cpu().numpy(), dtype=np.int64) for name in self.inputs}
        return torch.from_numpy(self.session.run(None, feeds)[0])
