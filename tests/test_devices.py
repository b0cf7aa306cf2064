"""Models placed by a device map (issue 13, item 5), checked on a CPU-only machine.

What these tests prove, and what they do not:

* ``test_device_mapped_model_gives_the_same_results``: a tiny model dispatched by
  accelerate with a per-module device map (every entry ``"cpu"``: the only device here)
  and accelerate's device-moving hooks on every module. It takes TransformerLens' device-map
  code path (``hf_device_map``, ``cfg.n_devices``, compatibility mode without weight
  processing) and accelerate's hooks, under both RA paths (the bounded one swaps the
  blocks' forwards while accelerate's hooks wrap the wrapped modules'), and every result
  equals the undispatched model's. It cannot show that tensors on two *different*
  devices meet correctly: that needs two devices (a GPU check, not run here).
* ``test_placement_helpers_read_each_modules_device``: moves the unembedding to the
  ``meta`` device (no pass is run) and checks that the helpers the passes use read the
  embedding's and the unembedding's own devices, not the first parameter's.
* ``test_memory_check_counts_every_device_of_a_split_model``: the peak-memory check
  compares the estimate with the memory of all the model's devices together.
"""

from __future__ import annotations

import pytest
import torch

import tl_reversed
from conftest import LEGACY
from tl_reversed.core import memory
from tl_reversed.core.engine import model_device, model_devices, output_device
from tl_reversed.core.state import hook_count
from tl_reversed.experiments.ranking import head_scores
from tl_reversed.testing import tiny_model

pytestmark = pytest.mark.skipif(LEGACY, reason="device maps are a TransformerBridge feature")

PROMPTS = ["The cat sat on the mat and looked at the", "A dog ran"]
TARGETS = [" door", " far"]
MAPS = {
    "llama": ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"],
    "gpt2": ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1", "transformer.ln_f", "lm_head"],
}


def _accelerate_hooks(model) -> int:
    return sum(hasattr(m, "_hf_hook") for m in model.original_model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_device_mapped_model_gives_the_same_results(arch):
    plain = tiny_model(arch)
    mapped = tiny_model(arch, device_map={name: "cpu" for name in MAPS[arch]})
    assert mapped.original_model.hf_device_map and mapped.cfg.n_devices == 1
    hooks_before, accelerate_before = hook_count(mapped), _accelerate_hooks(mapped)
    assert accelerate_before > 0  # accelerate's hooks move every module's inputs (force_hooks)
    reference = tl_reversed.reversed_attention(plain, PROMPTS, TARGETS, query_positions="targets", path="standard")
    want_scores = head_scores(plain, (PROMPTS, TARGETS), "ra", path="standard")
    for path in ("standard", "bounded"):
        ra = tl_reversed.reversed_attention(mapped, PROMPTS, TARGETS, query_positions="targets", path=path)
        assert ra.maps.device.type == "cpu" and ra.norms.device.type == "cpu"
        torch.testing.assert_close(ra.maps, reference.maps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ra.loss, reference.loss, atol=1e-5, rtol=1e-5)
        lens = tl_reversed.backward_lens_and_ra(mapped, PROMPTS, TARGETS, ra_keep="norms", path=path)
        want = tl_reversed.backward_lens_and_ra(plain, PROMPTS, TARGETS, ra_keep="norms", path="standard")
        torch.testing.assert_close(lens.lens.vjps, want.lens.vjps, atol=1e-5, rtol=1e-5)
        # the reference's weight processing centres GPT-2's W_O (what LayerNorm removes anyway): compare centred
        centred = [v - v.mean(-1, keepdim=True) for v in (lens.lens.head_vjps, want.lens.head_vjps)]
        torch.testing.assert_close(*centred, atol=1e-5, rtol=1e-5)
        assert torch.equal(lens.lens.head_top.toward_ids, want.lens.head_top.toward_ids)
        torch.testing.assert_close(lens.ra.norms, want.ra.norms, atol=1e-5, rtol=1e-5)
        cache = tl_reversed.cache_with_grads(mapped, "The cat sat", " on", keep="norms", path=path)
        expected = tl_reversed.reversed_attention(plain, "The cat sat", " on", keep="norms", path="standard")
        torch.testing.assert_close(tl_reversed.ra_from_cache(cache).norms, expected.norms, atol=1e-5, rtol=1e-5)
        scores = head_scores(mapped, (PROMPTS, TARGETS), "ra", path=path)
        torch.testing.assert_close(scores.scores, want_scores.scores, atol=1e-5, rtol=1e-5)
    if arch == "llama":  # GPT-2's weight processing (the reference's) moves node vectors the graph reads raw
        graph = tl_reversed.flow_graph(mapped, "The cat sat", " on").to_dataframe()
        want_graph = tl_reversed.flow_graph(plain, "The cat sat", " on").to_dataframe()
        assert graph["toward"].tolist() == want_graph["toward"].tolist() and len(graph) > 10
    assert hook_count(mapped) == hooks_before and _accelerate_hooks(mapped) == accelerate_before


def test_placement_helpers_read_each_modules_device():
    model = tiny_model("llama")
    assert model_device(model) == output_device(model) == torch.device("cpu")
    assert model_devices(model) == [torch.device("cpu")]
    model.unembed.to("meta")  # a plan-only check: the model cannot run like this
    assert model_device(model) == torch.device("cpu")  # tokens go where the embedding is
    assert output_device(model) == torch.device("meta")  # the logits (and the lens's projection) where W_U is
    assert model_devices(model) == [torch.device("cpu"), torch.device("meta")]
    from tl_reversed.lens.projection import Projector

    projector = Projector(model, "weight", 5, torch.float32)
    assert projector.w_u.device.type == "meta" and projector.gain.device.type == "meta"


def test_memory_check_counts_every_device_of_a_split_model():
    cpu = torch.device("cpu")
    free, _ = memory.available_memory(cpu)
    assert free is not None
    estimate = int(1.5 * free)
    memory.check_memory(estimate, [cpu, cpu], what="a pass", way_out="shorten it")  # twice the memory: fits
    with pytest.raises(memory.WouldRunOutOfMemory, match=r"is available on cpu \(.*\): shorten it"):
        memory.check_memory(estimate, cpu, what="a pass", way_out="shorten it")
    with pytest.raises(memory.WouldRunOutOfMemory, match=r"is available on cpu, cpu \("):
        memory.check_memory(3 * free, [cpu, cpu], what="a pass", way_out="shorten it")
    memory.check_memory(10**30, [cpu, torch.device("meta")], what="a pass", way_out="x")  # meta: not measured, no check
