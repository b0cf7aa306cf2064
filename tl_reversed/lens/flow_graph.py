"""The flow graph of one prompt (VISIT, Katz & Belinkov 2023), with the gradient laid over it.

For one query position and a set of layers, the nodes are the residual stream before
and after each sublayer, each attention head's output (through ``W_O``), the *memories*
a head reads (per key position: attention weight times that position's value through
``W_O``), the MLP's top neurons (activation times their output row) and the final
prediction. Edges are the additive contributions between them::

    resid_mid  = resid_pre + sum_h head_out[h] + attn_bias      head_out[h] = sum_k memory[h, k]
    resid_post = resid_mid + sum_n act[n] * W_out[n] + mlp_bias

Where a model normalises a sublayer's output before adding it (Gemma's post-norms),
every share is taken with that norm's scale frozen, so the sums stay exact. Parallel
blocks (GPT-J, NeoX) have no ``resid_mid``: both sublayers write into ``resid_post``.

Every node is read in the vocabulary through the model's final norm and unembedding
(the logit lens, VISIT's reading of each vector); with ``backward=True`` it also carries
its VJP read by the backward lens (:class:`~tl_reversed.lens.projection.Projector`,
``"jacobian"`` projection: the final norm linearised at the position's last residual), and each head its Reversed Attention row at the position.
All of it comes from ONE forward and backward pass of the pass engine
(:class:`FlowSink`); the nodes and edges are built by :mod:`tl_reversed.lens.flow_nodes`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tl_reversed.core.architecture import (
    FINAL_NORM,
    FINAL_NORM_SCALE,
    BlockWrites,
    ModelSpec,
    attn_hook,
    block_hook,
    block_writes,
    describe,
    mlp_hook,
)
from tl_reversed.core.engine import Chunk, Hook, run
from tl_reversed.core.inputs import tokenize
from tl_reversed.core.options import RANK_BY, RankBy, check_option
from tl_reversed.core.reversed_attention import accumulation_dtype, check_layers
from tl_reversed.lens.flow_nodes import build_graph
from tl_reversed.lens.flow_results import FlowGraph

RESID_SITES = ("resid_pre", "resid_mid", "resid_post")


def flow_graph(
    model: torch.nn.Module,
    prompt: str,
    target: str | None = None,
    *,
    layers: list[int] | int | None = None,
    position: int = -1,
    top_heads: int = 2,
    top_memories: int = 2,
    top_neurons: int = 2,
    top_k: int = 5,
    rank_by: RankBy = "forward",
    backward: bool = True,
) -> FlowGraph:
    """The flow graph of ``prompt`` at one position: forward contributions and, with a target, their gradients.

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        prompt: the text the model reads (one prompt).
        target: the answer that follows it (e.g. ``" Paris"``). Each node reports the rank
            and probability of its first token; ``None`` tracks the model's own top-1 token
            at ``position`` instead. The backward view differentiates the target
            cross-entropy (summed over target tokens), so it needs one.
        layers: the layers to draw (default all), e.g. ``range(20, 30)``.
        position: the query position among the prompt tokens (default the last: where the
            answer is predicted); negative counts from the end.
        top_heads, top_neurons: heads and neurons kept per layer, the strongest first.
        top_memories: memories (key positions) kept per kept head.
        top_k: tokens listed per node.
        rank_by: order and filter heads, memories and neurons by the ``"forward"`` view (the
            size of their contribution) or the ``"backward"`` one (the first-order loss
            change it causes; memories by their Reversed Attention entry).
        backward: also run the backward pass (needs ``target``).

    Returns:
        A :class:`~tl_reversed.lens.flow_results.FlowGraph` (``to_dataframe``, ``to_html``,
        ``plot``, ``to_networkx``, ``save``/``load``).
    """
    spec = describe(model)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty: give the text the model should read, e.g. 'The capital city of France is'")
    check_option("rank_by", rank_by, RANK_BY)
    if backward and target is None:
        raise ValueError(
            "backward=True needs a target to differentiate: pass target=' Paris' (the answer that follows "
            "the prompt), or backward=False for the forward graph alone"
        )
    if rank_by == "backward" and not backward:
        raise ValueError("rank_by='backward' needs the backward pass: pass a target and backward=True")
    for name, value in (("top_heads", top_heads), ("top_memories", top_memories), ("top_neurons", top_neurons)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer (how many to keep per layer), got {value!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer (tokens listed per node), got {top_k!r}")
    chosen = sorted(set(check_layers(list(layers) if isinstance(layers, range) else layers, spec)))
    batch = tokenize(model, prompt, target, spec, need_targets=False)
    n_prompt = int(batch.prompt_lengths[0])
    if isinstance(position, bool) or not isinstance(position, int) or not -n_prompt <= position < n_prompt:
        raise ValueError(
            f"position {position!r} is beyond the prompt of {n_prompt} tokens: choose one from {-n_prompt} to "
            f"{n_prompt - 1} (-1 is the last prompt token)"
        )
    pos = position % n_prompt
    writes = [block_writes(model, layer) for layer in chosen]
    sink = FlowSink(model, spec, chosen, writes, pos, backward)
    loss = run(model, batch, [sink], backward=backward, batch_size=None, progress=False, desc="flow graph")
    saved = sink.finish()
    with torch.no_grad():
        return build_graph(
            model, spec, saved, chosen, writes, batch, pos,
            loss=None if loss is None else float(loss[0]),
            counts=(top_heads, top_memories, top_neurons), top_k=top_k, rank_by=rank_by,
        )  # fmt: skip


class FlowSink:
    """The pass-engine sink of the flow graph: the activations at one position and their gradients.

    Forward hooks keep, for each chosen layer, ``resid_pre``/``resid_mid``/``resid_post``,
    ``hook_attn_out``, ``hook_mlp_out`` and the MLP's ``hook_post`` at the position,
    ``hook_z`` there, ``hook_v`` up to it and the pattern's row, plus the post-norm scales
    and the last block's ``resid_post``. Backward hooks keep the gradients of the
    residual sites, of ``hook_z`` and of ``hook_post`` at the position.
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, layers: list[int], writes: list[BlockWrites],
                 pos: int, backward: bool):  # fmt: skip
        self.spec, self.layers, self.writes, self.pos, self.backward = spec, layers, writes, pos, backward
        self.dtype = accumulation_dtype(next(model.parameters()).dtype)
        self.saved: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}

    def _keep(self, store: dict[str, Tensor], key: str, pick) -> Hook:
        def hook(x: Tensor, hook: object) -> None:
            store[key] = pick(x[0].detach()).to(self.dtype).cpu().clone()

        return key, hook

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        p = self.pos
        at = lambda x: x[p]  # noqa: E731 - [pos, ...] -> [...]
        fwd, bwd = [], []
        last = block_hook(self.spec.n_layers - 1, "resid_post")
        for layer, w in zip(self.layers, self.writes):
            sites = [s for s in RESID_SITES if not (w.parallel and s == "resid_mid")]
            fwd += [self._keep(self.saved, block_hook(layer, s), at) for s in (*sites, "attn_out", "mlp_out")]
            fwd += [
                self._keep(self.saved, attn_hook(layer, "z"), at),
                self._keep(self.saved, attn_hook(layer, "v"), lambda x: x[: p + 1]),
                self._keep(self.saved, attn_hook(layer, "pattern"), lambda x: x[:, p, : p + 1]),
                self._keep(self.saved, mlp_hook(layer, "post"), at),
            ]
            fwd += [self._keep(self.saved, name, lambda x: x[p, 0]) for name, norm in
                    ((w.attn_post_scale, w.attn_post), (w.mlp_post_scale, w.mlp_post)) if norm is not None]  # fmt: skip
            if self.backward:
                fwd += [self._grad_of(name) for name in self._grad_hooks(layer, w)]
        fwd += [self._keep(self.saved, FINAL_NORM, at), self._keep(self.saved, FINAL_NORM_SCALE, lambda x: x[p, 0])]
        if last not in dict(fwd):
            fwd.append(self._keep(self.saved, last, at))
        if self.backward and last not in self._expected_grads():
            fwd.append(self._grad_of(last))
        return fwd, bwd

    def _grad_of(self, name: str) -> Hook:
        """A forward hook that registers a gradient hook on the activation itself.

        The gradient of the tensor the hook point holds, whatever reads it afterwards: on a
        TransformerBridge the backward hook of ``hook_resid_mid`` (``ln2.hook_in``) sees
        the MLP branch alone, but the tensor also feeds the skip connection. The checks
        against ``torch.autograd.grad`` are in ``tests/test_flow_graph.py``.
        """
        p = self.pos

        def hook(x: Tensor, hook: object) -> Tensor:
            if x.requires_grad:
                x.register_hook(lambda grad: self.grads.__setitem__(name, grad[0, p].detach().to(self.dtype).cpu()))
            return x  # returned, so the model reads this very tensor on (the bridge's hook_z is a view otherwise dropped)

        return name, hook

    def merge(self, chunk: Chunk) -> None:
        if not self.backward:
            return
        missing = [name for name in self._expected_grads() if name not in self.grads]
        if missing:
            raise TypeError(
                f"no gradient reached {missing[0]}: this model does not carry gradients through that hook "
                "point, so its flow graph has no backward view; pass backward=False"
            )
        bad = [name for name, grad in self.grads.items() if not bool(torch.isfinite(grad).all())]
        if bad:  # the engine checks the gradients of backward hooks; these come from tensor hooks
            raise FloatingPointError(
                f"the gradient at {bad[0]} has NaN or inf entries: the model overflowed in its dtype; "
                "run it in float32 (load_model(..., dtype=torch.float32)) or shorten the prompt"
            )

    @staticmethod
    def _grad_hooks(layer: int, w: BlockWrites) -> list[str]:
        """The activations whose gradients are kept."""
        sites = [block_hook(layer, s) for s in RESID_SITES if not (w.parallel and s == "resid_mid")]
        return sites + [attn_hook(layer, "z"), mlp_hook(layer, "post")]

    def _expected_grads(self) -> list[str]:
        return [name for layer, w in zip(self.layers, self.writes) for name in self._grad_hooks(layer, w)]

    def finish(self) -> dict[str, dict[str, Tensor]]:
        return {"forward": self.saved, "backward": self.grads}
