"""Reversed Attention: the gradient of the loss with respect to each head's Q.K^T.

For one head with forward pattern ``A`` ``[query_pos, key_pos]``, values ``V``
``[key_pos, d_head]`` and the gradient at ``hook_z`` ``dZ`` ``[query_pos, d_head]``::

    G  = dZ @ V^T                        # dL/dA (paper eq. 14)
    RA = A * (G - rowsum(A * G)) * c     # softmax derivative times the QK scale (eq. 15-17)

RA is the gradient with respect to the unscaled products ``Q @ K^T`` (the paper's R):
lower-triangular, every row sums to zero. A gradient-descent step moves attention
along ``-RA``: where RA is negative, the step raises attention to that key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TypedDict
from dataclasses import dataclass, field

import einops
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_reversed.core.architecture import ModelSpec, attn_hook, describe, repeat_kv
from tl_reversed.core import memory
from tl_reversed.core.checks import check_layers  # noqa: F401 (also imported from here)
from tl_reversed.core.attention_seams import refuse_whole_pattern_hooks, tiled_attention_on, tiled_unsupported
from tl_reversed.core.engine import Chunk, Hook, Metric, run
from tl_reversed.core.inputs import Batch, PromptsLike, TargetsLike, tokenize
from tl_reversed.core.options import KEEP, RA_PATHS, Keep, RAPath, check_option
from tl_reversed.core.results import Result
from tl_reversed.core.paths import pass_for, resolve_path
from tl_reversed.core.rows import QueryPositions, TileReducer, query_rows, reduce_layer
from tl_reversed.core.segments import SegmentSink, masked_by, prompt_ids, run_ids, unpad
from tl_reversed.core.state import untouched


def ra_from_parts(
    pattern: Float[Tensor, "batch head query_pos key_pos"],
    v: Float[Tensor, "batch key_pos kv_head d_head"],
    grad_z: Float[Tensor, "batch query_pos head d_head"],
    scale: float,
) -> Float[Tensor, "batch head query_pos key_pos"]:
    """RA of every head of one layer from the pattern, values and ``grad(hook_z)``.

    Computed in float32 (float64 for float64 inputs), whatever the model's dtype.
    """
    dtype = accumulation_dtype(grad_z.dtype)
    values = repeat_kv(v.to(dtype), pattern.shape[1])
    grad_pattern = einops.einsum(grad_z.to(dtype), values, "b q h d, b k h d -> b h q k")
    a = pattern.to(dtype)
    return a * (grad_pattern - (a * grad_pattern).sum(-1, keepdim=True)) * scale


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype (half, bfloat16, float32) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class HeadDescription(TypedDict):
    """What :meth:`ReversedAttention.describe_head` says about one head's map.

    ``pushed_up`` / ``pushed_down``: ``(key token, RA value)`` pairs of the dominant query
    row, strongest first; a descent step attends more to the first and less to the second.
    """

    layer: int
    head: int
    ra_norm: float
    query_pos: int
    query_token: str
    pushed_up: list[tuple[str, float]]
    pushed_down: list[tuple[str, float]]


@dataclass
class ReversedAttention(Result):
    """RA maps and norms for a batch of prompts.

    Attributes:
        norms: Frobenius norm of each head's RA map ``[batch, layer, head]``.
        pattern_norms: Frobenius norm of each head's forward attention ``[batch, layer, head]``.
        loss: the per-example loss that was differentiated.
        tokens: the input tokens (prompt, then target minus its last token), right-padded.
        lengths: the real length of each row of ``tokens``.
        str_tokens: the input tokens as strings, one list per example (no padding).
        layers: the model layers along the ``layer`` axis.
        maps: RA ``[batch, layer, head, query_pos, key_pos]`` (``keep="maps"`` only), zero
            on padding; with ``query_positions``, the kept rows ``[batch, layer, head, row, key_pos]``.
        pattern: forward attention, same shape (``keep="maps"`` only).
        prompts, targets: the strings given, if any.
        query_positions: ``None`` for whole maps, else the query position of each kept row
            ``[batch, row]`` (``-1`` where an example keeps fewer rows). The norms are then
            those of the kept rows, not of the whole maps.
        segments: ``None`` under the causal mask; else the segment id of each prompt token
            ``[batch, pos]`` (-1 after the prompt) the pass ran under (:mod:`tl_reversed.core.segments`).
    """

    norms: Float[Tensor, "batch layer head"]
    pattern_norms: Float[Tensor, "batch layer head"]
    loss: Float[Tensor, " batch"]
    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    str_tokens: list[list[str]]
    layers: list[int]
    maps: Float[Tensor, "batch layer head query_pos key_pos"] | None = None
    pattern: Float[Tensor, "batch layer head query_pos key_pos"] | None = None
    prompts: list[str] | None = None
    targets: list[str] | None = None
    scales: tuple[float, ...] = field(default=(), repr=False)
    query_positions: Int[Tensor, "batch row"] | None = None
    segments: Int[Tensor, "batch pos"] | None = None

    def __len__(self) -> int:
        return self.norms.shape[0]

    @property
    def n_heads(self) -> int:
        return self.norms.shape[2]

    def mean_norms(self) -> Float[Tensor, "layer head"]:
        """Mean over examples of each head's RA norm (the paper's head score)."""
        return self.norms.mean(0)

    def top_heads(self, k: int = 10) -> list[tuple[int, int]]:
        """The ``k`` heads with the largest mean RA norm, as ``(layer, head)``, largest first.

        ``k`` is a positive integer; a ``k`` beyond the number of heads gives all heads.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer (the number of heads to return), got {k!r}")
        scores = self.mean_norms()
        order = scores.flatten().argsort(descending=True)[:k]
        return [(self.layers[int(i) // self.n_heads], int(i) % self.n_heads) for i in order]

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not computed; this result has layers {self.layers}")
        return self.layers.index(layer)

    def _head_index(self, head: int) -> int:
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < self.n_heads:
            raise ValueError(f"head {head!r} out of range: the model has {self.n_heads} heads (0..{self.n_heads - 1})")
        return head

    def _example(self, example: int) -> int:
        if not -len(self) <= example < len(self):
            raise IndexError(f"example {example} out of range for {len(self)} examples")
        return example % len(self)

    def rows(self, example: int = 0) -> list[int]:
        """The query position of each row :meth:`head` returns (every position for whole maps)."""
        i = self._example(example)
        if self.query_positions is None:
            return list(range(int(self.lengths[i])))
        return [int(p) for p in self.query_positions[i] if p >= 0]

    def head(self, layer: int, head: int, example: int = 0) -> Float[Tensor, "query_pos key_pos"]:
        """RA map of one head for one example, trimmed to the example's real tokens.

        With ``query_positions``, the kept rows ``[row, key_pos]`` (positions in :meth:`rows`).
        """
        if self.maps is None:
            raise ValueError("this result kept only norms: call reversed_attention(..., keep='maps')")
        i = self._example(example)
        n = int(self.lengths[i])
        return self.maps[i, self._layer_index(layer), self._head_index(head), : len(self.rows(i)), :n]

    def head_pattern(self, layer: int, head: int, example: int = 0) -> Float[Tensor, "query_pos key_pos"]:
        """Forward attention of one head for one example, trimmed like :meth:`head`."""
        if self.pattern is None:
            raise ValueError("this result kept only norms: call reversed_attention(..., keep='maps')")
        i = self._example(example)
        n = int(self.lengths[i])
        return self.pattern[i, self._layer_index(layer), self._head_index(head), : len(self.rows(i)), :n]

    def describe_head(self, layer: int, head: int, example: int = 0, k: int = 3, min_share: float = 0.01) -> HeadDescription:
        """The query row that dominates a head's map and the keys it pushes up and down most.

        A descent step moves attention along ``-RA``: the most negative entries of the
        dominant row are the keys the step attends to more ("up"), the most positive the
        keys it attends to less ("down"). Entries smaller than ``min_share`` times the
        row's largest magnitude are left out (noise, not a push). With ``query_positions``
        the dominant row is chosen among the kept rows. Under a segment mask the keys after
        the query that its segment allows count like the ones before it.
        """
        ra = self.head(layer, head, example)
        tokens = self.str_tokens[self._example(example)]
        positions = self.rows(example)
        index = int(ra.norm(dim=-1).argmax())
        row = positions[index]
        values = ra[index]  # the whole row: a segment mask lets a query see later keys of its segment
        k = min(k, values.numel())  # keys the mask hides are exactly 0, below any floor
        up = values.argsort()[:k].tolist()
        down = values.argsort(descending=True)[:k].tolist()
        floor = min_share * float(values.abs().max())
        return HeadDescription(
            layer=layer,
            head=head,
            ra_norm=float(self.norms[self._example(example), self._layer_index(layer), head]),
            query_pos=row,
            query_token=tokens[row],
            pushed_up=[(tokens[j], float(values[j])) for j in up if values[j] < -floor],
            pushed_down=[(tokens[j], float(values[j])) for j in down if values[j] > floor],
        )

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (example, layer, head): RA norm and forward-attention norm."""
        n, n_layers, n_heads = self.norms.shape
        grid = torch.cartesian_prod(torch.arange(n), torch.arange(n_layers), torch.arange(n_heads))
        return pd.DataFrame(
            {
                "example": grid[:, 0].numpy(),
                "layer": [self.layers[i] for i in grid[:, 1].tolist()],
                "head": grid[:, 2].numpy(),
                "ra_norm": self.norms.flatten().numpy(),
                "fa_norm": self.pattern_norms.flatten().numpy(),
            }
        )

    def plot(self, **kwargs: object):
        """Layer x head heatmaps of forward-attention and RA norms (a matplotlib Figure)."""
        from tl_reversed.views.plotting import plot_norms

        return plot_norms(self, **kwargs)

    def to_html(self, path=None, heads=None, example=0, title=None) -> str:
        """An interactive, offline HTML page of chosen heads' maps, written to ``path`` when given.

        Returns the page as a string (see :func:`tl_reversed.views.html.to_html`).
        """
        from tl_reversed.views.html import to_html

        return to_html(self, path, heads=heads, example=example, title=title)

    def _repr_html_(self) -> str | None:
        """The :meth:`to_html` page, so a bare result in a notebook cell shows its maps inline."""
        return None if self.maps is None or self.pattern is None else self.to_html()


class RASink:
    """The pass-engine sink of Reversed Attention: each layer's RA, reduced inside the backward hook.

    Forward hooks keep ``hook_v`` and ``hook_pattern`` of the chosen layers; the backward
    hook on ``hook_z`` turns them and the gradient into RA (:func:`ra_from_parts`) and
    keeps the norms, and the maps with ``keep="maps"``, of the chunk; ``merge`` scatters
    them into the rows of the whole batch, ``finish`` returns a :class:`ReversedAttention`.

    ``rows`` (:func:`tl_reversed.core.rows.query_rows`) keeps only those query rows;
    ``gate(layer)``, when given, says whether the forward hooks of a layer keep its
    tensors now (the memory-bounded pass keeps them only while a block is recomputed).
    ``tiles``, when given, is the observer table of the tiled attention
    (:func:`tl_reversed.core.attention_seams.tiled_attention_on`): each chunk puts a
    :class:`~tl_reversed.core.rows.TileReducer` per layer there, which the attention's
    backward feeds with its pattern tiles, and no pattern or value is hooked at all.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: ModelSpec,
        layers: list[int],
        batch: Batch,
        keep: str,
        *,
        rows: Tensor | None = None,
        gate: Callable[[int], bool] | None = None,
        tiles: dict[int, TileReducer] | None = None,
    ):
        n, width = batch.tokens.shape
        self.model, self.spec, self.layers, self.batch, self.keep = model, spec, layers, batch, keep
        self.rows, self.gate, self.tiles = rows, gate, tiles  # each layer is reduced on its own device (a split model), gathered on the CPU
        self.dtype = accumulation_dtype(next(model.parameters()).dtype)
        self.norms = torch.zeros(n, len(layers), spec.n_heads, dtype=self.dtype)
        self.pattern_norms = torch.zeros_like(self.norms)
        shape = (n, len(layers), spec.n_heads, width if rows is None else rows.shape[1], width)
        self.maps = torch.zeros(shape, dtype=self.dtype) if keep == "maps" else None
        self.pattern = torch.zeros(shape, dtype=self.dtype) if keep == "maps" else None
        self.loss = torch.zeros(n, dtype=self.dtype)
        self._chunk: dict[str, Tensor] = {}

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        n, width = chunk.batch.tokens.shape
        lengths = chunk.batch.lengths
        rows = None if self.rows is None else self.rows[chunk.index]
        saved: dict[tuple[str, int], Tensor] = {}
        out = self._chunk = {
            "norms": torch.zeros(n, len(self.layers), self.spec.n_heads, dtype=self.dtype),
            "pattern_norms": torch.zeros(n, len(self.layers), self.spec.n_heads, dtype=self.dtype),
        }
        if self.keep == "maps":
            n_rows = width if rows is None else rows.shape[1]
            out["maps"] = torch.zeros(n, len(self.layers), self.spec.n_heads, n_rows, width, dtype=self.dtype)
            out["pattern"] = torch.zeros_like(out["maps"])

        def save(name: str, layer: int) -> Hook:
            def hook(x: Tensor, hook: object) -> None:
                if self.gate is None or self.gate(layer):
                    saved[(name, layer)] = x.detach()

            return attn_hook(layer, name), hook

        def on_grad(i: int, layer: int) -> Hook:
            def hook(grad: Tensor, hook: object) -> None:
                pattern = saved.pop(("pattern", layer))
                v = saved.pop(("v", layer))
                parts = reduce_layer(pattern, v, grad, self.spec.scales[layer], lengths, rows, "maps" in out)
                del pattern, v
                for name, value in parts.items():
                    out[name][:, i] = value

            return attn_hook(layer, "z"), hook

        if self.tiles is not None:
            return [], self._tile_reducers(lengths, rows, out)
        fwd = [save(name, layer) for layer in self.layers for name in ("v", "pattern")]
        bwd = [on_grad(i, layer) for i, layer in enumerate(self.layers)]
        return fwd, bwd

    def _tile_reducers(self, lengths: Tensor, rows: Tensor | None, out: dict[str, Tensor]) -> list[Hook]:
        """Put one reducer per layer in ``self.tiles``; the backward hooks on ``hook_z`` hand it the gradient there."""
        assert self.tiles is not None
        self.tiles.clear()

        def store(i: int) -> Callable[[dict[str, Tensor]], None]:
            def done(parts: dict[str, Tensor]) -> None:
                for name, value in parts.items():
                    out[name][:, i] = value

            return done

        def take(reducer: TileReducer) -> Callable[[Tensor, object], None]:
            return lambda grad, hook: reducer.take_grad(grad)

        for i, layer in enumerate(self.layers):
            self.tiles[layer] = TileReducer(lengths, rows, "maps" in out, self.spec.scales[layer], store(i))
        return [(attn_hook(layer, "z"), take(self.tiles[layer])) for layer in self.layers]

    def merge(self, chunk: Chunk) -> None:
        idx, out = chunk.index, self._chunk
        self.norms[idx], self.pattern_norms[idx] = out["norms"], out["pattern_norms"]
        if chunk.loss is not None:
            self.loss[idx] = chunk.loss.to(self.dtype)
        if self.maps is not None and self.pattern is not None:
            r, w = out["maps"].shape[-2:]
            self.maps[idx, :, :, :r, :w] = out["maps"]
            self.pattern[idx, :, :, :r, :w] = out["pattern"]
        self._chunk = {}

    def finish(self) -> ReversedAttention:
        batch = self.batch
        return ReversedAttention(
            norms=self.norms,
            pattern_norms=self.pattern_norms,
            loss=self.loss,
            tokens=batch.tokens,
            lengths=batch.lengths,
            str_tokens=str_tokens(self.model, batch),
            layers=self.layers,
            maps=self.maps,
            pattern=self.pattern,
            prompts=batch.prompts,
            targets=batch.target_strings,
            scales=self.spec.scales,
            query_positions=self.rows,
        )


def reversed_attention(
    model: torch.nn.Module,
    prompts: PromptsLike,
    targets: TargetsLike = None,
    *,
    metric: Metric | None = None,
    layers: Sequence[int] | int | None = None,
    keep: Keep = "maps",
    batch_size: int | None = 16,
    progress: bool | None = None,
    extra_hooks: Sequence = (),
    memory_check: bool = True,
    query_positions: QueryPositions = None,
    path: RAPath = "auto",
    segments: Tensor | None = None,
) -> ReversedAttention:
    """Reversed Attention of every head for prompts and targets.

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        prompts: a string, a list of strings, or a token tensor ``[batch, pos]``.
        targets: one string per prompt whose tokens follow it (e.g. ``" Paris"``). The loss
            is the target cross-entropy, teacher-forced, summed over target tokens, per example.
        metric: instead of targets, any callable ``(logits, tokens) -> [batch]`` loss
            (e.g. a logit difference ``lambda logits, tokens: logits[:, -1, a] - logits[:, -1, b]``). Rows of one length are
            batched together so the metric sees no padding.
        layers: the layers to compute (default all).
        keep: ``"maps"`` keeps every map; ``"norms"`` keeps ``[batch, layer, head]`` only.
        batch_size: examples per forward/backward pass (``None``: all at once).
        progress: show a progress bar over the batches (``None``: when there is more than
            one; see :mod:`tl_reversed.core.options`).
        extra_hooks: forward hooks that stay on during the pass, e.g. an attention patch.
        memory_check: estimate the peak memory first (:mod:`tl_reversed.core.memory`) and raise
            :class:`~tl_reversed.core.memory.WouldRunOutOfMemory` before any pass where it exceeds
            the memory available; ``False`` skips the check (the estimate is within ~30%).
        query_positions: ``None`` keeps whole maps; ``"last"`` (the last prompt token),
            ``"targets"`` (the positions that predict the target tokens) or a list of
            positions keeps only those query rows: maps ``[batch, layer, head, row, key_pos]``
            and norms of the kept rows (see :mod:`tl_reversed.core.rows`).
        path: ``"standard"`` runs the model's own pass (every layer's pattern kept for the
            backward); ``"bounded"`` checkpoints every block, computes attention in query
            tiles and reduces RA from the tiles of the attention's backward, so no layer's
            ``[T, T]`` pattern exists (:mod:`tl_reversed.core.bounded`; models whose attention
            cannot be tiled keep one layer's pattern at a time). There ``hook_pattern`` and
            ``hook_attn_scores`` never fire, and ``extra_hooks`` on them raise ``ValueError``;
            ``hook_q``, ``hook_k``, ``hook_v``, ``hook_rot_q``/``hook_rot_k`` and ``hook_z``
            fire as usual. ``"auto"`` (default) takes the bounded path
            for norms or query rows when the patterns the standard pass would keep exceed
            1 GiB (:data:`tl_reversed.core.bounded.BOUNDED_ABOVE_BYTES`; per model:
            :func:`tl_reversed.core.paths.bounded_above`). Both give the same RA.
        segments: run under a segment mask (MAS, :mod:`tl_reversed.core.segments`): one id per
            prompt token, ``[pos]`` or ``[batch, pos]`` right-padded with -1 (from ``tokenize_pieces``
            / ``tokenize_batch``; pass their tokens as ``prompts``, padding is dropped). Target tokens attend causally.
            RA is then non-zero in the allowed blocks above the diagonal. Standard path only.

    Returns:
        A :class:`ReversedAttention` result.
    """
    spec = describe(model)
    chosen = check_layers(layers, spec)
    check_option("keep", keep, KEEP)
    check_option("path", path, RA_PATHS)
    prompts = prompts if segments is None else unpad(prompts, segments)  # padded rows of tokenize_batch
    batch = tokenize(model, prompts, targets, spec, need_targets=metric is None, metric=metric is not None)
    rows = query_rows(query_positions, batch)
    if segments is not None:
        if path == "bounded":
            raise ValueError("path='bounded' does not run under a segment mask: use path='standard' (or 'auto')")
        path, seg = "standard", SegmentSink(run_ids(prompt_ids(segments, batch), batch.lengths))
    chosen_path = resolve_path(model, spec, batch, path=path, keep=keep, query_positions=query_positions,
                               batch_size=batch_size)  # fmt: skip
    if chosen_path == "standard":
        if memory.enabled(memory_check):
            parts = batch.chunks(batch_size, same_length=metric is not None)
            memory.check_pass(model, batch, parts, what="reversed_attention", keep=keep, kept_layers=len(chosen),
                              full_logits=metric is not None)  # fmt: skip
        sink = RASink(model, spec, chosen, batch, keep, rows=rows)
        if segments is None:
            run(model, batch, [sink], metric=metric, batch_size=batch_size, extra_hooks=extra_hooks,
                progress=progress, desc="reversed attention")  # fmt: skip
            return sink.finish()
        with masked_by(model, seg.current):
            run(model, batch, [seg, sink], metric=metric, batch_size=batch_size, extra_hooks=extra_hooks,
                progress=progress, desc="reversed attention")  # fmt: skip
        result = sink.finish()
        result.segments = prompt_ids(segments, batch).cpu()
        return result
    # the bounded path keeps one layer's activations at a time: the standard estimate does not apply
    with untouched(model):  # the pass runs in eval mode: decide the tiles in eval terms (no attention dropout)
        tiled = tiled_unsupported(model) is None
        if tiled:
            refuse_whole_pattern_hooks(model, extra_hooks)
        tiles: dict[int, TileReducer] = {}
        with pass_for(model, "bounded") as gate, tiled_attention_on(model, tiles) if tiled else nullcontext():
            sink = RASink(model, spec, chosen, batch, keep, rows=rows, gate=gate, tiles=tiles if tiled else None)
            run(model, batch, [sink], metric=metric, batch_size=batch_size, extra_hooks=extra_hooks,
                progress=progress, desc="reversed attention")  # fmt: skip
    return sink.finish()


def str_tokens(model: object, batch: Batch) -> list[list[str]]:
    """Each row's real tokens as strings (no padding)."""
    return [
        list(model.to_str_tokens(batch.tokens[i, : int(n)]))  # type: ignore[attr-defined]
        for i, n in enumerate(batch.lengths)
    ]
