"""Attention in query tiles: the autograd function, the RA it reduces, and the bounded pass on it.

The tiled attention replaces the eager scores of TransformerBridge models (GPT-2, Llama,
Gemma 3); tests that run models are marked ``bridge``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tl_reversed
from conftest import make_tiny
from tl_reversed.core import rows
from tl_reversed.core.architecture import attn_hook, describe
from tl_reversed.core.attention_seams import tiled_unsupported
from tl_reversed.core.rows import TileReducer, reduce_layer
from tl_reversed.core.state import hook_count
from tl_reversed.core.tiled_attention import causal_mask, tiled_attention

PROMPTS = ["the quick brown fox jumps over a lazy dog while seven owls", "A dog ran"]
TARGETS = [" door", " x"]
SEAM_NAMES = ("forward", "_update_kv_cache", "_reconstruct_attention")


def _window(width: int):
    def mask(scores, start, stop):  # causal, and a sliding window of 4 keys
        query = torch.arange(start, stop)[:, None]
        key = torch.arange(width)[None]
        return scores.masked_fill((key > query) | (key <= query - 4), float("-inf"))

    return mask


def _eager(q, k, v, scale, softcap, mask):
    keys, values = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    scores = q @ keys.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return mask(scores, 0, q.shape[2]).softmax(-1) @ values


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("windowed", [False, True])
def test_tiled_attention_equals_eager_attention_and_its_gradient(softcap, windowed):
    gen = torch.Generator().manual_seed(0)
    width = 13
    q = torch.randn(2, 4, width, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, width, 8, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    mask = _window(width) if windowed else causal_mask
    out = tiled_attention(q, k, v, 0.3, softcap=softcap, mask=mask, tile=5)  # tiles of 5, 5, 3 rows
    want = _eager(q, k, v, 0.3, softcap, mask)
    torch.testing.assert_close(out, want, atol=1e-13, rtol=0)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad(out, (q, k, v), grad)
    expected = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda *x: tiled_attention(*x, 0.3, softcap=softcap, mask=mask, tile=4), (q, k, v))


@pytest.mark.parametrize("kept", [None, [[3, 11, -1], [0, 12, 7]]])
def test_tile_reducer_gives_what_reduce_layer_gives(kept):
    """RA reduced from the backward's tiles equals RA from the whole pattern, values and grad(hook_z)."""
    gen = torch.Generator().manual_seed(1)
    width, scale = 13, 0.3
    q = torch.randn(2, 4, width, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, width, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    lengths = torch.tensor([13, 9])
    index = None if kept is None else torch.tensor(kept)
    got: dict = {}
    reducer = TileReducer(lengths, index, True, scale, got.update)
    out = tiled_attention(q, k, v, scale, tile=4, observer=reducer)
    grad_z = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    out.backward(grad_z)
    pattern = _eager(q.detach(), k, torch.eye(width, dtype=torch.float64)[None, None].expand(2, 2, -1, -1), scale, None, causal_mask)
    want = reduce_layer(pattern, v.transpose(1, 2), grad_z.transpose(1, 2), scale, lengths, index, keep_maps=True)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-12, rtol=0)


class _Patterns:
    """An observer that keeps the pattern tiles the backward recomputes."""

    def __init__(self):
        self.tiles: list[torch.Tensor] = []

    def add(self, start, pattern, grad_pattern, grad_out, values):
        self.tiles.append(pattern)

    def finish(self):
        pass


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backward_recomputes_the_forwards_pattern(dtype, softcap):
    """Large logits (|scores| up to ~35) in bf16/fp16: the backward's pattern is the forward's.

    The forward makes the scores in the model dtype and saves their log-sum-exp; a backward
    that recomputed them in float32 used another pattern (rows summed to 0.94-1.09 in bf16).
    The reference is float64 attention on the model's own half-precision scores (their
    rounding passed straight through to the gradient). The output and the gradients are
    rounded to the dtype and the forward rounds the pattern before ``@ V``, so they may
    differ from it by about one ``eps`` of the dtype relative to their largest entry: 1.5 eps
    allowed (measured 0.8-1.1 eps after the fix, 1.8-4.7 eps before).
    """
    gen = torch.Generator().manual_seed(0)
    width, scale = 40, 0.25
    q = (torch.randn(2, 4, width, 16, generator=gen) * 2.5).to(dtype).requires_grad_()
    k = (torch.randn(2, 2, width, 16, generator=gen) * 2.5).to(dtype).requires_grad_()
    v = torch.randn(2, 2, width, 16, generator=gen).to(dtype).requires_grad_()
    observer = _Patterns()
    out = tiled_attention(q, k, v, scale, softcap=softcap, tile=7, observer=observer)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    sums = torch.cat([tile.sum(-1).flatten() for tile in observer.tiles])
    assert sums.numel() == 2 * 4 * width
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)

    keys, values = (x.repeat_interleave(2, dim=1) for x in (k, v))
    model_scores = q @ keys.transpose(-1, -2) * scale  # in the model dtype, as the eager bridge
    exact = q.double() @ keys.double().transpose(-1, -2) * scale
    if softcap is not None:
        model_scores, exact = (torch.tanh(x / softcap) * softcap for x in (model_scores, exact))
    scores = exact + (model_scores.double() - exact).detach()
    want = causal_mask(scores, 0, width).softmax(-1) @ values.double()
    expected = torch.autograd.grad(want, (q, k, v), grad.double())
    eps = torch.finfo(dtype).eps
    for a, b in zip((out, *got), (want, *expected)):
        assert (a.double() - b).abs().max() <= 1.5 * eps * b.abs().max()


def _attention_state(model) -> tuple:
    return hook_count(model), [name for block in model.blocks for name in vars(block.attn) if name in SEAM_NAMES]


class _Probe(TorchDispatchMode):
    """Every tensor made with two axes of length ``tokens``; the ``[batch, head, rows, tokens]`` ones' row counts."""

    def __init__(self, tokens: int, n_heads: int, d_head: int):
        super().__init__()
        self.tokens, self.n_heads, self.d_head = tokens, n_heads, d_head
        self.squares: list[tuple[int, ...]] = []
        self.tile_rows: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor):
                continue
            if list(t.shape).count(self.tokens) >= 2:
                self.squares.append(tuple(t.shape))
            if t.ndim == 4 and t.shape[1] == self.n_heads and t.shape[-1] == self.tokens and t.shape[2] != self.d_head:
                self.tile_rows.add(t.shape[2])
        return out


def _probe(model, path: str, tokens: int):
    spec = describe(model)
    probe = _Probe(tokens, spec.n_heads, spec.d_head)  # [batch, head, d_head, T]: keys transposed, not a tile
    saved: list[tuple[tuple[int, ...], int]] = []

    def pack(t):
        if list(t.shape).count(tokens) >= 2:
            saved.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    with probe, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tl_reversed.reversed_attention(model, PROMPTS[0], " dog", keep="norms", path=path)
    return probe, saved


@pytest.mark.bridge
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_bounded_pass_never_holds_a_layers_attention_pattern(arch, monkeypatch):
    """No ``[T, T]`` score or pattern of any head exists at any moment of the bounded pass, kept or not.

    Two probes: every tensor the pass makes (a dispatch mode, which sees temporaries too),
    and every tensor saved for the backward. The one square tensor left is the model's
    own ``[batch, 1, T, T]`` mask, which Hugging Face builds once per forward for all
    layers (no head axis); the head-sized tensors are ``[batch, head, tile, T]`` tiles.
    """
    model = make_tiny(arch, n_layers=3)
    tokens = model.to_tokens(PROMPTS[0]).shape[1] + 3  # the target " dog" adds 3 of its 4 characters
    n_heads = describe(model).n_heads
    monkeypatch.setattr(rows, "TILE_ELEMENTS", 7 * n_heads * tokens)  # tiles of 7 query rows
    probe, saved = _probe(model, "standard", tokens)
    assert any(shape[1] == n_heads for shape in probe.squares) and len(saved) >= 3  # the probes see eager attention
    probe, saved = _probe(model, "bounded", tokens)
    assert [s for s in probe.squares if s[1] != 1] == []  # no per-head square tensor, not even for a moment
    # saved for the backward: the model's one mask (each checkpointed block keeps its inputs), nothing else
    assert {shape[1] for shape, _ in saved} <= {1} and len({storage for _, storage in saved}) <= 1
    assert probe.tile_rows == {7, tokens % 7}  # every head-sized tensor over the keys is one query tile


@pytest.mark.bridge
def test_a_model_left_in_training_mode_with_attention_dropout_still_runs_in_tiles(monkeypatch):
    """The pass runs in eval mode (dropout off), so a model in train() takes the tiles too, and stays in train()."""
    model = make_tiny("llama")
    for block in model.blocks:
        block.attn.original_component.attention_dropout = 0.5
    tokens = model.to_tokens(PROMPTS[0]).shape[1] + 3
    monkeypatch.setattr(rows, "TILE_ELEMENTS", 7 * describe(model).n_heads * tokens)
    evaluated = tl_reversed.reversed_attention(model, PROMPTS[0], " dog", keep="norms", path="bounded")
    model.train()
    assert tiled_unsupported(model) == "layer 0: it is in training mode with attention dropout"
    probe, _ = _probe(model, "bounded", tokens)
    assert [s for s in probe.squares if s[1] != 1] == [] and probe.tile_rows == {7, tokens % 7}
    assert all(m.training for m in model.modules()) and model.blocks[0].attn.original_component.training
    trained = tl_reversed.reversed_attention(model, PROMPTS[0], " dog", keep="norms", path="bounded")
    torch.testing.assert_close(trained.norms, evaluated.norms, atol=0, rtol=0)  # no dropout in the pass


@pytest.mark.bridge
def test_bounded_pass_equals_standard_with_soft_capping_and_global_layers():
    """Gemma 3 with 6 layers (5 sliding-window, then a global one) and a soft cap on the scores."""
    model = make_tiny("gemma3", n_layers=6)
    for block in model.blocks:
        block.attn.original_component.attn_logit_softcapping = 0.5  # tiny random scores: a cap that bites
    prompts = [PROMPTS[0] * 2, PROMPTS[1]]
    for query_positions in [None, "targets"]:
        standard = tl_reversed.reversed_attention(model, prompts, TARGETS, query_positions=query_positions, path="standard")
        bound = tl_reversed.reversed_attention(model, prompts, TARGETS, query_positions=query_positions, path="bounded")
        torch.testing.assert_close(bound.maps, standard.maps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bound.norms, standard.norms, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bound.loss, standard.loss, atol=1e-5, rtol=1e-5)
    window = standard.maps[0, 0, :, -1].abs().sum(0)  # the last row of a sliding-window layer
    assert window[: standard.lengths[0] - 9].max() == 0 and window[-8:].min() > 0


@pytest.mark.bridge
@pytest.mark.parametrize(("arch", "key_hook"), [("llama", "rot_k"), ("gpt2", "k")])
def test_edits_at_the_qkv_hooks_reach_the_tiles(arch, key_hook):
    model = make_tiny(arch)

    def times(factor):
        return lambda x, hook: x * factor

    edits = [(attn_hook(0, "v"), times(1.5)), (attn_hook(1, key_hook), times(-2.0)), (attn_hook(1, "z"), times(0.5))]
    plain = tl_reversed.reversed_attention(model, PROMPTS, TARGETS, path="bounded")
    standard = tl_reversed.reversed_attention(model, PROMPTS, TARGETS, path="standard", extra_hooks=edits)
    bound = tl_reversed.reversed_attention(model, PROMPTS, TARGETS, path="bounded", extra_hooks=edits)
    torch.testing.assert_close(bound.maps, standard.maps, atol=1e-5, rtol=1e-5)
    assert (bound.norms - plain.norms).abs().max() > 0.1 * plain.norms.max()  # the edits changed RA


@pytest.mark.bridge
def test_bounded_pass_refuses_hooks_on_the_whole_pattern():
    model = make_tiny("llama")
    before = _attention_state(model)
    message = r"the bounded path computes attention in query tiles: hook_pattern and hook_attn_scores never hold"
    for name in [attn_hook(1, "pattern"), lambda name: name.endswith("hook_attn_scores")]:
        with pytest.raises(ValueError, match=message + r".* extra_hooks on \['blocks\.\d\.attn\.hook_"):
            tl_reversed.reversed_attention(model, PROMPTS, TARGETS, path="bounded", extra_hooks=[(name, lambda x, hook: x)])
    model.blocks[0].attn.hook_pattern.add_hook(lambda x, hook: x)
    try:
        with pytest.raises(ValueError, match=r"hooks left on the model at \['blocks.0.attn.hook_pattern'\]"):
            tl_reversed.reversed_attention(model, PROMPTS, TARGETS, path="bounded")
    finally:
        model.reset_hooks()
    assert _attention_state(model) == before
    tl_reversed.reversed_attention(model, PROMPTS, TARGETS, path="standard", extra_hooks=[(attn_hook(1, "pattern"), lambda x, hook: x)])


@pytest.mark.bridge
def test_tiled_attention_is_removed_after_an_error():
    model = make_tiny("gpt2")
    before = _attention_state(model)

    def bad_metric(logits, tokens):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        tl_reversed.reversed_attention(model, "A cat sat", metric=bad_metric, keep="norms", path="bounded")
    assert _attention_state(model) == before
    assert not any(name in vars(block.attn) for block in model.blocks for name in SEAM_NAMES)


@pytest.mark.bridge
@pytest.mark.parametrize("arch", ["opt", "gptj"])
def test_delegated_attention_keeps_its_eager_attention(arch):
    model = make_tiny(arch)
    assert tiled_unsupported(model) == "layer 0: its attention (AttentionBridge) computes scores where the tiles cannot reach them"
    # no tiles, so its hook_pattern still fires on the bounded path: nothing to refuse
    seen = []
    tl_reversed.reversed_attention(model, PROMPTS, TARGETS, path="bounded", keep="norms",
                                   extra_hooks=[(attn_hook(0, "pattern"), lambda x, hook: seen.append(x.shape))])  # fmt: skip
    assert seen and seen[0][-1] == seen[0][-2]
