"""Shared by every test layer: the hypothesis profile, the ``integration`` mark by folder, tiny random encoders.

Nothing here starts a process: the broker and Redis are session fixtures in ``integration/conftest.py``, so
only tests under ``tests/integration/`` can request them, and ``-m "not integration"`` deselects all of those.
"""

import os
import string
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings as hyp_settings

# CI runs the contract fuzzing at full size; local runs can set HYPOTHESIS_PROFILE=dev to go faster.
hyp_settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
hyp_settings.register_profile("dev", deadline=None, max_examples=50)
hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INTEGRATION = Path(__file__).resolve().parent / "integration"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under ``tests/integration/`` as ``integration`` (a conftest ``pytestmark`` marks nothing),
    and run the unit tests first: they fail in seconds, the integration tests take minutes."""
    integration = {item.nodeid for item in items if item.path.resolve().is_relative_to(INTEGRATION)}
    for item in items:
        if item.nodeid in integration:
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: item.nodeid in integration)  # stable: file order within each group


# --------------------------------------------------------------------------- tiny random encoders
_WORDS = ("milk", "cheese", "yogurt", "butter", "dairy", "organic", "whole", "bread", "battery", "charger",
          "car", "phone", "cola", "soda", "brand", "category", "grocery", "frozen", "pizza", "apple")


def build_tiny_bert(path: Path, *, hidden: int = 32, seed: int = 0, layers: int = 2) -> Path:
    """A randomly initialised BERT with a word-piece vocabulary that covers any ASCII text."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *chars, *_WORDS,
             *(f"##{c}" for c in chars)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_bert(hidden=32, seed=0)`` -> directory of a tiny random BERT, built once per shape."""
    built: dict[tuple[int, int], Path] = {}

    def make(hidden: int = 32, seed: int = 0) -> Path:
        if (hidden, seed) not in built:
            built[(hidden, seed)] = build_tiny_bert(tmp_path_factory.mktemp(f"bert-{hidden}-{seed}"),
                                                    hidden=hidden, seed=seed)
        return built[(hidden, seed)]

    return make
