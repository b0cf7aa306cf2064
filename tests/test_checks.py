"""Input validation shared by every entry point, zero gradients, context length, the memory estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tl_reversed
from conftest import make_tiny
from tl_reversed import testing
from tl_reversed.core import memory
from tl_reversed.core.checks import check_layers, finite_float, positive_int
from tl_reversed.core.state import hook_count
from tl_reversed.experiments import attention_patching, perturbation, tasks
from tl_reversed.experiments.ranking import HeadScores

PROMPT, TARGET = "The cat sat on", " mat"
EX = (["abcd"], [" e"])  # one (prompts, targets) example


def _state(model):
    return (
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [m.training for m in model.modules()],
        hook_count(model),
    )


def _assert_same_state(model, before):
    after = _state(model)
    assert after[0] == before[0] and after[2] == before[2] and after[3] == before[3] == 0
    assert [g is None for g in after[1]] == [g is None for g in before[1]]


# --------------------------------------------------------------------------- zero gradients (item 3)


def test_all_zero_gradients_give_zero_projections(tiny):
    before = _state(tiny)
    lens = tl_reversed.backward_lens(tiny, PROMPT, metric=lambda logits, tokens: 0 * logits[:, -1, 0])
    assert lens.norms.abs().max() == 0 and lens.head_norms.abs().max() == 0
    assert lens.vjps.abs().max() == 0 and lens.head_vjps.abs().max() == 0
    for top in (lens.top, lens.head_top):
        assert (top.toward_ids == -1).all() and (top.away_ids == -1).all()
        assert top.toward_values.isnan().all() and top.away_values.isnan().all()
    assert lens.top_tokens("mlp_out", layer=1, position=-1) == []
    _assert_same_state(tiny, before)


def test_all_zero_gradients_with_ra_give_zero_maps(tiny):
    both = tl_reversed.backward_lens_and_ra(tiny, PROMPT, metric=lambda logits, tokens: 0 * logits[:, -1, 0])
    assert both.lens.norms.abs().max() == 0
    assert both.ra.maps.abs().max() == 0 and both.ra.norms.abs().max() == 0
    assert hook_count(tiny) == 0


# --------------------------------------------------------------------------- layers (item 4)


def _calls(model):
    cache = tl_reversed.cache_with_grads(model, PROMPT, TARGET)
    return {
        "reversed_attention": lambda layers: tl_reversed.reversed_attention(model, PROMPT, TARGET, layers=layers).layers,
        "backward_lens": lambda layers: tl_reversed.backward_lens(model, PROMPT, TARGET, layers=layers).layers,
        "backward_lens_and_ra": lambda layers: tl_reversed.backward_lens_and_ra(model, PROMPT, TARGET, layers=layers).ra.layers,
        "ra_from_cache": lambda layers: tl_reversed.ra_from_cache(cache, model, layers=layers).layers,
    }


@pytest.mark.parametrize(
    ("layers", "error", "match"),
    [
        ([1, 1], ValueError, r"layers \[1, 1\] repeat layer\(s\) \[1\]: name each layer once"),
        (True, TypeError, "layers must be None, a layer index or a list"),
        ([True], TypeError, "must be an integer, got the bool True"),
        ([0, 1.0], TypeError, r"must be an integer, got 1.0 \(float\)"),
        ([-1], ValueError, r"layers \[-1\] out of range: .*negative indices are not counted from the end"),
        ([2], ValueError, r"layers \[2\] out of range: the model has 2 layers \(0..1\)"),
        ([], ValueError, "layers is empty"),
    ],
)
def test_every_entry_point_refuses_the_same_bad_layers(tiny, layers, error, match):
    for name, call in _calls(tiny).items():
        with pytest.raises(error, match=match):
            call(layers)
        assert hook_count(tiny) == 0, name


@pytest.mark.parametrize("one", [np.int64(1), torch.tensor(1), [np.int32(1)], [torch.tensor(1)], torch.tensor([1])])
def test_integer_like_layers_are_accepted(tiny, one):
    for name, call in _calls(tiny).items():
        layers = call(one)
        assert layers == [1] and type(layers[0]) is int, name


def test_gradient_rank_layer_uses_the_same_rules(tiny):
    for bad, error in ((True, TypeError), (2, ValueError), (-1, ValueError), (1.0, TypeError)):
        with pytest.raises(error):
            tl_reversed.gradient_rank(tiny, PROMPT, TARGET, layer=bad, matrix="W_out")
    assert tl_reversed.gradient_rank(tiny, PROMPT, TARGET, layer=np.int64(1), matrix="W_out").layer == 1


def test_check_layers_accepts_operator_index_values():
    class Index:
        def __index__(self):
            return 3

    assert check_layers(Index(), 4) == [3]
    assert check_layers([Index(), 0], 4) == [3, 0]
    assert check_layers(None, 3) == [0, 1, 2]


# --------------------------------------------------------------------------- context length (item 5)


@pytest.mark.bridge
def test_context_bound_counts_the_tokens_the_model_reads():
    model = testing.tiny_model("llama", n_ctx=16)
    prompt = "a" * 15  # 16 tokens with BOS; with a 1-token target the model reads 16 tokens
    ra = tl_reversed.reversed_attention(model, prompt, "b")
    assert ra.tokens.shape == (1, 16)
    ra = tl_reversed.reversed_attention(model, "a" * 13, "bcd")  # 14 + 2 input tokens
    assert ra.tokens.shape == (1, 16)
    with pytest.raises(ValueError, match=r"prompt 0 is 17 tokens with its target minus its last token \(3 target "
                                         r"tokens\), longer than the model's context of 16 tokens"):  # fmt: skip
        tl_reversed.reversed_attention(model, "a" * 14, "bcd")
    tokens = torch.full((1, 17), int(model.to_tokens("a", prepend_bos=False)[0, 0]))  # to_tokens would truncate
    with pytest.raises(ValueError, match=r"prompt 0 is 17 tokens, longer than the model's context of 16 tokens"):
        tl_reversed.reversed_attention(model, tokens, metric=lambda logits, t: logits[:, -1, 0])
    assert hook_count(model) == 0


# --------------------------------------------------------------------------- numbers (item 6)


def test_targets_and_metric_together_are_refused(tiny):
    metric = lambda logits, tokens: logits[:, -1, 0]  # noqa: E731
    for call in (tl_reversed.reversed_attention, tl_reversed.backward_lens, tl_reversed.cache_with_grads):
        with pytest.raises(ValueError, match="give targets or a metric, not both"):
            call(tiny, PROMPT, TARGET, metric=metric)
    assert hook_count(tiny) == 0


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -math.inf, np.float32("nan")])
def test_non_finite_learning_rates_are_refused(tiny, lr):
    maps = torch.zeros(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"lr must be a finite number, got"):
        attention_patching.attention_patch_hooks(tiny, maps, lr)
    with pytest.raises(ValueError, match=r"lrs\[1\] must be a finite number"):
        attention_patching.evaluate_patching(tiny, EX, EX, lrs=[-1.0, lr])
    with pytest.raises(ValueError, match=r"lr must be a finite number"):
        attention_patching.iterative_patching(tiny, EX, EX, lr=lr)
    assert hook_count(tiny) == 0


def test_counts_must_be_integers(tiny):
    with pytest.raises(TypeError, match=r"batch_size must be an integer, got 2.5"):
        tl_reversed.reversed_attention(tiny, PROMPT, TARGET, batch_size=2.5)
    with pytest.raises(TypeError, match=r"batch_size must be an integer, got the bool True"):
        tl_reversed.backward_lens(tiny, PROMPT, TARGET, batch_size=True)
    with pytest.raises(TypeError, match=r"top_k must be an integer, got 2.0"):
        tl_reversed.backward_lens(tiny, PROMPT, TARGET, top_k=2.0)
    with pytest.raises(TypeError, match=r"steps must be an integer, got 2.0"):
        attention_patching.iterative_patching(tiny, EX, EX, steps=2.0)
    with pytest.raises(ValueError, match=r"steps must be at least 1, got 0"):
        attention_patching.iterative_patching(tiny, EX, EX, steps=0)
    with pytest.raises(TypeError, match=r"shots must be an integer, got 1.5"):
        tasks.make_examples("capitalize", shots=1.5)
    with pytest.raises(TypeError, match=r"batch_size must be an integer, got 1.5"):
        perturbation.perturbation_test(tiny, EX, torch.rand(2, 4), batch_size=1.5)
    assert len(tasks.make_examples("capitalize", shots=np.int64(1), n=2)) == 2
    assert positive_int(torch.tensor(3), "steps") == 3 and finite_float(np.float32(2), "lr") == 2.0


def test_nan_head_scores_are_refused(tiny):
    scores = torch.rand(2, 4)
    scores[1, 2] = float("nan")
    for given in (scores, HeadScores(scores, "ra")):
        with pytest.raises(ValueError, match=r"1 NaN or infinite entries \(first at \[\(1, 2\)\]\)"):
            perturbation.perturbation_test(tiny, EX, given)
    assert hook_count(tiny) == 0


# --------------------------------------------------------------------------- memory (item 10)


def test_memory_estimate_is_quadratic_in_tokens_and_linear_in_layers():
    shapes = memory.Shapes(n_layers=2, n_heads=4, d_model=32, d_vocab=99)
    for keep in ("norms", "maps"):
        e = [memory.estimate_peak(shapes, batch=1, tokens=t, keep=keep) for t in (10, 20, 30, 40)]
        second = [e[i + 2] - 2 * e[i + 1] + e[i] for i in range(2)]
        assert second[0] == pytest.approx(second[1], abs=2)  # constant second difference: quadratic
        quad = memory.PATTERN_COPIES * 2 * 4 * 4 + (memory.MAP_COPIES * 2 * 4 * 4 if keep == "maps" else 0)
        assert second[0] == pytest.approx(2 * quad * 10**2, abs=2)  # 2 * (t step)^2 * the T^2 coefficient
        by_layers = [
            memory.estimate_peak(memory.Shapes(layers, 4, 32, 99), batch=2, tokens=16, keep=keep)
            for layers in (1, 2, 3, 4)
        ]
        steps = {by_layers[i + 1] - by_layers[i] for i in range(3)}
        assert max(steps) - min(steps) <= 2  # linear in layers
    # four times the batch, four times the pass (the logits term too)
    one = memory.estimate_peak(shapes, batch=1, tokens=16)
    assert memory.estimate_peak(shapes, batch=4, tokens=16) == pytest.approx(4 * one, abs=4)


# Peaks measured by benchmarks/b4_growth.py (docs/benchmarks.md, B4) on the embedded SmolLM2
# (one prompt, a metric), and the 1,500-token peaks of the hardening issue, in MiB.
SMOLLM2 = memory.Shapes(n_layers=30, n_heads=9, d_model=576, d_vocab=49152)
MEASURED = {  # tokens: (keep="norms", keep="maps")
    32: (51, 51), 64: (141, 149), 128: (306, 339), 256: (731, 856), 512: (1636, 2629),
    1500: (8.9e9 / 2**20, 13.4e9 / 2**20),
}  # fmt: skip


@pytest.mark.parametrize("tokens", sorted(MEASURED))
def test_memory_estimate_is_within_a_third_of_the_measured_peaks(tokens):
    for keep, measured in zip(("norms", "maps"), MEASURED[tokens]):
        estimate = memory.estimate_peak(SMOLLM2, batch=1, tokens=tokens, keep=keep) / 2**20
        assert abs(estimate / measured - 1) < (0.32 if tokens == 32 else 0.22), (keep, estimate, measured)


def test_estimate_reads_the_model_shapes(tiny):
    shapes = memory.Shapes.of(tiny)
    assert shapes == memory.Shapes(n_layers=2, n_heads=4, d_model=32, d_vocab=tiny.cfg.d_vocab, bytes_per_value=4)


def test_not_enough_memory_raises_before_any_pass(tiny, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: (10 * 2**20, "the test"))
    tiny.train()
    before = _state(tiny)
    ran = []
    handle = tiny.blocks[0].register_forward_pre_hook(lambda module, args: ran.append(1))
    try:
        with pytest.raises(tl_reversed.WouldRunOutOfMemory, match=r'keep="norms".*smaller batch_size \(now 16 rows'):
            tl_reversed.reversed_attention(tiny, ["a" * 100] * 16, ["b"] * 16, metric=None)
        with pytest.raises(MemoryError, match=r"only 10 MiB is available .*the test.*shorter prompts \(now 101 tokens\)"):
            tl_reversed.backward_lens(tiny, ["a" * 100] * 16, ["b"] * 16)
        assert ran == []
        _assert_same_state(tiny, before)
        small = tl_reversed.reversed_attention(tiny, "abc", "d", keep="norms")  # well under 10 MiB
        assert ran and small.norms.shape == (1, 2, 4)
        big = tl_reversed.reversed_attention(tiny, ["a" * 100] * 16, ["b"] * 16, keep="norms", memory_check=False)
        assert big.norms.shape == (16, 2, 4)
    finally:
        handle.remove()
    _assert_same_state(tiny, before)
