"""Long prompts: maps of chosen query rows, and the memory-bounded RA pass.

Runs twice like test_core: TransformerBridge models, and with ``TL_REVERSED_LEGACY=1``
HookedTransformer models (tests marked ``bridge`` are deselected there).
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tl_reversed
from conftest import LEGACY, make_tiny, model_state
from tl_reversed.core import bounded, paths, rows
from tl_reversed.core.architecture import EMBED, attn_hook, describe

PROMPTS = ["The cat sat on the mat and looked at the", "A dog ran"]
TARGETS = [" door", " far"]
ARCHS = ["llama", "gpt2"] if LEGACY else ["gpt2", "llama", "gemma3", "opt", "gptj"]


def _text(n_chars: int) -> str:
    words = "the quick brown fox jumps over a lazy dog while seven owls watch quietly "
    return (words * (n_chars // len(words) + 1))[:n_chars]


# --------------------------------------------------------------------------- query rows


@pytest.mark.parametrize("query_positions", ["last", "targets", [0, 3, 7]])
def test_query_rows_are_the_rows_of_the_full_maps(query_positions):
    model = make_tiny("llama")
    full = tl_reversed.reversed_attention(model, PROMPTS, TARGETS, path="standard")
    kept = tl_reversed.reversed_attention(model, PROMPTS, TARGETS, query_positions=query_positions, path="standard")
    prompt_lengths = [model.to_tokens(p).shape[1] for p in PROMPTS]
    for i in range(len(PROMPTS)):
        positions = kept.rows(i)
        expected = query_positions
        if query_positions == "last":
            expected = [prompt_lengths[i] - 1]
        elif query_positions == "targets":
            expected = list(range(prompt_lengths[i] - 1, prompt_lengths[i] - 1 + len(TARGETS[i])))
        assert positions == expected
        r, n = len(positions), int(full.lengths[i])
        want = full.maps[i][:, :, positions, :n]
        torch.testing.assert_close(kept.maps[i, :, :, :r, :n], want, atol=1e-6, rtol=0)
        torch.testing.assert_close(kept.pattern[i, :, :, :r, :n], full.pattern[i][:, :, positions, :n], atol=1e-6, rtol=0)
        torch.testing.assert_close(kept.norms[i], want.flatten(-2).norm(dim=-1), atol=1e-6, rtol=1e-5)
        assert kept.head(1, 2, i).shape == (r, n)
        info = kept.describe_head(1, 2, i)
        assert info["query_pos"] in positions
    assert kept.maps.shape[:4] == (2, describe(model).n_layers, describe(model).n_heads, kept.query_positions.shape[1])
    torch.testing.assert_close(kept.loss, full.loss)


def test_targets_rows_pad_shorter_examples_with_minus_one():
    model = make_tiny("llama")
    result = tl_reversed.reversed_attention(model, PROMPTS, [" door", " x"], query_positions="targets", keep="norms")
    last = model.to_tokens(PROMPTS[1]).shape[1] - 1  # " x" is two characters: two rows, then three pads
    assert result.query_positions[1].tolist() == [last, last + 1, -1, -1, -1]
    assert result.maps is None and result.rows(1) == [last, last + 1]


@pytest.mark.parametrize(
    ("query_positions", "error", "message"),
    [
        ([0, 12, 13], ValueError, r"query positions \[13\] are beyond the prompt: the shortest example has 13 tokens \(positions 0..12"),
        ([], ValueError, "query_positions is an empty list"),
        ([-1], ValueError, r"query positions \[-1\] are negative"),
        ("first", ValueError, "query_positions must be None, 'last', 'targets' or a list"),
        ([1.5], TypeError, "query_positions must be integers"),
    ],
)
def test_query_positions_errors_leave_the_model_as_found(query_positions, error, message):
    model = make_tiny("llama")
    before = model_state(model)
    with pytest.raises(error, match=message):
        tl_reversed.reversed_attention(model, PROMPTS, TARGETS, query_positions=query_positions)
    assert model_state(model) == before


def test_targets_rows_need_targets():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="query_positions='targets' needs targets"):
        tl_reversed.reversed_attention(model, "A cat", metric=lambda logits, tokens: logits[:, -1, 5], query_positions="targets")


def test_row_results_plot_and_render():
    from tl_reversed.views.plotting import plot_compare, plot_head

    model = make_tiny("llama")
    result = tl_reversed.reversed_attention(model, PROMPTS, TARGETS, query_positions="targets")
    fig = plot_head(result, 1, 2)
    assert fig.axes[1].images[0].get_array().shape == (len(TARGETS[0]), int(result.lengths[0]))
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()][0].endswith(f"({result.rows(0)[0]})")
    with pytest.raises(ValueError, match="plot_compare compares whole maps"):
        plot_compare(result, result, 0, 0)


def test_row_results_render_as_html():
    result = tl_reversed.reversed_attention(make_tiny("llama"), PROMPTS, TARGETS, query_positions="targets")
    page = result.to_html(heads=[(1, 2)])
    assert f"query rows {result.rows(0)} only" in page


def test_row_results_save_and_load(tmp_path):
    model = make_tiny("llama")
    result = tl_reversed.reversed_attention(model, PROMPTS, TARGETS, query_positions="last")
    loaded = type(result).load(result.save(tmp_path / "rows.safetensors"))
    assert torch.equal(loaded.query_positions, result.query_positions)
    assert loaded.rows(1) == result.rows(1)


# --------------------------------------------------------------------------- the bounded pass


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_chars", [3, 37, 55])  # 55 + 4 tokens fit the legacy tiny model's 64
def test_bounded_pass_equals_the_standard_pass(arch, n_chars, monkeypatch):
    model = make_tiny(arch)
    prompts = [_text(n_chars), _text(max(1, n_chars // 3))]
    targets = [" dog", " x"]
    n_heads = describe(model).n_heads
    width = n_chars + 4  # BOS, prompt, target minus its last token
    monkeypatch.setattr(rows, "TILE_ELEMENTS", 7 * 2 * n_heads * width)  # query tiles of 7 rows, not dividing width
    before = model_state(model)
    for keep, query_positions in [("norms", None), ("maps", "targets"), ("maps", None)]:
        standard = tl_reversed.reversed_attention(
            model, prompts, targets, keep=keep, query_positions=query_positions, path="standard"
        )
        bound = tl_reversed.reversed_attention(model, prompts, targets, keep=keep, query_positions=query_positions, path="bounded")
        torch.testing.assert_close(bound.norms, standard.norms, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bound.pattern_norms, standard.pattern_norms, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bound.loss, standard.loss, atol=1e-5, rtol=1e-5)
        if keep == "maps":
            torch.testing.assert_close(bound.maps, standard.maps, atol=1e-5, rtol=1e-5)
    assert standard.maps.shape[-1] == width
    assert model_state(model) == before


def test_bounded_pass_matches_finite_differences_in_float64():
    """RA from the bounded pass is dL/d(Q.K^T): perturb one product by eps (the scores by eps * c).

    GPT-2 (and HookedTransformer) keep their softmax in float64, so a small step works.
    """
    model = make_tiny("gpt2", dtype=torch.float64)
    prompt, target, layer, head = "The cat sat on", "m", 1, 1
    result = tl_reversed.reversed_attention(model, prompt, target, query_positions="last", path="bounded")
    tokens = model.to_tokens(prompt)
    q = tokens.shape[1] - 1
    scale = describe(model).scales[layer]
    target_id = int(model.to_tokens(target, prepend_bos=False)[0, 0])

    def loss(key: int, delta: float) -> float:
        def edit(scores, hook):
            scores = scores.clone()
            scores[0, head, q, key] += delta
            return scores

        with torch.no_grad(), model.hooks(fwd_hooks=[(attn_hook(layer, "attn_scores"), edit)]):
            logits = model(tokens)
        return float(-logits[0, q].log_softmax(-1)[target_id])

    eps = 1e-5
    numeric = torch.tensor([(loss(k, eps * scale) - loss(k, -eps * scale)) / (2 * eps) for k in range(q + 1)])
    row = result.maps[0, layer, head, 0, : q + 1].double()
    assert result.rows(0) == [q] and row.abs().max() > 1e-4
    torch.testing.assert_close(row, numeric.double(), atol=1e-6 * row.abs().max().item(), rtol=0)


class _SquareProbe(TorchDispatchMode):
    """Counts the live tensors with two axes of length ``tokens`` (``[.., T, T]`` attention-sized)."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens, self.live, self.peak = tokens, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and list(t.shape).count(self.tokens) >= 2:
                self.live[id(t)] = weakref.ref(t)
        self.live = {k: r for k, r in self.live.items() if r() is not None}
        self.peak = max(self.peak, len(self.live))
        return out


def _peak_square_tensors(n_layers: int, path: str) -> int:
    model = make_tiny("llama", n_layers=n_layers)
    prompt = _text(45)
    tokens = model.to_tokens(prompt).shape[1] + 3  # the target " dog" adds 3 of its 4 characters
    probe = _SquareProbe(tokens)
    with probe:
        tl_reversed.reversed_attention(model, prompt, " dog", keep="norms", path=path)
    return probe.peak


def test_bounded_pass_keeps_no_attention_pattern_per_layer():
    # the standard pass keeps every layer's [head, T, T] tensors for its backward: the probe sees them grow
    assert _peak_square_tensors(5, "standard") >= _peak_square_tensors(2, "standard") + 3
    # the bounded pass holds one layer's at a time, however deep the model
    assert _peak_square_tensors(5, "bounded") == _peak_square_tensors(2, "bounded")


def test_auto_path_rule():
    spec = describe(make_tiny("llama"))
    assert bounded.standard_pattern_bytes(spec, 30, 2, 1000, torch.float32) == 2 * 30 * spec.n_heads * 1000**2 * 4
    big, small = bounded.BOUNDED_ABOVE_BYTES + 1, bounded.BOUNDED_ABOVE_BYTES
    assert bounded.choose_path("auto", "norms", None, big) == "bounded"
    assert bounded.choose_path("auto", "norms", None, small) == "standard"
    assert bounded.choose_path("auto", "maps", "last", big) == "bounded"
    assert bounded.choose_path("auto", "maps", None, big) == "standard"  # whole maps are T^2 themselves
    assert bounded.choose_path("standard", "norms", None, big) == "standard"
    assert bounded.choose_path("bounded", "maps", None, 0) == "bounded"

    model = make_tiny("llama")
    assert paths.threshold(model) == bounded.BOUNDED_ABOVE_BYTES
    seen = []

    def spy(x, hook):  # the bounded pass replaces the blocks' forward on this instance while it runs
        seen.append("forward" in vars(model.blocks[0]))

    probe = [(attn_hook(0, "v"), spy)]
    tl_reversed.reversed_attention(model, PROMPTS, TARGETS, keep="norms", extra_hooks=probe)
    assert seen and not any(seen)  # tiny prompts: far below 1 GiB of patterns
    seen.clear()
    with paths.bounded_above(model, 0):
        assert paths.threshold(model) == 0 and paths.threshold(make_tiny("gpt2")) == bounded.BOUNDED_ABOVE_BYTES
        tl_reversed.reversed_attention(model, PROMPTS, TARGETS, keep="norms", extra_hooks=probe)
        assert seen and all(seen)
        seen.clear()
        tl_reversed.reversed_attention(model, PROMPTS, TARGETS, keep="maps", extra_hooks=probe)  # whole maps
        assert seen and not any(seen)
    assert paths.threshold(model) == bounded.BOUNDED_ABOVE_BYTES
    with pytest.raises(ValueError, match=r"path must be one of \('auto', 'standard', 'bounded'\), got 'fast'"):
        tl_reversed.reversed_attention(model, PROMPTS, TARGETS, path="fast")
    with pytest.raises(ValueError, match="nbytes must be a non-negative integer"):
        with paths.bounded_above(model, -1):
            pass


def test_bounded_pass_restores_the_model_after_an_error():
    model = make_tiny("llama")
    before = model_state(model)

    def bad_metric(logits, tokens):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        tl_reversed.reversed_attention(model, "A cat sat", metric=bad_metric, keep="norms", path="bounded")
    assert model_state(model) == before
    plain = tl_reversed.reversed_attention(model, PROMPTS, TARGETS, keep="norms", path="standard")
    assert torch.isfinite(plain.norms).all()


def test_checkpointed_blocks_refuses_a_model_whose_forward_is_already_replaced():
    model = make_tiny("llama")
    object.__setattr__(model.blocks[0], "forward", model.blocks[0].forward)
    try:
        with pytest.raises(RuntimeError, match=r"blocks \[0\] already have their forward replaced"):
            tl_reversed.reversed_attention(model, PROMPTS, TARGETS, keep="norms", path="bounded")
    finally:
        vars(model.blocks[0]).pop("forward")
    assert EMBED in model.hook_dict
