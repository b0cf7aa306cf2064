"""Long prompts: the other entry points on the memory-bounded pass (issue 13, item 3).

``head_scores("ra" | "fa")``, ``cache_with_grads(keep="norms" | query_positions=...)`` and
the backward lens take ``path=`` like ``reversed_attention``: the bounded pass gives the
same numbers, ``"auto"`` takes it above the per-model threshold
(:func:`tl_reversed.core.paths.bounded_above`, no process-wide patch), and what the
bounded pass cannot keep is refused with a clear error.
"""

from __future__ import annotations

import pytest
import torch

import tl_reversed
from conftest import LEGACY, make_tiny, model_state
from tl_reversed.core import paths
from tl_reversed.core.architecture import attn_hook, block_hook
from tl_reversed.experiments.ranking import head_scores

pytestmark = pytest.mark.skipif(LEGACY, reason="bridge models (the legacy run covers reversed_attention in test_long)")

PROMPTS = ["The cat sat on the mat and looked at the", "A dog ran"]
TARGETS = [" door", " far"]
SITES = ["resid_pre", "attn_out", "mlp_out", "resid_post"]


class _PathProbe:
    """Records, at every forward of layer 0's ``hook_v``, whether the bounded pass is on.

    The bounded pass sets an instance ``forward`` on each block while it runs
    (:func:`tl_reversed.core.bounded.checkpointed_blocks`); the standard pass never does.
    """

    def __init__(self, model):
        self.model, self.seen = model, []

    def __call__(self, x, hook):
        self.seen.append("forward" in vars(self.model.blocks[0]))

    def path(self) -> str:
        assert self.seen, "the probe never fired"
        kinds = set(self.seen)
        self.seen = []
        assert len(kinds) == 1, "one call ran both paths"
        return "bounded" if kinds.pop() else "standard"

    def hooks(self):
        return self.model.hooks(fwd_hooks=[(attn_hook(0, "v"), self)])


# --------------------------------------------------------------------------- backward lens


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3", "opt", "gptj"])
def test_lens_and_ra_on_the_bounded_pass_equal_the_standard_pass(arch):
    model = make_tiny(arch)
    before = model_state(model)
    out = {}
    for path in ("standard", "bounded"):
        out[path] = tl_reversed.backward_lens_and_ra(
            model, PROMPTS, TARGETS, sites=SITES, ra_keep="maps", query_positions="targets", path=path
        )
    std, bnd = out["standard"], out["bounded"]
    assert std.lens.vjps.abs().max() > 1e-3 and std.ra.maps.abs().max() > 1e-4  # real gradients, not zeros
    for name in ("vjps", "head_vjps", "norms", "head_norms", "loss"):
        torch.testing.assert_close(getattr(bnd.lens, name), getattr(std.lens, name), atol=1e-5, rtol=1e-5)
    assert torch.equal(bnd.lens.top.toward_ids, std.lens.top.toward_ids)
    torch.testing.assert_close(bnd.lens.top.toward_values, std.lens.top.toward_values, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(bnd.ra.maps, std.ra.maps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bnd.ra.norms, std.ra.norms, atol=1e-5, rtol=1e-5)
    # the rows are those of the standard whole maps
    whole = tl_reversed.reversed_attention(model, PROMPTS, TARGETS, path="standard")
    for i in range(len(PROMPTS)):
        rows, n = bnd.ra.rows(i), int(whole.lengths[i])
        torch.testing.assert_close(bnd.ra.maps[i, :, :, : len(rows), :n], whole.maps[i][:, :, rows, :n], atol=1e-5, rtol=1e-5)
    assert model_state(model) == before


def test_lens_auto_path_follows_the_models_threshold():
    model = make_tiny("llama")
    probe = _PathProbe(model)
    with probe.hooks():
        tl_reversed.backward_lens(model, PROMPTS, TARGETS, sites=["mlp_out"])
        assert probe.path() == "standard"  # a few hundred bytes of patterns
        with paths.bounded_above(model, 0):
            lens = tl_reversed.backward_lens(model, PROMPTS, TARGETS, sites=["mlp_out"])
            assert probe.path() == "bounded"
            tl_reversed.backward_lens_and_ra(model, PROMPTS, TARGETS, sites=["mlp_out"], ra_keep="maps")
            assert probe.path() == "standard"  # whole RA maps are tokens^2 per layer themselves
            tl_reversed.backward_lens_and_ra(model, PROMPTS, TARGETS, sites=["mlp_out"], ra_keep="norms")
            assert probe.path() == "bounded"
        plain = tl_reversed.backward_lens(model, PROMPTS, TARGETS, sites=["mlp_out"], path="standard")
        assert probe.path() == "standard"
    torch.testing.assert_close(lens.vjps, plain.vjps, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"path must be one of \('auto', 'standard', 'bounded'\), got 'flash'"):
        tl_reversed.backward_lens(model, PROMPTS, TARGETS, path="flash")


# --------------------------------------------------------------------------- head scores


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_head_scores_on_the_bounded_pass_equal_the_standard_pass(arch):
    model = make_tiny(arch)
    examples = (PROMPTS, TARGETS)
    probe = _PathProbe(model)
    for method in ("ra", "fa"):
        with probe.hooks():
            standard = head_scores(model, examples, method, path="standard")
            assert probe.path() == "standard"
            bound = head_scores(model, examples, method, path="bounded")
            assert probe.path() == "bounded"
            with paths.bounded_above(model, 0):
                auto = head_scores(model, examples, method)
                assert probe.path() == "bounded"
        assert standard.scores.abs().max() > 0
        torch.testing.assert_close(bound.scores, standard.scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(auto.scores, standard.scores, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"path must be one of \('auto', 'standard', 'bounded'\), got 'tiled'"):
        head_scores(model, examples, "ra", path="tiled")


# --------------------------------------------------------------------------- cache_with_grads


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cache_with_ra_norms_and_rows_on_both_paths(arch):
    model = make_tiny(arch)
    prompts, targets = ["The cat sat on the", "A dog ran over the"], [" mat", " car"]
    names = [block_hook(0, "resid_post"), attn_hook(1, "z")]
    whole = tl_reversed.reversed_attention(model, prompts, targets, path="standard")
    before = model_state(model)
    caches = {}
    for path in ("standard", "bounded"):
        caches[path] = tl_reversed.cache_with_grads(model, prompts, targets, names_filter=names, keep="norms", path=path)
        rows = tl_reversed.cache_with_grads(model, prompts, targets, query_positions="last", path=path)
        ra = tl_reversed.ra_from_cache(rows)
        last = ra.rows(0)
        assert len(rows.keys()) == 0 and ra.query_positions is not None
        torch.testing.assert_close(ra.maps[:, :, :, 0], whole.maps[:, :, :, last[0]], atol=1e-5, rtol=1e-5)
    std, bnd = caches["standard"], caches["bounded"]
    assert sorted(bnd.keys()) == sorted([*names, *(n + "_grad" for n in names)])
    for key in std.keys():
        torch.testing.assert_close(bnd[key], std[key], atol=1e-5, rtol=1e-5)
    for cache in (std, bnd):
        torch.testing.assert_close(tl_reversed.ra_from_cache(cache).norms, whole.norms, atol=1e-5, rtol=1e-5)
        one = tl_reversed.ra_from_cache(cache, layers=[1])
        assert one.layers == [1]
        torch.testing.assert_close(one.norms[:, 0], whole.norms[:, 1], atol=1e-5, rtol=1e-5)
    assert model_state(model) == before


def test_cache_auto_path_and_what_the_bounded_pass_refuses():
    model = make_tiny("llama")
    probe = _PathProbe(model)
    before = model_state(model)
    with probe.hooks(), paths.bounded_above(model, 0):
        full = tl_reversed.cache_with_grads(model, "The cat sat", " on")  # whole maps: the standard pass
        assert probe.path() == "standard" and attn_hook(1, "pattern") in full.keys()
        norms = tl_reversed.cache_with_grads(model, "The cat sat", " on", keep="norms")
        assert probe.path() == "bounded"
    torch.testing.assert_close(tl_reversed.ra_from_cache(norms).norms, tl_reversed.ra_from_cache(full).norms, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"cache_with_grads\(keep='maps'\) caches every layer's hook_pattern .* or path='standard'"):
        tl_reversed.cache_with_grads(model, "The cat sat", " on", path="bounded")
    with pytest.raises(ValueError, match=r"names_filter asks for \['blocks.1.attn.hook_pattern'\]: \[head, pos, pos\]"):
        tl_reversed.cache_with_grads(
            model, "The cat sat", " on", keep="norms", names_filter=[attn_hook(1, "pattern")], path="bounded"
        )
    with pytest.raises(ValueError, match=r"keep must be one of \('maps', 'norms'\), got 'vectors'"):
        tl_reversed.cache_with_grads(model, "The cat sat", " on", keep="vectors")
    assert model_state(model) == before
