"""The pass engine: a sink written here, run through the engine, equals a hand-written hook loop."""

from __future__ import annotations

import pytest
import torch

from tl_reversed.core.architecture import EMBED, attn_hook, describe
from tl_reversed.core.engine import Chunk, Sink, run
from tl_reversed.core.inputs import tokenize
from tl_reversed.core.state import hook_count
from tl_reversed.testing import tiny_model

PROMPTS = ["the cat sat on", "a b", "one two three four five six", "x y z"]
TARGETS = [" the", " c", " seven", " w"]


class GradZNorm:
    """Per-example, per-layer, per-head norm of grad(hook_z) over real positions."""

    def __init__(self, n: int, n_layers: int, n_heads: int):
        self.out = torch.zeros(n, n_layers, n_heads)
        self.seen: list[list[int]] = []

    def hooks(self, chunk: Chunk):
        self._grads: dict[int, torch.Tensor] = {}

        def keep(layer: int):
            def hook(grad, hook):
                self._grads[layer] = grad.detach().float()

            return hook

        return [], [(attn_hook(layer, "z"), keep(layer)) for layer in range(self.out.shape[1])]

    def merge(self, chunk: Chunk) -> None:
        self.seen.append(chunk.index.tolist())
        for layer, grad in self._grads.items():
            self.out[chunk.index, layer] = grad.norm(dim=(1, 3)).cpu()

    def finish(self) -> torch.Tensor:
        return self.out


def _by_hand(model, prompt: str, target: str) -> torch.Tensor:
    """The same numbers from one prompt at a time, with plain TransformerLens hooks."""
    spec = describe(model)
    prompt_tokens = model.to_tokens(prompt)[0]
    answer = model.to_tokens(target, prepend_bos=False)[0]
    inputs = torch.cat([prompt_tokens, answer[:-1]])[None]
    at = torch.arange(len(prompt_tokens) - 1, inputs.shape[1])
    grads: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(grad, hook):
            grads[layer] = grad.detach().float()

        return hook

    def leaf(x, hook):
        return x.detach().requires_grad_(True)

    with model.hooks(fwd_hooks=[(EMBED, leaf)], bwd_hooks=[(attn_hook(l, "z"), keep(l)) for l in range(spec.n_layers)]):
        logits = model(inputs)
        loss = -logits[0, at].float().log_softmax(-1).gather(-1, answer[:, None]).sum()
        loss.backward()
    return torch.stack([grads[l].norm(dim=(1, 3))[0] for l in range(spec.n_layers)])


@pytest.mark.parametrize("batch_size", [1, 3, None])
def test_a_sink_written_here_equals_a_hand_written_hook_loop(batch_size):
    model = tiny_model("llama")
    spec = describe(model)
    flags = [p.requires_grad for p in model.parameters()]
    batch = tokenize(model, PROMPTS, TARGETS, spec, need_targets=True)
    sink = GradZNorm(len(PROMPTS), spec.n_layers, spec.n_heads)
    assert isinstance(sink, Sink)
    loss = run(model, batch, [sink], batch_size=batch_size)
    got = sink.finish()
    for i, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            expected = _by_hand(model, prompt, target)
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-7)
    # the engine scattered every row back once, in example order, and returned the loss
    assert sorted(i for rows in sink.seen for i in rows) == list(range(len(PROMPTS)))
    assert loss is not None and loss.shape == (len(PROMPTS),) and bool((loss > 0).all())
    assert hook_count(model) == 0
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_chunks_are_sorted_by_length_and_never_mix_lengths_for_a_metric():
    model = tiny_model("gpt2")
    batch = tokenize(model, PROMPTS, TARGETS, describe(model), need_targets=True)
    lengths = batch.lengths.tolist()
    parts = batch.chunks(2)
    assert [lengths[i] for rows in parts for i in rows] == sorted(lengths)
    for rows in batch.chunks(8, same_length=True):
        assert len({lengths[i] for i in rows}) == 1
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        batch.chunks(0)


def test_a_non_finite_gradient_is_caught_once_by_the_engine_and_the_model_is_left_as_found():
    model = tiny_model("gpt2")
    batch = tokenize(model, PROMPTS[:2], TARGETS[:2], describe(model), need_targets=True)

    class Poison:
        def hooks(self, chunk):
            def spoil(grad, hook):
                return grad * float("nan")

            return [], [(attn_hook(1, "z"), spoil)]

        def merge(self, chunk):
            raise AssertionError("a chunk with a NaN gradient must not be merged")

        def finish(self):
            return None

    sink = GradZNorm(2, describe(model).n_layers, describe(model).n_heads)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        run(model, batch, [Poison(), sink])
    assert hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())


def test_forward_only_pass_gives_the_sinks_the_last_prompt_token_logits():
    model = tiny_model("llama")
    batch = tokenize(model, PROMPTS, TARGETS, describe(model), need_targets=True).prompt_only()

    class Answers:
        def __init__(self):
            self.out = torch.zeros(len(batch), model.cfg.d_vocab)

        def hooks(self, chunk):
            return [], []

        def merge(self, chunk):
            self.out[chunk.index] = chunk.logits

        def finish(self):
            return self.out

    sink = Answers()
    assert run(model, batch, [sink], backward=False, batch_size=2) is None
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            full = model(model.to_tokens(prompt))[0, -1].float()
        torch.testing.assert_close(sink.finish()[i], full, rtol=1e-5, atol=1e-5)
