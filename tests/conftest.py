"""Shared fixtures: tiny random-weight models (fast) and the embedded model (end-to-end)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core host thread barriers stall."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's real tokenizer (chat template included)."""
    from transformers import AutoTokenizer

    from persona_ops.models import embedded_model_dir, prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(embedded_model_dir()))


@pytest.fixture(scope="session")
def tiny_loaded(smol_tokenizer):
    """A 4-layer random llama with the real SmolLM2 tokenizer, wrapped like a loaded model."""
    from persona_ops.models import LoadedModel, tiny_model

    model = tiny_model("llama", num_layers=4, hidden=64, vocab_tokenizer=smol_tokenizer)
    return LoadedModel(model=model, tokenizer=smol_tokenizer, label="tiny-random-llama@test")


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (SmolLM2-135M-Instruct); loads in seconds once cached."""
    from persona_ops.models import load_model

    return load_model("embedded")
