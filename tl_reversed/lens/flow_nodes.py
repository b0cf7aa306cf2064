"""Nodes and edges of the flow graph, built from what :class:`~tl_reversed.lens.flow_graph.FlowSink` kept.

:func:`decompose` splits each chosen layer's sublayer outputs into heads, memories and
neurons (the identities in :mod:`tl_reversed.lens.flow_graph`); :func:`build_graph` keeps the
strongest, reads every node in the vocabulary (forward: the logit lens; backward: the
VJP through :class:`~tl_reversed.lens.projection.Projector`, ``"jacobian"``) and returns a
:class:`~tl_reversed.lens.flow_results.FlowGraph`.
"""

from __future__ import annotations

import math

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tl_reversed.core.architecture import FINAL_NORM, FINAL_NORM_SCALE, BlockWrites, ModelSpec, attn_hook, block_hook, final_logits, mlp_hook, repeat_kv
from tl_reversed.core.engine import output_device
from tl_reversed.core.inputs import Batch
from tl_reversed.core.reversed_attention import ra_from_parts
from tl_reversed.lens.flow_results import FlowGraph
from tl_reversed.lens.projection import Projector


def _gain(norm, scale: Tensor | None, d_model: int, dtype: torch.dtype) -> Float[Tensor, " d_model"]:
    """The factor a post-norm (frozen scale) multiplies a sublayer's output by; ones without one."""
    if norm is None:
        return torch.ones(d_model, dtype=dtype)
    return norm.gain.to("cpu", dtype) / scale


def decompose(saved: dict[str, dict[str, Tensor]], spec: ModelSpec, layers: list[int],
              writes: list[BlockWrites]) -> dict[str, Tensor]:  # fmt: skip
    """The per-layer tensors of a :class:`FlowGraph` (see its attributes) from the kept activations."""
    f, g = saved["forward"], saved["backward"]
    out: dict[str, list[Tensor]] = {}

    def put(name: str, value: Tensor) -> None:
        out.setdefault(name, []).append(value)

    for layer, w in zip(layers, writes):
        pre, post = f[block_hook(layer, "resid_pre")], f[block_hook(layer, "resid_post")]
        attn_out, mlp_out = f[block_hook(layer, "attn_out")], f[block_hook(layer, "mlp_out")]
        mid = pre + attn_out if w.parallel else f[block_hook(layer, "resid_mid")]
        dtype, d_model = pre.dtype, pre.shape[-1]
        ga = _gain(w.attn_post, f.get(w.attn_post_scale), d_model, dtype)
        gm = _gain(w.mlp_post, f.get(w.mlp_post_scale), d_model, dtype)
        w_o = w.W_O.to("cpu", dtype)
        z, pattern = f[attn_hook(layer, "z")], f[attn_hook(layer, "pattern")]  # [head, d_head], [head, key]
        v = repeat_kv(f[attn_hook(layer, "v")][None], spec.n_heads)[0]  # [key, head, d_head]
        put("resid", torch.stack([pre, mid, post]))
        put("attn_out", attn_out)
        put("mlp_out", mlp_out)
        put("head_out", einops.einsum(z, w_o, "h d, h d m -> h m") * ga)
        values = einops.einsum(v, w_o, "k h d, h d m -> h k m")  # each key's value through W_O
        put("memories", pattern[..., None] * values * ga)
        put("attn_bias", _bias(w.b_O, w.attn_post, ga, d_model, dtype))
        put("neuron_acts", f[mlp_hook(layer, "post")])
        put("mlp_gain", gm)
        put("mlp_bias", _bias(w.b_out, w.mlp_post, gm, d_model, dtype))
        if g:
            grad_post = g[block_hook(layer, "resid_post")]
            grad_mid = grad_post if w.parallel else g[block_hook(layer, "resid_mid")]
            put("resid_grad", torch.stack([g[block_hook(layer, "resid_pre")], grad_mid, grad_post]))
            put("z_grad", g[attn_hook(layer, "z")])
            put("act_grad", g[mlp_hook(layer, "post")])
            ra = ra_from_parts(pattern[None, :, None], f[attn_hook(layer, "v")][None], g[attn_hook(layer, "z")][None, None],
                               spec.scales[layer])  # fmt: skip
            put("ra_rows", ra[0, :, 0])
    return {name: torch.stack(values) for name, values in out.items()}


def _bias(bias: Tensor | None, norm, gain: Tensor, d_model: int, dtype: torch.dtype) -> Tensor:
    total = torch.zeros(d_model, dtype=dtype) if bias is None else bias.to("cpu", dtype) * gain
    return total if norm is None or norm.bias is None else total + norm.bias.to("cpu", dtype)


def _unit(x: Tensor) -> Tensor:
    n = x.norm()
    return x / n if n > 0 else x


class _Table:
    """Columns of nodes or edges, appended row by row."""

    def __init__(self, columns: tuple[str, ...]):
        self.columns = {c: [] for c in columns}

    def add(self, **row: object) -> None:
        for name, values in self.columns.items():
            values.append(row.get(name, math.nan))


NODE_COLUMNS = ("id", "kind", "layer", "head", "index", "name", "norm", "dloss", "ra")
EDGE_COLUMNS = ("source", "target", "kind", "weight", "backward_weight", "dloss")


def _top(scores: Tensor, k: int) -> list[int]:
    return scores.argsort(descending=True)[: min(k, scores.numel())].tolist()


def build_graph(model: torch.nn.Module, spec: ModelSpec, saved: dict, layers: list[int], writes: list[BlockWrites],
                batch: Batch, pos: int, *, loss: float | None, counts: tuple[int, int, int], top_k: int,
                rank_by: str) -> FlowGraph:  # fmt: skip
    """Choose the nodes, join them with edges, read them in the vocabulary: the :class:`FlowGraph`."""
    t = decompose(saved, spec, layers, writes)
    backward = "resid_grad" in t
    top_heads, top_memories, top_neurons = counts
    str_tokens = list(model.to_str_tokens(batch.tokens[0, : int(batch.prompt_lengths[0])]))  # type: ignore[attr-defined]
    nodes, edges = _Table(NODE_COLUMNS), _Table(EDGE_COLUMNS)
    vectors: list[Tensor] = []
    vjps: dict[int, Tensor] = {}  # node row -> its VJP vector

    def node(vector: Tensor, vjp: Tensor | None, **row: object) -> str:
        if vjp is not None:
            vjps[len(vectors)] = vjp
        vectors.append(vector)
        nodes.add(norm=float(vector.norm()), **row)
        return str(row["id"])

    def edge(source: str, target: str, kind: str, vector: Tensor, weight: float, grad: Tensor | None) -> None:
        dloss = float(grad @ vector) if grad is not None else math.nan
        edges.add(source=source, target=target, kind=kind, weight=weight, backward_weight=abs(dloss), dloss=dloss)

    final_vec = saved["forward"][block_hook(spec.n_layers - 1, "resid_post")]
    final_grad = saved["backward"].get(block_hook(spec.n_layers - 1, "resid_post"))
    previous: tuple[str, Tensor] | None = None
    for i, (layer, w) in enumerate(zip(layers, writes)):
        pre, mid, post = t["resid"][i]
        grads = t["resid_grad"][i] if backward else [None, None, None]
        if previous is None or previous[0] != f"L{layer - 1}.post":
            if previous is not None:  # skipped layers: the residual stream carries on
                edge(previous[0], node(pre, grads[0], id=f"L{layer}.pre", kind="resid_pre", layer=layer, head=-1,
                                       index=-1, name=f"resid_pre {layer}"),  # fmt: skip
                     "skip", previous[1], float(previous[1] @ _unit(pre)), grads[0])
            else:
                node(pre, grads[0], id=f"L{layer}.pre", kind="resid_pre", layer=layer, head=-1, index=-1,
                     name=f"resid_pre {layer}")  # fmt: skip
            start = f"L{layer}.pre"
        else:
            start = previous[0]
        after_attn = f"L{layer}.post" if w.parallel else f"L{layer}.mid"
        after_vec, after_grad = (post, grads[2]) if w.parallel else (mid, grads[1])
        if not w.parallel:
            node(mid, grads[1], id=after_attn, kind="resid_mid", layer=layer, head=-1, index=-1, name=f"resid_mid {layer}")
        node(post, grads[2], id=f"L{layer}.post", kind="resid_post", layer=layer, head=-1, index=-1,
             name=f"resid_post {layer}")  # fmt: skip
        edge(start, after_attn, "residual", pre, abs(float(pre @ _unit(after_vec))), after_grad)
        if not w.parallel:
            edge(after_attn, f"L{layer}.post", "residual", mid, abs(float(mid @ _unit(post))), grads[2])

        heads = t["head_out"][i]
        forward_score = (heads @ _unit(after_vec)).abs()
        score = (heads @ after_grad).abs() if rank_by == "backward" else forward_score
        for h in _top(score, top_heads):
            vjp = t["z_grad"][i, h] @ w.W_O[h].to("cpu", heads.dtype) if backward else None
            ra = float(t["ra_rows"][i, h].norm()) if backward else math.nan
            hid = node(heads[h], vjp, id=f"L{layer}.H{h}", kind="head", layer=layer, head=h, index=-1,
                       name=f"L{layer} H{h}", dloss=float(heads[h] @ after_grad) if backward else math.nan, ra=ra)  # fmt: skip
            edge(hid, after_attn, "head", heads[h], float(forward_score[h]), after_grad)
            memories = t["memories"][i, h]
            mem_score = t["ra_rows"][i, h].abs() if rank_by == "backward" else memories.norm(dim=-1)
            for k in _top(mem_score, top_memories):
                mid_id = node(memories[k], None, id=f"L{layer}.H{h}.k{k}", kind="memory", layer=layer, head=h, index=k,
                              name=f"L{layer} H{h} key {k} {str_tokens[k]!r}",
                              dloss=float(memories[k] @ after_grad) if backward else math.nan,
                              ra=float(t["ra_rows"][i, h, k]) if backward else math.nan)  # fmt: skip
                edge(mid_id, hid, "memory", memories[k], float(memories[k].norm()), after_grad)

        w_out = w.W_out.to("cpu", heads.dtype) * t["mlp_gain"][i]  # [d_mlp, d_model]
        acts = t["neuron_acts"][i]
        row_norms = w_out.norm(dim=-1)
        effect = acts * (w_out @ grads[2]) if backward else None
        score = effect.abs() if rank_by == "backward" else acts.abs() * row_norms
        for n in _top(score, top_neurons):
            contribution = acts[n] * w_out[n]
            vjp = t["act_grad"][i, n] * w.W_out[n].to("cpu", heads.dtype) if backward else None
            nid = node(contribution, vjp, id=f"L{layer}.N{n}", kind="neuron", layer=layer, head=-1, index=n,
                       name=f"L{layer} N{n}", dloss=float(effect[n]) if effect is not None else math.nan)  # fmt: skip
            edge(nid, f"L{layer}.post", "neuron", contribution, float(contribution.norm()), grads[2])
        previous = (f"L{layer}.post", post)

    assert previous is not None
    node(final_vec, final_grad, id="final", kind="final", layer=spec.n_layers, head=-1, index=-1, name="prediction")
    edge(previous[0], "final", "residual", previous[1], abs(float(previous[1] @ _unit(final_vec))), final_grad)

    stack = torch.stack(vectors)
    dtype = next(model.parameters()).dtype
    logits = final_logits(model, stack.to(output_device(model), dtype)).float().cpu()  # the final norm's device
    final = logits[-1]
    tracked = int(batch.targets[0][0]) if batch.targets[0].numel() else int(final.argmax())
    columns = nodes.columns | _forward_columns(model, logits, tracked, top_k)
    if backward:
        f = saved["forward"]
        columns |= _backward_columns(model, vjps, len(vectors), tracked, top_k, f[FINAL_NORM], f[FINAL_NORM_SCALE])
    return FlowGraph(
        nodes=columns,
        edges=edges.columns,
        str_tokens=str_tokens,
        position=pos,
        layers=layers,
        prompt=batch.prompts[0] if batch.prompts else "",
        target=batch.target_strings[0] if batch.target_strings else None,
        tracked=str(model.to_str_tokens(torch.tensor([tracked]))[0]),  # type: ignore[attr-defined]
        tracked_id=tracked,
        loss=math.nan if loss is None else loss,
        parallel=[w.parallel for w in writes],
        final_logits=final,
        **t,
    )


def _strings(model: torch.nn.Module, ids: Tensor) -> list[list[str]]:
    flat = list(model.to_str_tokens(ids.flatten()))  # type: ignore[attr-defined]
    k = ids.shape[-1]
    return [flat[r * k : (r + 1) * k] for r in range(ids.shape[0])]


def _forward_columns(model: torch.nn.Module, logits: Tensor, tracked: int, top_k: int) -> dict[str, list]:
    """Each node's logit-lens reading: top tokens and probabilities, the tracked token's rank and probability, entropy."""
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    top = probs.topk(top_k, dim=-1)
    own = logits[:, tracked : tracked + 1]
    return {
        "top_tokens": _strings(model, top.indices),
        "top_probs": top.values.tolist(),
        "rank": ((logits > own).sum(-1) + 1).tolist(),
        "prob": probs[:, tracked].tolist(),
        "entropy": (-(probs * logp).nan_to_num().sum(-1)).tolist(),
    }


def _backward_columns(model: torch.nn.Module, vjps: dict[int, Tensor], n: int, tracked: int, top_k: int,
                      xhat: Tensor, scale: Tensor) -> dict[str, list]:  # fmt: skip
    """Each node's VJP read by the backward lens (the final norm linearised at the position's
    residual, ``"jacobian"``): tokens a descent step pushes toward and away, the tracked token's rank."""
    rows = sorted(vjps)
    projector = Projector(model, "jacobian", top_k, torch.float32)
    device = projector.w_u.device
    xhat = xhat.to(device, torch.float32).expand(len(rows), -1)
    scale = scale.to(device, torch.float32).expand(len(rows))
    toward, _, away, _, rank = projector.top(
        torch.stack([vjps[r] for r in rows]).to(device, torch.float32), xhat, scale,
        torch.full((len(rows),), tracked, dtype=torch.long, device=device),
    )  # fmt: skip
    columns: dict[str, list] = {"toward": [[] for _ in range(n)], "away": [[] for _ in range(n)],
                                "backward_rank": [-1] * n}  # fmt: skip
    for j, (r, t_row, a_row) in enumerate(zip(rows, _strings(model, toward), _strings(model, away))):
        columns["toward"][r], columns["away"][r] = t_row, a_row
        columns["backward_rank"][r] = int(rank[j]) if rank is not None else -1
    return columns
