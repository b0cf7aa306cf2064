"""Backward lens: read the gradients of the loss in the vocabulary.

Reversed Attention shows where a gradient-descent step wants to move attention; the
backward lens (Katz, Belinkov, Geva & Wolf, EMNLP 2024) shows what it wants each layer
to *write*. For a site ``s`` of layer ``l`` (``mlp_out``, ``attn_out`` or a residual
stream hook) and every position, the VJP is ``g = dL/d s`` ``[d_model]``, the gradient of
the loss with respect to that activation. It lives in the residual stream, so it can
be read through the unembedding like the logit lens reads hidden states.

Sign: **a descent step moves the activation along ``-g``.** The tokens whose logits
``-g`` raises most are "pushed toward"; the tokens ``+g`` raises most (``-g`` lowers
most) are "pushed away". With the target-token cross-entropy as the loss, the target
itself is normally pushed toward in the last layers at the position that predicts it.

Projection (``projection="weight"``, the default)::

    lens(v) = W_U^T (gain * center(v))        # [d_vocab]

``gain`` is the final norm's elementwise weight as the model applies it (``1 + weight``
for Gemma), ``center`` subtracts the mean for LayerNorm models and is the identity for
RMSNorm models; no bias (``b_U``, the norm's bias) is added, since a gradient is a
direction, not a point. This is linear in ``v`` (so ``lens(-g) = -lens(g)`` and lenses
add up) and independent of position, and it is exactly the logit lens of a
HookedTransformer loaded with ``fold_ln=True`` (which folds the same gain into
``W_U``). What it drops from the final norm's true Jacobian at position ``p`` is a
positive factor ``1/scale_p`` (which does not reorder tokens) and the projection that
removes ``v``'s component along the normalised residual ``x_p``.

``projection="jacobian"`` keeps both, so ``-lens(g)`` is the exact first-order change
of the logits at position ``p`` per unit step along ``-g``, through the direct path::

    lens_p(v) = W_U^T (gain / scale_p * (c - xhat_p (xhat_p . c) / d_model)),  c = center(v)

with ``xhat_p`` the normalised final residual (``FINAL_NORM``, before the gain) and
``scale_p`` its RMS or standard deviation. The removed component is a multiple of the
current logits, so this variant ranks tokens the model already favours lower.

Per head, the VJP at ``hook_z`` ``[d_head]`` is mapped through that head's ``W_O``
(``dz_h @ W_O[h]``, ``[d_model]``): a descent step on ``z_h`` changes the head's output
by ``-dz_h @ W_O[h]``, read the same way ("what the head's output is pushed toward").

The gradient of a weight matrix that reads a site is ``sum_p x_p^T g_p`` (its forward
inputs times its VJPs), so its rank is at most the number of positions;
:func:`gradient_rank` rebuilds it from hooks and measures that rank.
"""

from __future__ import annotations

import html as html_lib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_reversed.core.architecture import (
    FINAL_NORM,
    FINAL_NORM_SCALE,
    LENS_SITES,
    WEIGHT_MATRICES,
    NormAffine,
    attn_hook,
    block_hook,
    describe,
    final_norm,
    unembed_weight,
    weight_io,
)
from tl_reversed.core import memory
from tl_reversed.core.checks import as_int, check_layer, check_layers
from tl_reversed.core.engine import Metric, chunks, forward_backward
from tl_reversed.core.inputs import Batch, PromptsLike, TargetsLike, tokenize
from tl_reversed.core.reversed_attention import (
    KEEP,
    ReversedAttention,
    _LayerSink,
    _str_tokens,
    accumulation_dtype,
    assemble,
)
from tl_reversed.core.state import untouched

DEFAULT_SITES = ("mlp_out", "attn_out")
PROJECTIONS = ("weight", "jacobian")
LENS_KEEP = ("vectors", "tokens")
_ROWS_PER_CHUNK = 1 << 24  # vocabulary logits computed at once (floats), bounds the memory


# --------------------------------------------------------------------------- results


@dataclass
class TopTokens:
    """What a set of VJPs pushes toward and away from, in the vocabulary.

    Leading axes are those of the vectors (``[batch, site, layer, pos]`` for sites,
    ``[batch, layer, head, pos]`` for heads); the last axis is the ``k`` tokens, best first.

    Attributes:
        toward_ids, toward_values: the tokens whose logits a descent step (``-VJP``) raises
            most, and by how much per unit step (positive numbers).
        away_ids, away_values: the tokens whose logits it lowers most, and by how much
            (positive numbers: the logit falls by that much).
        target_rank: rank (1 = first) of each example's first target token among the
            pushed-toward tokens, or None where a metric replaced the targets.

    Padding positions, and VJPs that are exactly zero (no path from there to the loss,
    e.g. the last layer at positions before the target), hold id -1, value NaN and rank 0.
    """

    toward_ids: Int[Tensor, "... k"]
    toward_values: Float[Tensor, "... k"]
    away_ids: Int[Tensor, "... k"]
    away_values: Float[Tensor, "... k"]
    target_rank: Int[Tensor, "..."] | None = None


@dataclass
class BackwardLens:
    """VJPs of the loss at each site, layer and position, and their tokens.

    Attributes:
        norms: L2 norm of each VJP ``[batch, site, layer, pos]`` (0 on padding).
        top: the sites' :class:`TopTokens` ``[batch, site, layer, pos, k]``.
        head_norms: norm of each head's ``dz_h @ W_O[h]`` ``[batch, layer, head, pos]``
            (None with ``heads=False``).
        head_top: the heads' :class:`TopTokens` ``[batch, layer, head, pos, k]``.
        vjps: the VJPs ``[batch, site, layer, pos, d_model]`` (``keep="vectors"`` only).
        head_vjps: ``dz_h @ W_O[h]`` ``[batch, layer, head, pos, d_model]`` (``keep="vectors"``
            and ``heads=True`` only).
        loss: the per-example loss that was differentiated.
        tokens: the input tokens (prompt, then target minus its last token), right-padded.
        lengths: the real length of each row of ``tokens``.
        str_tokens: the input tokens as strings, one list per example (no padding).
        sites, layers: the labels of the ``site`` and ``layer`` axes.
        vocab: the string of every token id that appears in ``top`` / ``head_top``.
        projection: ``"weight"`` or ``"jacobian"`` (see the module docstring).
        prompts, targets: the strings given, if any.
    """

    norms: Float[Tensor, "batch site layer pos"]
    top: TopTokens
    loss: Float[Tensor, " batch"]
    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    str_tokens: list[list[str]]
    sites: list[str]
    layers: list[int]
    vocab: dict[int, str] = field(repr=False)
    projection: str = "weight"
    head_norms: Float[Tensor, "batch layer head pos"] | None = None
    head_top: TopTokens | None = None
    vjps: Float[Tensor, "batch site layer pos d_model"] | None = field(default=None, repr=False)
    head_vjps: Float[Tensor, "batch layer head pos d_model"] | None = field(default=None, repr=False)
    prompts: list[str] | None = None
    targets: list[str] | None = None

    def __len__(self) -> int:
        return self.norms.shape[0]

    @property
    def k(self) -> int:
        """How many tokens are kept per vector and direction."""
        return self.top.toward_ids.shape[-1]

    # ----------------------------------------------------------------- indexing

    def _example(self, example: int) -> int:
        if not -len(self) <= example < len(self):
            raise IndexError(f"example {example} out of range for {len(self)} examples")
        return example % len(self)

    def _site(self, site: str) -> int:
        if site not in self.sites:
            raise ValueError(f"site {site!r} was not computed; this result has sites {self.sites}")
        return self.sites.index(site)

    def _layer(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not computed; this result has layers {self.layers}")
        return self.layers.index(layer)

    def _position(self, position: int, example: int) -> int:
        n = int(self.lengths[example])
        if not -n <= position < n:
            raise IndexError(f"position {position} out of range for example {example} of {n} tokens")
        return position % n

    def _strings(self, ids: Tensor, values: Tensor, k: int | None) -> list[tuple[str, float]]:
        k = self.k if k is None else k
        return [(self.vocab[int(i)], float(v)) for i, v in zip(ids[:k], values[:k]) if int(i) >= 0]

    # ----------------------------------------------------------------- queries

    def top_tokens(
        self,
        site: str,
        layer: int,
        position: int = -1,
        example: int = 0,
        *,
        direction: str = "toward",
        k: int | None = None,
    ) -> list[tuple[str, float]]:
        """The tokens one site's VJP pushes ``"toward"`` (``-VJP``) or ``"away"`` (``+VJP``).

        ``position`` counts real tokens of the example; -1 is its last position (the one
        that predicts the first target token when the target is one token).
        Returns ``(token, logit change per unit step)`` pairs, largest first.
        """
        i = self._example(example)
        index = (i, self._site(site), self._layer(layer), self._position(position, i))
        return self._pick(self.top, index, direction, k)

    def head_top_tokens(
        self,
        layer: int,
        head: int,
        position: int = -1,
        example: int = 0,
        *,
        direction: str = "toward",
        k: int | None = None,
    ) -> list[tuple[str, float]]:
        """The tokens one head's output is pushed toward / away from (``dz_h @ W_O[h]``)."""
        if self.head_top is None or self.head_norms is None:
            raise ValueError("this result has no heads: call backward_lens(..., heads=True)")
        if not 0 <= head < self.head_norms.shape[2]:
            raise ValueError(f"head {head} out of range: the model has {self.head_norms.shape[2]} heads")
        i = self._example(example)
        index = (i, self._layer(layer), head, self._position(position, i))
        return self._pick(self.head_top, index, direction, k)

    def _pick(self, top: TopTokens, index: tuple, direction: str, k: int | None) -> list[tuple[str, float]]:
        if direction == "toward":
            return self._strings(top.toward_ids[index], top.toward_values[index], k)
        if direction == "away":
            return self._strings(top.away_ids[index], top.away_values[index], k)
        raise ValueError(f"direction must be 'toward' or 'away', got {direction!r}")

    def target_ranks(self, site: str = "mlp_out", position: int = -1, example: int = 0) -> dict[int, int]:
        """Rank (1 = first) of the first target token among the pushed-toward tokens, per layer."""
        if self.top.target_rank is None:
            raise ValueError("no targets were given (a metric was used), so there is no target rank")
        i = self._example(example)
        s, p = self._site(site), self._position(position, i)
        return {layer: int(self.top.target_rank[i, s, j, p]) for j, layer in enumerate(self.layers)}

    # ----------------------------------------------------------------- tables

    def to_dataframe(self, heads: bool = False) -> pd.DataFrame:
        """One row per (example, site, layer, position), or per (example, layer, head, position).

        Columns: ``example, site, layer, position, token`` (the input token there),
        ``norm``, ``top_toward`` (the first pushed-toward token), ``toward`` and ``away``
        (the ``k`` tokens, best first) and, where targets were given, ``target_rank``.
        With ``heads=True`` the ``site`` column is replaced by ``head``.
        """
        if heads:
            if self.head_norms is None or self.head_top is None:
                raise ValueError("this result has no heads: call backward_lens(..., heads=True)")
            norms, top, labels = self.head_norms, self.head_top, None
        else:
            norms, top, labels = self.norms, self.top, self.sites
        rows = []
        n, a, b, _ = norms.shape
        for i in range(n):
            for x in range(a):
                for y in range(b):
                    for p in range(int(self.lengths[i])):
                        index = (i, x, y, p)
                        toward = self._strings(top.toward_ids[index], top.toward_values[index], None)
                        away = self._strings(top.away_ids[index], top.away_values[index], None)
                        row = {"example": i}
                        if heads:
                            row.update(layer=self.layers[x], head=y)
                        else:
                            row.update(site=labels[x], layer=self.layers[y])  # type: ignore[index]
                        row.update(
                            position=p,
                            token=self.str_tokens[i][p],
                            norm=float(norms[index]),
                            top_toward=toward[0][0] if toward else None,
                            toward=[t for t, _ in toward],
                            away=[t for t, _ in away],
                        )
                        if top.target_rank is not None:
                            row["target_rank"] = int(top.target_rank[index])
                        rows.append(row)
        return pd.DataFrame(rows)

    def grid(self, site: str = "mlp_out", example: int = 0) -> pd.DataFrame:
        """The top pushed-toward token of each layer (rows) and position (columns) of one site."""
        i = self._example(example)
        s = self._site(site)
        n = int(self.lengths[i])
        columns = [f"{p}:{t}" for p, t in enumerate(self.str_tokens[i])]
        data = [
            [self.vocab.get(int(self.top.toward_ids[i, s, j, p, 0]), "") for p in range(n)]
            for j in range(len(self.layers))
        ]
        return pd.DataFrame(data, index=pd.Index(self.layers, name="layer"), columns=columns)

    # ----------------------------------------------------------------- pictures

    def plot(
        self, site: str | Sequence[str] | None = None, example: int = 0, *, log: bool = True, max_chars: int = 8
    ):
        """Layer x position grids (paper Figure 5): colour = VJP norm, text = top pushed-toward token.

        One panel per site (default: every site of the result), layer 0 at the bottom,
        the example's input tokens along the x axis. The colour scale is logarithmic by
        default (VJP norms span orders of magnitude across layers and positions;
        ``log=False`` for a linear one); zero VJPs (no path to the loss) are blank.
        Returns a :class:`matplotlib.figure.Figure`; never calls ``plt.show()``.
        """
        return plot_lens(self, site, example, log=log, max_chars=max_chars)

    def to_html(
        self,
        path: str | Path | None = None,
        site: str | Sequence[str] | None = None,
        example: int = 0,
        *,
        log: bool = True,
    ) -> str:
        """A self-contained HTML page of the grids (inline CSS; no scripts, no remote URLs).

        Each cell shows the top pushed-toward token on a background coloured by the VJP
        norm (log scale unless ``log=False``); hovering shows the norm, the ``k`` tokens
        pushed toward and away and the target's rank. Writes the page to ``path`` when
        given; returns it as a string (``IPython.display.HTML(...)`` shows it inline).
        """
        page = render_html(self, site, example, log=log)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page


class LensAndRA(NamedTuple):
    """The backward lens and Reversed Attention of one backward pass."""

    lens: BackwardLens
    ra: ReversedAttention


@dataclass
class GradientRank:
    """The gradient of one weight matrix rebuilt from hooks, and its rank.

    ``gradient = inputs^T @ vjps`` summed over every real position of every example, in
    TransformerLens orientation ``[d_in, d_out]`` (``W_O``: ``[head * d_head, d_model]``).

    Attributes:
        matrix, layer: which matrix.
        rank: numerical rank of ``gradient`` (``torch.linalg.matrix_rank`` in float64).
        n_positions: the number of positions summed over: the lemma's bound, ``rank <=
            n_positions`` (and ``<= min(d_in, d_out)``).
        singular_values: of ``gradient``, largest first.
        gradient: ``[d_in, d_out]``, float64.
        inputs: the forward inputs ``[n_positions, d_in]``.
        vjps: the gradients at the matrix's output ``[n_positions, d_out]``.
    """

    matrix: str
    layer: int
    rank: int
    n_positions: int
    singular_values: Float[Tensor, " rank_bound"]
    gradient: Float[Tensor, "d_in d_out"] = field(repr=False)
    inputs: Float[Tensor, "n_positions d_in"] = field(repr=False)
    vjps: Float[Tensor, "n_positions d_out"] = field(repr=False)

    @property
    def bound(self) -> int:
        """``min(n_positions, d_in, d_out)``: the most the rank can be."""
        return min(self.n_positions, *self.gradient.shape)


# --------------------------------------------------------------------------- projection


class _Projector:
    """Reads vectors of the residual stream in the vocabulary (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, projection: str, top_k: int, dtype: torch.dtype):
        param = next(model.parameters())
        self.norm: NormAffine = final_norm(model)
        self.gain = self.norm.gain.to(param.device, dtype)
        self.w_u = unembed_weight(model).to(param.device, dtype)
        self.jacobian = projection == "jacobian"
        self.top_k = _check_top_k(top_k, self.w_u.shape[1])
        self.d_model = self.gain.shape[0]

    def logits(
        self,
        v: Float[Tensor, "rows d_model"],
        xhat: Float[Tensor, "rows d_model"] | None,
        scale: Float[Tensor, " rows"] | None,
    ) -> Float[Tensor, "rows d_vocab"]:
        """``lens(v)`` for each row (the logit change per unit step along ``+v``)."""
        c = v - v.mean(-1, keepdim=True) if self.norm.centered else v
        if self.jacobian:
            assert xhat is not None and scale is not None
            c = (c - xhat * (xhat * c).sum(-1, keepdim=True) / self.d_model) / scale[:, None]
        return (c * self.gain) @ self.w_u

    def top(
        self,
        v: Float[Tensor, "rows d_model"],
        xhat: Tensor | None,
        scale: Tensor | None,
        target: Int[Tensor, " rows"] | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Top tokens toward (of ``-v``) and away (of ``+v``), and the target's rank, per row."""
        if v.shape[0] == 0:  # every VJP was zero (a metric times 0, a zeroed o_proj): nothing to read
            ids = torch.empty(0, self.top_k, dtype=torch.long)
            values = torch.empty(0, self.top_k, dtype=v.dtype)
            return ids, values, ids, values, None if target is None else torch.empty(0, dtype=torch.long)
        outs: list[list[Tensor]] = [[], [], [], [], []]
        step = max(1, _ROWS_PER_CHUNK // self.w_u.shape[1])
        for a in range(0, v.shape[0], step):
            sl = slice(a, a + step)
            logits = self.logits(v[sl], None if xhat is None else xhat[sl], None if scale is None else scale[sl])
            toward = (-logits).topk(self.top_k, dim=-1)
            away = logits.topk(self.top_k, dim=-1)
            outs[0].append(toward.indices.cpu())
            outs[1].append(toward.values.cpu())
            outs[2].append(away.indices.cpu())
            outs[3].append(away.values.cpu())
            if target is not None:
                own = logits.gather(-1, target[sl, None])
                outs[4].append(((logits < own).sum(-1) + 1).cpu())
        joined = [torch.cat(o) if o else None for o in outs]
        return joined[0], joined[1], joined[2], joined[3], joined[4]  # type: ignore[return-value]


# --------------------------------------------------------------------------- the pass


class _LensSink:
    """Hooks that keep the VJPs of the chosen sites (and of ``hook_z``) during one pass."""

    def __init__(self, sites: list[str], layers: list[int], heads: bool, jacobian: bool):
        self.sites, self.layers, self.heads, self.jacobian = sites, layers, heads, jacobian
        self.grads: dict[tuple[str, int], Tensor] = {}
        self.final: dict[str, Tensor] = {}

    def hooks(self) -> tuple[list, list]:
        fwd, bwd = [], []
        if self.jacobian:
            fwd += [(FINAL_NORM, self._save(FINAL_NORM)), (FINAL_NORM_SCALE, self._save(FINAL_NORM_SCALE))]
        for layer in self.layers:
            for site in self.sites:
                bwd.append((block_hook(layer, site), self._grad(site, layer)))
            if self.heads:
                bwd.append((attn_hook(layer, "z"), self._grad("z", layer)))
        return fwd, bwd

    def _save(self, name: str):
        def hook(x: Tensor, hook: object) -> None:
            self.final[name] = x.detach()

        return hook

    def _grad(self, site: str, layer: int):
        def hook(grad: Tensor, hook: object) -> None:
            self.grads[(site, layer)] = grad.detach()

        return hook


def _check_sites(sites: str | Sequence[str], model: object, layers: list[int]) -> list[str]:
    chosen = [sites] if isinstance(sites, str) else list(sites)
    if not chosen:
        raise ValueError(f"sites is empty: choose some of {LENS_SITES}")
    bad = [s for s in chosen if s not in LENS_SITES]
    if bad:
        raise ValueError(f"unknown sites {bad}: choose from {LENS_SITES}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"sites {chosen} repeat a site: name each once")
    names = model.hook_dict  # type: ignore[attr-defined]
    missing = [block_hook(layers[0], s) for s in chosen if block_hook(layers[0], s) not in names]
    if missing:
        raise ValueError(f"this model has no hook {', '.join(missing)}; choose other sites")
    return chosen


def _check_top_k(top_k: int, d_vocab: int) -> int:
    top_k = as_int(top_k, "top_k")
    if not 1 <= top_k <= d_vocab:
        raise ValueError(f"top_k must be an integer from 1 to the vocabulary size {d_vocab}, got {top_k!r}")
    return top_k


class _Collector:
    """Accumulates the per-chunk results of :func:`_lens_pass` into padded tensors."""

    def __init__(self, n: int, width: int, sites: list[str], layers: list[int], n_heads: int, heads: bool,
                 keep: str, k: int, d_model: int, dtype: torch.dtype, with_rank: bool):  # fmt: skip
        self.site_shape = (n, len(sites), len(layers), width)
        self.head_shape = (n, len(layers), n_heads, width)
        self.norms = torch.zeros(self.site_shape, dtype=dtype)
        self.top = self._top(self.site_shape, k, dtype, with_rank)
        self.vjps = torch.zeros(*self.site_shape, d_model, dtype=dtype) if keep == "vectors" else None
        self.head_norms = torch.zeros(self.head_shape, dtype=dtype) if heads else None
        self.head_top = self._top(self.head_shape, k, dtype, with_rank) if heads else None
        self.head_vjps = torch.zeros(*self.head_shape, d_model, dtype=dtype) if heads and keep == "vectors" else None

    @staticmethod
    def _top(shape: tuple, k: int, dtype: torch.dtype, with_rank: bool) -> TopTokens:
        return TopTokens(
            toward_ids=torch.full((*shape, k), -1, dtype=torch.long),
            toward_values=torch.full((*shape, k), float("nan"), dtype=dtype),
            away_ids=torch.full((*shape, k), -1, dtype=torch.long),
            away_values=torch.full((*shape, k), float("nan"), dtype=dtype),
            target_rank=torch.zeros(shape, dtype=torch.long) if with_rank else None,
        )


def _lens_pass(
    model: torch.nn.Module,
    batch: Batch,
    metric: Metric | None,
    sink: _LensSink,
    ra_sink: _LayerSink | None,
    extra_hooks: Sequence,
) -> Float[Tensor, " batch"]:
    """One forward and backward pass that fills the lens sink (and the RA sink, if given)."""
    fwd, bwd = sink.hooks()
    if ra_sink is not None:
        ra_fwd, ra_bwd = ra_sink.hooks()
        fwd, bwd = fwd + ra_fwd, bwd + ra_bwd
    loss = forward_backward(model, batch, metric, fwd, bwd, extra_hooks)
    finite = all(bool(torch.isfinite(g).all()) for g in sink.grads.values())
    if not finite or (ra_sink is not None and not ra_sink.finite):
        raise FloatingPointError(
            "a gradient has NaN or inf entries: the model overflowed in its dtype; "
            "run it in float32 (load_model(..., dtype=torch.float32)) or shorten the prompt"
        )
    missing = [(site, layer) for layer in sink.layers for site in sink.sites if (site, layer) not in sink.grads]
    if missing:
        site, layer = missing[0]
        raise TypeError(
            f"the backward hook on {block_hook(layer, site)} never fired: this model does not carry "
            "gradients through that hook point; choose other sites"
        )
    return loss


def _fill(
    out: _Collector,
    idx: Tensor,
    sink: _LensSink,
    sub: Batch,
    sites: list[str],
    layers: list[int],
    heads: bool,
    projector: _Projector,
    model: torch.nn.Module,
    dtype: torch.dtype,
) -> None:
    """Project the VJPs of one chunk and write them into ``out`` at rows ``idx``."""
    n, w = sub.tokens.shape
    device = projector.w_u.device
    real = (torch.arange(w)[None, :] < sub.lengths[:, None]).to(device)  # [n, w]
    xhat = scale = None
    if projector.jacobian:
        xhat = sink.final[FINAL_NORM].to(dtype).flatten(0, 1)
        scale = sink.final[FINAL_NORM_SCALE].to(dtype).flatten()
    target = None
    if out.top.target_rank is not None:
        first = torch.stack([t[0] for t in sub.targets]).to(device)
        target = einops.repeat(first, "b -> (b p)", p=w)
    for s, site in enumerate(sites):
        for j, layer in enumerate(layers):
            g = sink.grads[(site, layer)].to(dtype) * real[..., None]  # [n, w, d_model]
            index = (idx, s, j, slice(0, w))
            norms = g.norm(dim=-1)
            out.norms[index] = norms.cpu()
            if out.vjps is not None:
                out.vjps[index] = g.cpu()
            live = real & (norms > 0)  # a zero VJP (e.g. the last layer before the target) reads as nothing
            flat = live.flatten()
            parts = projector.top(
                g.flatten(0, 1)[flat],
                None if xhat is None else xhat[flat],
                None if scale is None else scale[flat],
                None if target is None else target[flat],
            )
            _store_rows(out.top, index, live.cpu(), parts)
    if not heads:
        return
    for j, layer in enumerate(layers):
        w_o = model.blocks[layer].attn.W_O.detach().to(device, dtype)  # type: ignore[index]
        dz = sink.grads[("z", layer)].to(dtype)
        mapped = einops.einsum(dz, w_o, "b p h d, h d m -> b h p m") * real[:, None, :, None]
        index = (idx, j, slice(None), slice(0, w))
        norms = mapped.norm(dim=-1)
        out.head_norms[index] = norms.cpu()  # type: ignore[index]
        if out.head_vjps is not None:
            out.head_vjps[index] = mapped.cpu()
        n_heads = mapped.shape[1]
        head_real = (einops.repeat(real, "b p -> b h p", h=n_heads) & (norms > 0)).flatten()

        def per_head(t: Tensor | None) -> Tensor | None:
            """Rows indexed by (batch, pos) repeated for every head, real rows only."""
            if t is None:
                return None
            grid = t.view(n, w, *t.shape[1:])
            return einops.repeat(grid, "b p ... -> b h p ...", h=n_heads).flatten(0, 2)[head_real]

        rows = mapped.flatten(0, 2)[head_real]
        parts = projector.top(rows, per_head(xhat), per_head(scale), per_head(target))
        _store_rows(out.head_top, index, head_real.view(n, n_heads, w).cpu(), parts)  # type: ignore[arg-type]


def _store_rows(top: TopTokens, index: tuple, real: Tensor, parts: tuple) -> None:
    """Scatter per-row results (rows = the True entries of ``real``) into ``top[index]``."""
    # Indexing with a tensor of rows would write into a copy: write through one view per row.
    idx, *rest = index
    toward_ids, toward_values, away_ids, away_values, rank = parts
    offset = 0
    for b, i in enumerate(idx.tolist()):
        mask = real[b]
        count = int(mask.sum())
        sl = slice(offset, offset + count)
        view_index = (i, *rest)
        for name, value in (("toward_ids", toward_ids), ("toward_values", toward_values),
                            ("away_ids", away_ids), ("away_values", away_values)):  # fmt: skip
            target = getattr(top, name)[view_index]
            target[mask] = value[sl].to(target.dtype)
        if rank is not None and top.target_rank is not None:
            top.target_rank[view_index][mask] = rank[sl]
        offset += count


# --------------------------------------------------------------------------- public calls


def _run(
    model: torch.nn.Module,
    prompts: PromptsLike,
    targets: TargetsLike,
    *,
    sites: str | Sequence[str],
    metric: Metric | None,
    layers: Sequence[int] | int | None,
    heads: bool,
    top_k: int,
    projection: str,
    keep: str,
    batch_size: int | None,
    progress: bool | None,
    extra_hooks: Sequence,
    ra_keep: str | None,
    memory_check: bool = True,
) -> LensAndRA | BackwardLens:
    spec = describe(model)
    chosen = check_layers(layers, spec)
    site_list = _check_sites(sites, model, chosen)
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if keep not in LENS_KEEP:
        raise ValueError(f"keep must be one of {LENS_KEEP}, got {keep!r}")
    if ra_keep is not None and ra_keep not in KEEP:
        raise ValueError(f"ra_keep must be one of {KEEP}, got {ra_keep!r}")
    if not isinstance(heads, bool):
        raise TypeError(f"heads must be True or False, got {heads!r}")
    batch = tokenize(model, prompts, targets, spec, need_targets=metric is None)
    n, width = batch.tokens.shape
    dtype = accumulation_dtype(next(model.parameters()).dtype)
    parts = chunks(batch, batch_size, same_length=metric is not None)
    if memory.enabled(memory_check):
        memory.check_pass(model, batch, parts, what="the backward lens", keep=ra_keep or "norms",
                          kept_layers=len(chosen), full_logits=metric is not None,
                          extra=_lens_bytes(model, n, max(map(len, parts)), width, len(site_list), len(chosen),
                                            spec.n_heads if heads else 0, keep))  # fmt: skip
    show = len(parts) > 1 if progress is None else progress
    loss = torch.zeros(n, dtype=dtype)
    with untouched(model):
        projector = _Projector(model, projection, top_k, dtype)
        out = _Collector(n, width, site_list, chosen, spec.n_heads, heads, keep, projector.top_k,
                         projector.d_model, dtype, with_rank=metric is None)  # fmt: skip
        ra_sinks: list[tuple[Tensor, _LayerSink]] = []
        for index in tqdm(parts, desc="backward lens", disable=not show, leave=False):
            sub = batch.rows(index)
            sink = _LensSink(site_list, chosen, heads, projector.jacobian)
            ra_sink = _LayerSink(spec, chosen, sub, ra_keep, model) if ra_keep is not None else None
            idx = torch.tensor(index)
            loss[idx] = _lens_pass(model, sub, metric, sink, ra_sink, extra_hooks).to(dtype)
            with torch.no_grad():
                _fill(out, idx, sink, sub, site_list, chosen, heads, projector, model, dtype)
            if ra_sink is not None:
                ra_sinks.append((idx, ra_sink))
        str_tokens = _str_tokens(model, batch)
        vocab = _vocab(model, out)
    lens = BackwardLens(
        norms=out.norms,
        top=out.top,
        loss=loss,
        tokens=batch.tokens,
        lengths=batch.lengths,
        str_tokens=str_tokens,
        sites=site_list,
        layers=chosen,
        vocab=vocab,
        projection=projection,
        head_norms=out.head_norms,
        head_top=out.head_top,
        vjps=out.vjps,
        head_vjps=out.head_vjps,
        prompts=batch.prompts,
        targets=batch.target_strings,
    )
    if ra_keep is None:
        return lens
    return LensAndRA(lens, assemble(model, spec, chosen, batch, loss, ra_keep, ra_sinks))


def _lens_bytes(model: object, n: int, chunk: int, width: int, sites: int, layers: int, heads: int, keep: str) -> int:
    """Bytes the lens keeps besides the pass: one chunk's VJPs, the kept vectors, a projection block."""
    d_model = int(model.cfg.d_model)  # type: ignore[attr-defined]
    per_row = (sites + (1 if heads else 0)) * layers * width * d_model  # VJPs (hook_z's are head * d_head wide)
    kept = n * (sites + heads) * layers * width * d_model if keep == "vectors" else 0
    block = min(_ROWS_PER_CHUNK, chunk * width * max(heads, 1) * int(model.cfg.d_vocab))  # type: ignore[attr-defined]
    return 4 * (chunk * per_row + kept + 3 * block)


def _vocab(model: object, out: _Collector) -> dict[int, str]:
    """The strings of every token id the result refers to."""
    tops = [out.top] + ([out.head_top] if out.head_top is not None else [])
    ids = torch.cat([torch.cat([t.toward_ids.flatten(), t.away_ids.flatten()]) for t in tops]).unique()
    ids = ids[ids >= 0]
    strings = model.to_str_tokens(ids) if ids.numel() else []  # type: ignore[attr-defined]
    return {int(i): str(s) for i, s in zip(ids.tolist(), strings)}


def backward_lens(
    model: torch.nn.Module,
    prompts: PromptsLike,
    targets: TargetsLike = None,
    *,
    sites: str | Sequence[str] = DEFAULT_SITES,
    metric: Metric | None = None,
    layers: Sequence[int] | int | None = None,
    heads: bool = True,
    top_k: int = 10,
    projection: str = "weight",
    keep: str = "vectors",
    batch_size: int | None = 16,
    progress: bool | None = None,
    extra_hooks: Sequence = (),
    memory_check: bool = True,
) -> BackwardLens:
    """The backward lens: each site's VJP at every layer and position, read in the vocabulary.

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        prompts: a string, a list of strings, or a token tensor ``[batch, pos]``.
        targets: one string per prompt (e.g. ``" Rome"``); the loss is the target
            cross-entropy, teacher-forced, summed over target tokens, per example.
        sites: block hooks to read, from ``("resid_pre", "attn_out", "resid_mid",
            "mlp_out", "resid_post")``.
        metric: instead of targets, any callable ``(logits, tokens) -> [batch]`` loss.
        layers: the layers to read (default all).
        heads: also map each head's ``hook_z`` VJP through its ``W_O`` and read it.
        top_k: tokens kept per vector and direction.
        projection: ``"weight"`` (final-norm gain, then ``W_U``) or ``"jacobian"`` (the
            final norm's exact linearisation at each position); see the module docstring.
        keep: ``"vectors"`` keeps the VJPs themselves; ``"tokens"`` only norms and tokens.
        batch_size: examples per forward/backward pass (``None``: all at once).
        progress: show a progress bar (default: when there is more than one batch).
        extra_hooks: forward hooks that stay on during the pass, e.g. an attention patch.
        memory_check: estimate the peak memory first and raise
            :class:`~tl_reversed.core.memory.WouldRunOutOfMemory` before any pass where it exceeds the
            memory available (see :mod:`tl_reversed.core.memory`); ``False`` skips the check.

    Returns:
        A :class:`BackwardLens`. The update direction is ``-VJP``: ``toward`` tokens are
        those ``-VJP`` promotes, ``away`` tokens those it demotes.
    """
    options = dict(sites=sites, metric=metric, layers=layers, heads=heads, top_k=top_k, projection=projection,
                   keep=keep, batch_size=batch_size, progress=progress, extra_hooks=extra_hooks,
                   memory_check=memory_check)  # fmt: skip
    return _run(model, prompts, targets, **options, ra_keep=None)  # type: ignore[return-value, arg-type]


def backward_lens_and_ra(
    model: torch.nn.Module,
    prompts: PromptsLike,
    targets: TargetsLike = None,
    *,
    sites: str | Sequence[str] = DEFAULT_SITES,
    metric: Metric | None = None,
    layers: Sequence[int] | int | None = None,
    heads: bool = True,
    top_k: int = 10,
    projection: str = "weight",
    keep: str = "vectors",
    ra_keep: str = "maps",
    batch_size: int | None = 16,
    progress: bool | None = None,
    extra_hooks: Sequence = (),
    memory_check: bool = True,
) -> LensAndRA:
    """The backward lens and Reversed Attention from ONE forward and backward pass.

    Takes the arguments of :func:`backward_lens`, plus ``ra_keep`` (``"maps"`` or
    ``"norms"``, as ``keep`` of :func:`tl_reversed.core.reversed_attention`). Returns
    ``LensAndRA(lens, ra)``; both equal what the two separate calls give.
    """
    options = dict(sites=sites, metric=metric, layers=layers, heads=heads, top_k=top_k, projection=projection,
                   keep=keep, batch_size=batch_size, progress=progress, extra_hooks=extra_hooks,
                   memory_check=memory_check)  # fmt: skip
    return _run(model, prompts, targets, **options, ra_keep=ra_keep)  # type: ignore[return-value, arg-type]


def gradient_rank(
    model: torch.nn.Module,
    prompts: PromptsLike,
    targets: TargetsLike = None,
    layer: int = 0,
    matrix: str = "W_in",
    *,
    metric: Metric | None = None,
    rtol: float | None = None,
) -> GradientRank:
    """The gradient of one weight matrix, rebuilt from hooks as inputs x VJPs, and its rank.

    Supported matrices (TransformerLens names, orientation ``[d_in, d_out]``): ``W_in``
    (the MLP's input projection; the linear branch of a gated MLP), ``W_gate`` (gated
    MLPs), ``W_out`` (the MLP's output projection) and ``W_O`` (all heads' output
    projection, ``[head * d_head, d_model]``). The gradient of the summed per-example
    loss is ``sum_p x_p^T g_p`` over every real position ``p`` of every example, so its rank
    is at most the number of positions (the lemma of the backward-lens paper).

    Args:
        model, prompts, targets, metric: as in :func:`backward_lens`.
        layer: the layer of the matrix.
        matrix: one of ``("W_in", "W_gate", "W_out", "W_O")``.
        rtol: relative tolerance of the rank (default ``torch.linalg.matrix_rank``'s).
    """
    spec = describe(model)
    layer = check_layer(layer, spec)
    io = weight_io(model, layer, matrix)
    batch = tokenize(model, prompts, targets, spec, need_targets=metric is None)
    saved: dict[str, Tensor] = {}

    def keep_input(x: Tensor, hook: object) -> None:
        saved["input"] = x.detach()

    def keep_grad(grad: Tensor, hook: object) -> None:
        saved["grad"] = grad.detach()

    parts = chunks(batch, None, same_length=metric is not None)
    inputs, vjps = [], []
    with untouched(model):
        for index in parts:
            sub = batch.rows(index)
            forward_backward(model, sub, metric, [(io.input_hook, keep_input)], [(io.grad_hook, keep_grad)])
            if "grad" not in saved:
                raise TypeError(f"the backward hook on {io.grad_hook} never fired: this model cannot carry {matrix}")
            x = saved.pop("input").double()
            if io.input_norm is not None:
                affine = io.input_norm
                x = x * affine.gain.to(x)
                x = x + affine.bias.to(x) if affine.bias is not None else x
            x = x.flatten(2)  # W_O: [batch, pos, head, d_head] -> [batch, pos, head * d_head]
            g = saved.pop("grad").double().flatten(2)
            w = sub.tokens.shape[1]
            real = torch.arange(w)[None, :] < sub.lengths[:, None]
            inputs.append(x[real.to(x.device)].cpu())
            vjps.append(g[real.to(g.device)].cpu())
    x_all, g_all = torch.cat(inputs), torch.cat(vjps)
    gradient = x_all.T @ g_all
    return GradientRank(
        matrix=matrix,
        layer=layer,
        rank=int(torch.linalg.matrix_rank(gradient, rtol=rtol)),
        n_positions=x_all.shape[0],
        singular_values=torch.linalg.svdvals(gradient),
        gradient=gradient,
        inputs=x_all,
        vjps=g_all,
    )


# --------------------------------------------------------------------------- figures and pages


def _labels(tokens: Sequence[str]) -> list[str]:
    return [t.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$") for t in tokens]


def _site_list(result: BackwardLens, site: str | Sequence[str] | None) -> list[str]:
    chosen = list(result.sites) if site is None else [site] if isinstance(site, str) else list(site)
    for s in chosen:
        result._site(s)
    return chosen


def _color_scale(values: np.ndarray, log: bool):
    """A matplotlib norm for VJP norms: log over the positive values, or linear from 0."""
    from matplotlib.colors import LogNorm, Normalize

    positive = values[values > 0]
    if not positive.size:
        return Normalize(vmin=0.0, vmax=1.0)
    if log:
        low, high = float(positive.min()), float(positive.max())
        return LogNorm(vmin=low, vmax=high if high > low else low * 10)
    return Normalize(vmin=0.0, vmax=float(positive.max()))


def plot_lens(result: BackwardLens, site: str | Sequence[str] | None = None, example: int = 0, *,
              log: bool = True, max_chars: int = 8):  # fmt: skip
    """Layer x position grids of one example, one panel per site (see :meth:`BackwardLens.plot`)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    chosen = _site_list(result, site)
    i = result._example(example)
    n = int(result.lengths[i])
    tokens = result.str_tokens[i]
    n_layers = len(result.layers)
    width = min(30.0, 0.75 * n + 2.0)
    height = min(24.0, 0.28 * n_layers + 1.8)
    fig = Figure(figsize=(width * len(chosen), height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(chosen), squeeze=False)).ravel()
    cmap = colormaps["viridis"].with_extremes(bad="white")
    for ax, name in zip(axes, chosen):
        s = result._site(name)
        values = result.norms[i, s, :, :n].double().numpy()
        scale = _color_scale(values, log)
        values = np.where(values > 0, values, np.nan)  # zero VJPs: blank cells
        image = ax.imshow(values, cmap=cmap, norm=scale, origin="lower", aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.8, label="VJP norm" + (" (log)" if log else ""))
        for j in range(n_layers):
            for p in range(n):
                token = result.vocab.get(int(result.top.toward_ids[i, s, j, p, 0]), "")
                shade = cmap(scale(values[j, p])) if np.isfinite(values[j, p]) else (1, 1, 1, 1)
                light = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 0.5
                text = _labels([token[:max_chars]])[0]
                ax.text(p, j, text, ha="center", va="center", fontsize=6.5, color="black" if light else "white")
        ax.set_xticks(range(n), _labels(tokens), rotation=90, fontsize=8)
        ax.set_yticks(range(n_layers), [str(layer) for layer in result.layers], fontsize=7)
        ax.set_xlabel("position (input token)")
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: top token of -VJP")
    target = f"target {result.targets[i]!r}" if result.targets else "custom metric"
    fig.suptitle(f"Backward lens, {target} (cell text: token a descent step pushes toward)")
    return fig


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; margin-bottom: 28px; }}
th {{ font-weight: normal; color: #555; padding: 2px 4px; white-space: pre; font-family: ui-monospace, monospace; }}
td {{ padding: 3px 5px; text-align: center; white-space: pre; font-family: ui-monospace, monospace;
      border: 1px solid #fff; min-width: 48px; }}
.note {{ color: #555; max-width: 900px; }}
</style></head><body>
<h1>{title}</h1>
<p class="note">Rows are layers (last layer on top), columns the input tokens. Each cell shows the token a
gradient-descent step pushes that site's output toward (top token of -VJP through the final norm and the
unembedding, projection "{projection}"); the background is the VJP norm. Hover a cell for the norm, the
{k} tokens pushed toward and away, and the target's rank.</p>
{tables}
</body></html>
"""


def render_html(
    result: BackwardLens, site: str | Sequence[str] | None = None, example: int = 0, *, log: bool = True
) -> str:
    """The page of :meth:`BackwardLens.to_html` (inline CSS only, no scripts, no URLs)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    esc = html_lib.escape
    chosen = _site_list(result, site)
    i = result._example(example)
    n = int(result.lengths[i])
    cmap = colormaps["viridis"]
    tables = []
    for name in chosen:
        s = result._site(name)
        values = result.norms[i, s, :, :n].double().numpy()
        scale = _color_scale(values, log)
        head = "".join(f"<th>{p}<br>{esc(t)}</th>" for p, t in enumerate(result.str_tokens[i]))
        rows = []
        for j in reversed(range(len(result.layers))):
            cells = []
            for p in range(n):
                rgba = cmap(scale(values[j, p])) if values[j, p] > 0 else (1.0, 1.0, 1.0, 1.0)
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.5
                toward = result.top_tokens(name, result.layers[j], p, i)
                away = result.top_tokens(name, result.layers[j], p, i, direction="away")
                tip = f"layer {result.layers[j]}, position {p}, norm {values[j, p]:.4g}\n"
                tip += "toward: " + ", ".join(repr(t) for t, _ in toward) + "\n"
                tip += "away: " + ", ".join(repr(t) for t, _ in away)
                if result.top.target_rank is not None:
                    tip += f"\ntarget rank: {int(result.top.target_rank[i, s, j, p])}"
                cells.append(
                    f'<td style="background:{to_hex(rgba)};color:{"#000" if light else "#fff"}" '
                    f'title="{esc(tip)}">{esc(toward[0][0] if toward else "")}</td>'
                )
            rows.append(f"<tr><th>{result.layers[j]}</th>{''.join(cells)}</tr>")
        tables.append(
            f"<h2>{esc(name)}</h2><table><tr><th>layer</th>{head}</tr>{''.join(rows)}</table>"
        )
    target = f"target {result.targets[i]!r}" if result.targets else "custom metric"
    prompt = f"{result.prompts[i]!r} " if result.prompts else ""
    title = f"Backward lens: {prompt}{target}"
    return _PAGE.format(title=esc(title), projection=esc(result.projection), k=result.k, tables="".join(tables))


__all__ = [
    "BackwardLens",
    "GradientRank",
    "LensAndRA",
    "TopTokens",
    "WEIGHT_MATRICES",
    "backward_lens",
    "backward_lens_and_ra",
    "gradient_rank",
    "plot_lens",
    "render_html",
]
