"""Attention patching: steer a model by adding averaged RA maps to its attention.

The paper's recipe (Katz & Wolf, NAACL 2025, section 6): average the RA maps of
training prompts of one token length (each prompt's own target loss, not a batch
average), then add ``lr * mean_RA`` to the post-softmax attention of every head, with
no renormalisation, while the model reads test prompts of that same length. RA is
the gradient of the loss with respect to the attention scores, so a negative ``lr``
is a descent step (the paper uses lr = -30 for RA and +1 for the forward-attention
baseline, untuned).

The patch is applied at ``hook_z``: a head's output is ``z = A @ V``, so adding
``delta`` to ``A`` adds ``delta @ V`` to ``z``. The values come from ``hook_v`` of the
same layer, which fires earlier in the same forward pass. This is exact, and works
on every architecture, including those where the bridge hands attention to the
Hugging Face module and discards edits to ``hook_pattern``
(``attention_patch_hooks(..., at="pattern")`` gives the plain pattern hook where it
is live).

:func:`iterative_patching` repeats the step: it recomputes RA with the current patch
applied and adds ``lr * RA`` again. Because the patch sits at ``hook_z``, the
observed ``hook_pattern`` stays the softmax output, so the recomputed RA is the exact
gradient with respect to the attention scores of the patched model.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import einops
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_reversed.core.architecture import ModelSpec, attn_hook, describe, repeat_kv
from tl_reversed.core.engine import Hook
from tl_reversed.core.inputs import Batch
from tl_reversed.experiments.evaluation import accuracy, last_logits, prompt_batch
from tl_reversed.core.state import untouched

PAPER_LRS = (3, 2, 1, 0.5, 0, -0.1, -0.5, -1, -2, -4, -6, -8, -10, -15, -20, -25, -30, -35, -40, -60, -80, -100, -120)
"""The paper's learning-rate sweep."""

PAPER_LR = {"ra": -30.0, "fa": 1.0}
"""The untuned learning rates the paper reports for each source."""

SOURCES = ("ra", "fa")
PATCH_POINTS = ("z", "pattern")

_GROUP_HINT = (
    "group prompts by length with tl_reversed.experiments.tasks.same_length_groups(model, examples, min_size=...) "
    "and use one group"
)


@dataclass
class AttentionMaps:
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
        norms = self.norms()
        rows = [(layer, head, float(norms[layer, head])) for layer in range(norms.shape[0]) for head in range(norms.shape[1])]
        return pd.DataFrame(rows, columns=["layer", "head", "norm"]).assign(source=self.source)

    def plot(self, layer: int | None = None, head: int | None = None, ax=None):
        """The averaged map of one head (default: the largest), or its norms heatmap; a Figure."""
        from tl_reversed.views.plotting import _figure_and_axes

        norms = self.norms()
        if layer is None or head is None:
            flat = int(norms.flatten().argmax())
            layer, head = flat // norms.shape[1], flat % norms.shape[1]
        fig, ax = _figure_and_axes(ax, (4.5, 4))
        grid = self.maps[layer, head].float().numpy()
        bound = float(abs(grid).max()) or 1.0
        image = ax.imshow(grid, cmap="RdBu_r" if self.source == "ra" else "viridis", vmin=-bound if self.source == "ra" else 0, vmax=bound)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        ax.set_title(f"mean {self.source.upper()} L{layer}H{head} ({self.n_examples} prompts)")
        fig.colorbar(image, ax=ax, shrink=0.8)
        return fig


def _length_counts(batch: Batch) -> str:
    counts = Counter(batch.lengths.tolist())
    return ", ".join(f"{n} prompts of {length}" for length, n in sorted(counts.items()))


def _single_length(batch: Batch, what: str) -> int:
    length = batch.single_length()
    if length is None:
        raise ValueError(f"{what} need one token length, got {_length_counts(batch)}: {_GROUP_HINT}")
    return length


def average_maps(
    model: torch.nn.Module,
    train_examples: object,
    source: str = "ra",
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
        progress: show a progress bar (default: when there is more than one batch).
        extra_hooks: forward hooks kept on during the pass (e.g. a current attention patch).
    """
    from tl_reversed.core.reversed_attention import reversed_attention

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    batch = prompt_batch(model, train_examples)
    length = _single_length(batch, "average_maps: the training prompts")
    spec = describe(model)
    total = torch.zeros(spec.n_layers, spec.n_heads, length, length)
    loss = 0.0
    parts = batch.chunks(batch_size)
    show = len(parts) > 1 if progress is None else progress
    for index in tqdm(parts, desc=f"mean {source.upper()} maps", disable=not show, leave=False):
        sub = batch.rows(index)
        result = reversed_attention(
            model,
            sub.tokens,
            metric=_first_token_loss(sub.target),
            keep="maps",
            batch_size=None,
            progress=False,
            extra_hooks=extra_hooks,
        )
        maps = result.maps if source == "ra" else result.pattern
        total += maps.sum(0)  # type: ignore[union-attr]
        loss += float(result.loss.sum())
    n = len(batch)
    return AttentionMaps(total / n, source, length, n, loss / n)


def _first_token_loss(target: Tensor):
    """Metric: cross-entropy of each row's first target token at the last prompt token."""

    def metric(logits: Tensor, tokens: Tensor) -> Tensor:
        logprobs = logits[:, -1].float().log_softmax(-1)
        return -logprobs.gather(-1, target.to(logits.device)[:, None])[:, 0]

    return metric


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
        f"{actual} tokens: patch only prompts of {expected} tokens ({_GROUP_HINT})"
    )


def attention_patch_hooks(
    model: torch.nn.Module,
    maps: object,
    lr: float,
    *,
    at: str = "z",
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
    """
    if at not in PATCH_POINTS:
        raise ValueError(f"at must be one of {PATCH_POINTS}, got {at!r}")
    spec = describe(model)
    tensor = _as_tensor(maps)
    _check_maps(tensor, spec)
    delta = (float(lr) * tensor.detach().float()).to(next(model.parameters()).device)
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
        hooks.append((attn_hook(layer, "v"), _stash_v(stash)))
        hooks.append((attn_hook(layer, "z"), _add_at_z(delta[layer], stash, spec.n_heads)))
    return hooks


def _add_to_pattern(delta: Float[Tensor, "head query_pos key_pos"]):
    def hook(pattern: Float[Tensor, "batch head query_pos key_pos"], hook: object) -> Tensor:
        if pattern.shape[-1] != delta.shape[-1]:
            raise _length_error(pattern.shape[-1], delta.shape[-1])
        return pattern + delta.to(pattern.dtype)[None]

    return hook


def _stash_v(stash: dict[str, Tensor]):
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
        shift = einops.einsum(delta.to(values.dtype), values, "head q k, batch k head d -> batch q head d")
        return z + shift.to(z.dtype)

    return hook


@contextmanager
def attention_patch(model: torch.nn.Module, maps: object, lr: float, *, at: str = "z") -> Iterator[torch.nn.Module]:
    """Context manager: inside it, every head's attention is ``pattern + lr * maps``.

    >>> maps = average_maps(model, train_group)            # doctest: +SKIP
    >>> with attention_patch(model, maps, lr=-30):         # doctest: +SKIP
    ...     logits = model(test_tokens)
    """
    with model.hooks(fwd_hooks=attention_patch_hooks(model, maps, lr, at=at)):  # type: ignore[operator]
        yield model


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def _test_batch(model, test: object, length: int) -> Batch:
    batch = prompt_batch(model, test)
    bad = (batch.lengths != length).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"the maps were averaged over prompts of {length} tokens, but {len(bad)} test prompts have another "
            f"length (test prompt {bad[0]} has {int(batch.lengths[bad[0]])} tokens; the test set has "
            f"{_length_counts(batch)}): {_GROUP_HINT}"
        )
    return batch


@dataclass
class PatchingSweep:
    """Test accuracy for each learning rate of an attention patch.

    Attributes:
        source: ``"ra"`` or ``"fa"``.
        lrs: the learning rates.
        accuracy: test top-1 accuracy of the first target token at each lr.
        original: accuracy without any patch.
        length, n_train, n_test: prompt length and set sizes.
        seconds: wall time (maps and sweep).
    """

    source: str
    lrs: list[float]
    accuracy: list[float]
    original: float
    length: int
    n_train: int
    n_test: int
    seconds: float = 0.0
    maps: AttentionMaps | None = field(default=None, repr=False)

    def at(self, lr: float) -> float:
        """Accuracy at one of the swept learning rates."""
        if float(lr) not in self.lrs:
            raise ValueError(f"lr {lr} was not swept; the sweep has {self.lrs}")
        return self.accuracy[self.lrs.index(float(lr))]

    def best(self) -> tuple[float, float]:
        """``(lr, accuracy)`` of the best learning rate (see :func:`best_lr`)."""
        return best_lr(self.lrs, self.accuracy)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per learning rate."""
        return pd.DataFrame({"source": self.source, "lr": self.lrs, "accuracy": self.accuracy})

    def plot(self, ax=None, **kwargs):
        """Accuracy against lr (symmetric-log axis); returns the matplotlib Figure."""
        from tl_reversed.views.plotting import _figure_and_axes

        fig, ax = _figure_and_axes(ax, (5, 3.5))
        ax.plot(self.lrs, self.accuracy, marker="o", label=f"{self.source.upper()} patch", **kwargs)
        ax.axhline(self.original, color="grey", linestyle=":", label="no patch")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("lr")
        ax.set_ylabel("top-1 accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize="small")
        return fig


def best_lr(lrs: Sequence[float], accuracy: Sequence[float]) -> tuple[float, float]:
    """``(lr, accuracy)`` of the best learning rate of a sweep (on ties, the one closest to 0, then the first)."""
    i = max(range(len(lrs)), key=lambda j: (accuracy[j], -abs(lrs[j]), -j))
    return lrs[i], accuracy[i]


def evaluate_patching(
    model: torch.nn.Module,
    train: object,
    test: object,
    source: str = "ra",
    lrs: Sequence[float] = PAPER_LRS,
    *,
    maps: AttentionMaps | None = None,
    batch_size: int | None = 16,
    progress: bool | None = None,
) -> PatchingSweep:
    """Test accuracy with the averaged ``source`` maps of ``train`` patched in at each lr.

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        train: training examples of one token length (see :func:`average_maps`).
        test: test examples of the same length.
        source: ``"ra"`` or ``"fa"``.
        lrs: learning rates to try (default: the paper's sweep, :data:`PAPER_LRS`).
        maps: precomputed :func:`average_maps` of ``train`` (skips recomputing them).
        batch_size: prompts per forward pass.
        progress: show a progress bar over the sweep (default on).
    """
    start = time.perf_counter()
    if maps is None:
        maps = average_maps(model, train, source, batch_size=batch_size, progress=progress)
    elif maps.source != source:
        raise ValueError(f"maps were made from {maps.source!r} but source={source!r}")
    batch = _test_batch(model, test, maps.length)
    values = [float(lr) for lr in lrs]
    with untouched(model):
        original = accuracy(model, batch, batch_size=batch_size)
        results = []
        for lr in tqdm(values, desc=f"{source.upper()} lr sweep", disable=progress is False, leave=False):
            hooks = attention_patch_hooks(model, maps, lr) if lr != 0 else []
            results.append(original if lr == 0 else accuracy(model, batch, hooks, batch_size=batch_size))
    return PatchingSweep(
        source=source,
        lrs=values,
        accuracy=results,
        original=original,
        length=maps.length,
        n_train=maps.n_examples,
        n_test=len(batch),
        seconds=time.perf_counter() - start,
        maps=maps,
    )


def train_loss(model: torch.nn.Module, examples: object, hooks: Sequence[Hook] = (), *, batch_size: int | None = 16) -> float:
    """Mean cross-entropy of the first target token at the last prompt token, with ``hooks`` on."""
    batch = prompt_batch(model, examples)
    with untouched(model):
        logprobs = last_logits(model, batch, hooks, batch_size=batch_size).log_softmax(-1)
    return float(-logprobs.gather(-1, batch.target[:, None]).mean())


@dataclass
class IterativePatching:
    """Accuracy after each step of iterative RA patching.

    Attributes:
        lr: the learning rate of every step.
        accuracy: test accuracy after step ``0`` (no patch), ``1``, ..., ``steps``.
        train_loss: mean training loss under the patch of step ``0``, ``1``, ...
            (``train_loss[s]`` is the loss RA was computed with at step ``s + 1``;
            the last entry is the loss under the final patch).
        patch: the final patch ``[layer, head, query_pos, key_pos]`` (apply it with
            ``attention_patch(model, result.patch, lr=1)``).
        length, n_train, n_test: prompt length and set sizes.
        seconds: wall time.
    """

    lr: float
    accuracy: list[float]
    train_loss: list[float]
    patch: Float[Tensor, "layer head query_pos key_pos"]
    length: int
    n_train: int
    n_test: int
    seconds: float = 0.0

    @property
    def steps(self) -> list[int]:
        return list(range(len(self.accuracy)))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per step: step, test accuracy, training loss."""
        return pd.DataFrame({"step": self.steps, "lr": self.lr, "accuracy": self.accuracy, "train_loss": self.train_loss})

    def plot(self, ax=None, **kwargs):
        """Test accuracy after each step; returns the matplotlib Figure."""
        from tl_reversed.views.plotting import _figure_and_axes

        fig, ax = _figure_and_axes(ax, (5, 3.5))
        ax.plot(self.steps, self.accuracy, marker="o", label=f"iterative RA, lr {self.lr:g}", **kwargs)
        ax.set_xlabel("step")
        ax.set_ylabel("top-1 accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize="small")
        return fig


def iterative_patching(
    model: torch.nn.Module,
    train: object,
    test: object,
    lr: float = -10.0,
    steps: int = 5,
    *,
    batch_size: int | None = 16,
    progress: bool | None = None,
) -> IterativePatching:
    """Repeat RA patching: recompute RA under the current patch, add ``lr * RA``, ``steps`` times.

    Step 1 is exactly one-shot patching (``evaluate_patching(..., lrs=[lr])``). Each
    later step computes the training prompts' RA with the accumulated patch applied
    (at ``hook_z``, so RA stays the exact gradient of the patched model) and adds
    ``lr * RA`` to it. Test accuracy is measured after every step.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    start = time.perf_counter()
    spec = describe(model)
    length = _single_length(prompt_batch(model, train), "iterative_patching: the training prompts")
    batch = _test_batch(model, test, length)
    patch = torch.zeros(spec.n_layers, spec.n_heads, length, length)
    accuracies, losses = [], []
    with untouched(model):
        accuracies.append(accuracy(model, batch, batch_size=batch_size))
    for _ in tqdm(range(steps), desc=f"iterative RA, lr {lr:g}", disable=progress is False, leave=False):
        current = attention_patch_hooks(model, patch, 1.0) if bool(patch.any()) else []
        maps = average_maps(model, train, "ra", batch_size=batch_size, progress=False, extra_hooks=current)
        losses.append(maps.loss)
        patch = patch + float(lr) * maps.maps
        with untouched(model):
            accuracies.append(accuracy(model, batch, attention_patch_hooks(model, patch, 1.0), batch_size=batch_size))
    losses.append(train_loss(model, train, attention_patch_hooks(model, patch, 1.0), batch_size=batch_size))
    return IterativePatching(
        lr=float(lr),
        accuracy=accuracies,
        train_loss=losses,
        patch=patch,
        length=length,
        n_train=maps.n_examples,
        n_test=len(batch),
        seconds=time.perf_counter() - start,
    )
