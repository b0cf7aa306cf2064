"""Attention patches: averaged RA (or forward-attention) maps and the hooks that add them.

Part of :mod:`tl_reversed.experiments.attention_patching` (which re-exports every name
here and holds the learning-rate sweep and the iterative loop): :func:`average_maps`
averages the maps of training prompts of one length in one pass of the engine (the
:class:`MeanMaps` sink); :func:`attention_patch_hooks` and :func:`attention_patch`
add ``lr * maps`` to every head's attention, at ``hook_z`` (exact on every
architecture) or at ``hook_pattern``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import einops
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_reversed.core.architecture import Model, ModelSpec, attn_hook, describe, repeat_kv
from tl_reversed.core.checks import finite_float
from tl_reversed.core.options import PATCH_POINTS, SOURCES, PatchPoint, Source, check_option
from tl_reversed.core.results import Result
from tl_reversed.core.engine import Chunk, Hook, model_device, run
from tl_reversed.core.inputs import Batch
from tl_reversed.core.reversed_attention import RASink
from tl_reversed.experiments.evaluation import prompt_batch


GROUP_HINT = (
    "group prompts by length with tl_reversed.experiments.tasks.same_length_groups(model, examples, min_size=...) "
    "and use one group"
)


@dataclass
class AttentionMaps(Result):
    """Attention-shaped maps averaged over prompts of one length.

    Attributes:
        maps: ``[layer, head, query_pos, key_pos]`` mean RA (``source="ra"``) or mean
            forward attention (``source="fa"``).
        source: ``"ra"`` or ``"fa"``.
        length: the prompts' token length (the size of the last two axes).
        n_examples: number of prompts averaged.
        loss: mean loss of the prompts' first target token (under ``extra_hooks``, if any).
    """

    maps: Float[Tensor, "layer head query_pos key_pos"]
    source: str
    length: int
    n_examples: int
    loss: float

    def norms(self) -> Float[Tensor, "layer head"]:
        """Frobenius norm of each head's averaged map."""
        return self.maps.flatten(-2).norm(dim=-1)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per head: layer, head and the norm of its averaged map."""
        return head_norm_frame(self.norms(), self.source)

    def plot(self, layer: int | None = None, head: int | None = None, ax=None):
        """The averaged map of one head (default: the largest), or its norms heatmap; a Figure."""
        from tl_reversed.views.plotting import figure_and_axes

        norms = self.norms()
        if layer is None or head is None:
            flat = int(norms.flatten().argmax())
            layer, head = flat // norms.shape[1], flat % norms.shape[1]
        fig, ax = figure_and_axes(ax, (4.5, 4))
        grid = self.maps[layer, head].float().numpy()
        bound = float(abs(grid).max()) or 1.0
        image = ax.imshow(grid, cmap="RdBu_r" if self.source == "ra" else "viridis", vmin=-bound if self.source == "ra" else 0, vmax=bound)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        ax.set_title(f"mean {self.source.upper()} L{layer}H{head} ({self.n_examples} prompts)")
        fig.colorbar(image, ax=ax, shrink=0.8)
        return fig


def length_counts(batch: Batch) -> str:
    counts = Counter(batch.lengths.tolist())
    return ", ".join(f"{n} prompts of {length}" for length, n in sorted(counts.items()))


def single_length(batch: Batch, what: str) -> int:
    length = batch.single_length()
    if length is None:
        raise ValueError(f"{what} need one token length, got {length_counts(batch)}: {GROUP_HINT}")
    return length


def average_maps(
    model: Model,
    train_examples: object,
    source: Source = "ra",
    *,
    batch_size: int | None = 16,
    progress: bool | None = None,
    extra_hooks: Sequence[Hook] = (),
) -> AttentionMaps:
    """Average RA maps (or forward attention) over training prompts of one length.

    Each prompt's RA is the gradient of its own loss (per example, never a batch
    average), computed by :func:`tl_reversed.core.reversed_attention`; the maps are then
    averaged over the prompts. The loss is the cross-entropy of the first target token
    at the last prompt token (for one-token targets, the full target loss), so the maps
    cover the prompt positions only.

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        train_examples: an ``ExampleSet``, a list of ``Example`` or ``(prompts, targets)``,
            all of one token length (see :func:`tl_reversed.experiments.tasks.same_length_groups`).
        source: ``"ra"`` or ``"fa"`` (forward attention).
        batch_size: prompts per forward/backward pass.
        progress: show a progress bar over the batches (``None``: when there is more than
            one; see :mod:`tl_reversed.core.options`).
        extra_hooks: forward hooks kept on during the pass (e.g. a current attention patch).
    """
    check_option("source", source, SOURCES)
    spec = describe(model)
    return mean_maps(model, spec, prompt_batch(model, train_examples, spec), source, batch_size, progress, extra_hooks)


def mean_maps(
    model: Model,
    spec: ModelSpec,
    batch: Batch,
    source: Source,
    batch_size: int | None,
    progress: bool | None,
    extra_hooks: Sequence[Hook] = (),
) -> AttentionMaps:
    """:func:`average_maps` of a prompt-only batch, for a model already described (``spec``)."""
    check_option("source", source, SOURCES)
    length = single_length(batch, "average_maps: the training prompts")
    sink = MeanMaps(model, spec, source, length)
    run(model, batch, [sink], metric=sink.metric, batch_size=batch_size, extra_hooks=extra_hooks,
        progress=progress, desc=f"mean {source.upper()} maps")  # fmt: skip
    return sink.finish()


class MeanMaps:
    """The pass-engine sink of :func:`average_maps`: each chunk's RA (or forward) maps, summed.

    Each chunk's maps come from an :class:`~tl_reversed.core.reversed_attention.RASink`
    of that chunk alone (so only one chunk's maps are held at a time); ``metric`` is the
    cross-entropy of each row's first target token at the last prompt token.
    """

    def __init__(self, model: Model, spec: ModelSpec, source: str, length: int):
        self.model, self.spec, self.source, self.length = model, spec, source, length
        self.total = torch.zeros(spec.n_layers, spec.n_heads, length, length)
        self.loss, self.n = 0.0, 0
        self._ra: RASink | None = None

    def metric(self, logits: Tensor, tokens: Tensor) -> Tensor:
        assert self._ra is not None
        return first_token_loss(self._ra.batch, logits)

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        self._ra = RASink(self.model, self.spec, list(range(self.spec.n_layers)), chunk.batch, "maps")
        return self._ra.hooks(chunk)

    def merge(self, chunk: Chunk) -> None:
        assert self._ra is not None and chunk.loss is not None
        ra = self._ra
        ra.merge(Chunk(torch.arange(len(chunk.batch)), chunk.batch, chunk.loss))
        maps = ra.maps if self.source == "ra" else ra.pattern
        self.total += maps.sum(0)  # type: ignore[union-attr]
        self.loss += float(ra.loss.sum())
        self.n += len(chunk.batch)
        self._ra = None

    def finish(self) -> AttentionMaps:
        return AttentionMaps(self.total / self.n, self.source, self.length, self.n, self.loss / self.n)


def first_token_loss(batch: Batch, logits: Tensor) -> Tensor:
    """Cross-entropy of each row's first target token at its last prompt token (``batch.last``)."""
    rows = logits[torch.arange(len(batch)), batch.last.to(logits.device)].float().log_softmax(-1)
    return -rows.gather(-1, batch.target.to(logits.device)[:, None])[:, 0]


def _as_tensor(maps: object) -> Float[Tensor, "layer head query_pos key_pos"]:
    tensor = maps.maps if isinstance(maps, AttentionMaps) else maps
    if not isinstance(tensor, Tensor) or tensor.ndim != 4:
        raise TypeError(
            "maps must be an AttentionMaps (from average_maps) or a tensor [layer, head, query_pos, key_pos], "
            f"got {type(maps).__name__}"
        )
    return tensor


def _check_maps(tensor: Tensor, spec: ModelSpec) -> None:
    if tensor.shape[:2] != (spec.n_layers, spec.n_heads) or tensor.shape[2] != tensor.shape[3]:
        raise ValueError(
            f"maps must have shape [layer, head, pos, pos] with layer={spec.n_layers}, head={spec.n_heads}; "
            f"got {tuple(tensor.shape)}"
        )


def _length_error(actual: int, expected: int) -> ValueError:
    return ValueError(
        f"the attention patch was averaged over prompts of {expected} tokens, but the model is reading "
        f"{actual} tokens: patch only prompts of {expected} tokens ({GROUP_HINT})"
    )


def head_mask(norms: Float[Tensor, "layer head"], heads: object = None, top_k: float | None = None) -> Tensor | None:
    """Which heads a sparse patch keeps: ``[layer, head]`` booleans, or None for every head.

    ``heads``: ``[(layer, head), ...]``; ``top_k``: a fraction of all heads in (0, 1]
    (a float, at least one head) or a number of heads (an int), the largest by ``norms``.
    """
    if heads is not None and top_k is not None:
        raise ValueError("give heads=[(layer, head), ...] or top_k=..., not both")
    n_layers, n_heads = norms.shape
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    if heads is not None:
        for layer, head in heads:  # type: ignore[attr-defined]
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise ValueError(f"head ({layer}, {head}) is outside the model's {n_layers} layers x {n_heads} heads")
            mask[layer, head] = True
        return mask
    if top_k is None:
        return None
    total = n_layers * n_heads
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or top_k <= 0 or (isinstance(top_k, float) and top_k > 1):
        raise ValueError(f"top_k must be a fraction in (0, 1] (a float) or a number of heads (an int >= 1), got {top_k!r}")
    k = min(int(top_k), total) if isinstance(top_k, int) else max(1, round(top_k * total))
    mask.view(-1)[norms.flatten().topk(k).indices] = True
    return mask


def attention_patch_hooks(
    model: Model,
    maps: object,
    lr: float,
    *,
    at: PatchPoint = "z",
    heads: object = None,
    top_k: float | None = None,
) -> list[Hook]:
    """The attention patch ``pattern += lr * maps`` as ``(hook_name, fn)`` forward hooks.

    Pass them to ``model.run_with_hooks(..., fwd_hooks=...)`` or ``model.hooks(...)``
    beside your own hooks. Sequences must have exactly the maps' length.

    Args:
        model: the model the hooks are for.
        maps: an :class:`AttentionMaps` or a ``[layer, head, query_pos, key_pos]`` tensor.
        lr: the factor (the paper: -30 for RA, +1 for forward attention).
        at: ``"z"`` (default, every architecture): add ``einsum(lr * maps, V)`` at
            ``hook_z``, with ``V`` from ``hook_v`` of the same layer and forward pass;
            ``"pattern"``: add ``lr * maps`` at ``hook_pattern`` (only where the bridge
            computes attention itself).
        heads, top_k: patch only these heads (``[(layer, head), ...]``) or the top ``k``
            by map norm (a fraction in (0, 1] or a number of heads); see :func:`head_mask`.
    """
    return patch_hooks(describe(model), model_device(model), maps, lr, at=at, heads=heads, top_k=top_k)


def patch_hooks(spec: ModelSpec, device: torch.device, maps: object, lr: float, *, at: PatchPoint = "z",
                heads: object = None, top_k: float | None = None) -> list[Hook]:  # fmt: skip
    """:func:`attention_patch_hooks` for a model already described (``spec``) on ``device``."""
    check_option("at", at, PATCH_POINTS)
    tensor = _as_tensor(maps)
    _check_maps(tensor, spec)
    delta = finite_float(lr, "lr") * tensor.detach().float()
    mask = head_mask(delta.flatten(-2).norm(dim=-1), heads, top_k)
    if mask is not None:
        delta = delta * mask[:, :, None, None]
    delta = delta.to(device)
    if at == "pattern":
        if not spec.pattern_editable:
            raise ValueError(
                "this model's bridge hands attention to the Hugging Face module, which discards edits to "
                "hook_pattern: use at='z' (exact on every architecture)"
            )
        return [(attn_hook(layer, "pattern"), _add_to_pattern(delta[layer])) for layer in range(spec.n_layers)]
    hooks: list[Hook] = []
    for layer in range(spec.n_layers):
        stash: dict[str, Tensor] = {}
        hooks.append((attn_hook(layer, "v"), stash_v(stash)))
        hooks.append((attn_hook(layer, "z"), _add_at_z(delta[layer], stash, spec.n_heads)))
    return hooks


def _add_to_pattern(delta: Float[Tensor, "head query_pos key_pos"]):
    def hook(pattern: Float[Tensor, "batch head query_pos key_pos"], hook: object) -> Tensor:
        if pattern.shape[-1] != delta.shape[-1]:
            raise _length_error(pattern.shape[-1], delta.shape[-1])
        return pattern + delta.to(pattern.device, pattern.dtype)[None]  # each layer's device (split models)

    return hook


def head_norm_frame(norms: Float[Tensor, "layer head"], source: str) -> pd.DataFrame:
    """One row per head of a patch: ``layer, head, norm, source``."""
    rows = [(layer, head, float(norms[layer, head])) for layer in range(norms.shape[0]) for head in range(norms.shape[1])]
    return pd.DataFrame(rows, columns=["layer", "head", "norm"]).assign(source=source)


def stash_v(stash: dict[str, Tensor]):
    """A ``hook_v`` hook that keeps the values for the same layer's ``hook_z`` patch."""

    def hook(v: Float[Tensor, "batch key_pos kv_head d_head"], hook: object) -> None:
        stash["v"] = v

    return hook


def _add_at_z(delta: Float[Tensor, "head query_pos key_pos"], stash: dict[str, Tensor], n_heads: int):
    def hook(z: Float[Tensor, "batch query_pos head d_head"], hook: object) -> Tensor:
        v = stash.pop("v", None)
        if v is None:
            raise RuntimeError("hook_v did not fire before hook_z in this layer: the patch at hook_z cannot see the values")
        if z.shape[1] != delta.shape[-1]:
            raise _length_error(z.shape[1], delta.shape[-1])
        values = repeat_kv(v, n_heads)
        shift = einops.einsum(delta.to(values.device, values.dtype), values, "head q k, batch k head d -> batch q head d")
        return z + shift.to(z.dtype)

    return hook


@contextmanager
def attention_patch(model: Model, maps: object, lr: float | None = None, *, at: PatchPoint = "z", prompts: object = None,
                    heads: object = None, top_k: float | None = None) -> Iterator[Model]:  # fmt: skip
    """Context manager: inside it, every head's attention is ``pattern + lr * maps``.

    ``maps`` may also be a :class:`~tl_reversed.experiments.structured_patch.StructuredPatch`
    (any prompt length): give the ``prompts`` the model will read (right-padded);
    ``lr`` then defaults to the patch's own.

    >>> maps = average_maps(model, train_group)            # doctest: +SKIP
    >>> with attention_patch(model, maps, lr=-30):         # doctest: +SKIP
    ...     logits = model(test_tokens)
    """
    if hasattr(maps, "cell_ids"):  # a StructuredPatch (imported lazily: it builds on this module)
        if prompts is None:
            raise TypeError("a StructuredPatch is laid out per prompt: pass prompts=[...] (the prompts the model will read)")
        hooks = maps.hooks(model, prompts, lr=lr, heads=heads, top_k=top_k)  # type: ignore[attr-defined]
    else:
        if lr is None:
            raise TypeError("attention_patch(model, maps, lr): give the lr (the paper: -30 for RA, +1 for forward attention)")
        hooks = attention_patch_hooks(model, maps, lr, at=at, heads=heads, top_k=top_k)
    with model.hooks(fwd_hooks=hooks):  # type: ignore[operator]
        yield model
