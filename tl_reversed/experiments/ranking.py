"""Head rankings: which heads matter for a task, by seven methods.

:func:`head_scores` gives every head a score (higher = more important) by one of:

``"ra"``
    Reversed Attention: each head's RA Frobenius norm, averaged over examples
    (mean of per-example norms, the paper's head score).
``"fa"``
    The same for the forward attention pattern.
``"cm1"``
    Causal mediation by zero ablation: zero one head's ``hook_z`` (all positions) and
    measure the drop of ``p(first target token)`` at the last prompt token, averaged
    over examples. Run with TransformerLens' own activation patching
    (:func:`transformer_lens.patching.generic_activation_patch` with its
    ``layer_head_vector_patch_setter``, a cache of zeros as the "clean" activation,
    ``reduce="none"`` and ``baseline=True``): one forward per head over the whole
    mini-batch.
``"cm2"``
    Todd et al.'s function-vector heads: each head's mean ``hook_z`` at the last
    prompt token over the clean prompts is patched, at the last token, into prompts
    whose demonstration labels are shuffled; importance = rise of ``p(target)``,
    averaged over examples. Also run by ``generic_activation_patch`` (with a patch
    setter that writes the mean at each row's last prompt token).
``"atp"``
    Attribution patching at node level (one node per head, at ``hook_z``), in
    TransformerLens' denoising convention: the gradient of ``p(target)`` is taken on
    the shuffled-label (corrupted) run and the score is
    ``(z_clean - z_corrupt) . grad``, summed over ``d_head`` at the last prompt token
    (``position="last"``, default) or over all positions (``position="all"``, needs
    clean and corrupted prompts of equal length), averaged over examples.
``"random"``
    A seeded random order.
``"index"``
    Layer order: earlier layers first (``order(reverse=True)`` puts the last layer first).

Without demonstrations (0 shots) or with one, shuffling labels changes nothing, so
``"atp"`` scores are all zero there and ``"cm2"`` measures only the effect of
replacing each head's output with its mean.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_reversed.core.architecture import ModelSpec, attn_hook, describe
from tl_reversed.core.engine import forward_backward, model_device
from tl_reversed.core.inputs import Batch
from tl_reversed.experiments.evaluation import as_prompts_targets, last_logits, prompt_batch, target_probs
from tl_reversed.core.state import untouched

METHODS = ("ra", "fa", "cm1", "cm2", "atp", "random", "index")
"""The ranking methods :func:`head_scores` knows."""

POSITIONS = ("last", "all")


@dataclass
class HeadScores:
    """One score per head; a higher score means a more important head.

    Attributes:
        scores: ``[layer, head]`` scores.
        method: the method that made them (one of :data:`METHODS`).
        seconds: wall time of the computation.
        n_examples: number of examples averaged over (0 for ``random``/``index``).
        baseline: mean ``p(target)`` of the unpatched run the method compares against
            (clean for ``cm1``, corrupted for ``cm2``/``atp``), where there is one.
    """

    scores: Float[Tensor, "layer head"]
    method: str
    seconds: float = 0.0
    n_examples: int = 0
    baseline: float | None = None
    info: dict = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def n_heads(self) -> int:
        return self.scores.shape[1]

    def order(self, reverse: bool = False) -> list[tuple[int, int]]:
        """All heads as ``(layer, head)``, most important first (``reverse``: least first).

        Ties keep layer-then-head order; ``order(reverse=True)`` is exactly
        ``order()[::-1]``.
        """
        flat = self.scores.flatten().float()
        idx = torch.argsort(flat, descending=True, stable=True).tolist()
        heads = [(i // self.n_heads, i % self.n_heads) for i in idx]
        return heads[::-1] if reverse else heads

    def top(self, k: int = 10) -> list[tuple[int, int]]:
        """The ``k`` most important heads."""
        return self.order()[:k]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per head: layer, head, score and rank (1 = most important)."""
        rank = {head: r for r, head in enumerate(self.order(), start=1)}
        rows = [
            (layer, head, float(self.scores[layer, head]), rank[(layer, head)])
            for layer in range(self.n_layers)
            for head in range(self.n_heads)
        ]
        return pd.DataFrame(rows, columns=["layer", "head", "score", "rank"]).assign(method=self.method)

    def plot(self, ax=None, cmap: str = "viridis", title: str | None = None):
        """Layer x head heatmap of the scores; returns the matplotlib Figure."""
        from tl_reversed.views.plotting import _figure_and_axes

        fig, ax = _figure_and_axes(ax, (1.2 + 0.45 * self.n_heads, 1.0 + 0.22 * self.n_layers))
        image = ax.imshow(self.scores.float().numpy(), aspect="auto", cmap=cmap, origin="lower")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(self.n_heads))
        ax.set_title(title or f"head scores: {self.method}")
        fig.colorbar(image, ax=ax, shrink=0.8)
        return fig


def head_scores(
    model: torch.nn.Module,
    examples: object,
    method: str,
    *,
    corrupted: object | None = None,
    seed: int = 0,
    batch_size: int | None = 32,
    position: str = "last",
    progress: bool | None = None,
) -> HeadScores:
    """Score every head for a task by one of :data:`METHODS`.

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        examples: an ``ExampleSet`` (see :func:`tl_reversed.experiments.tasks.make_examples`), a list
            of ``Example`` or ``(prompts, targets)``. Targets are scored by their first token.
        method: ``"ra"``, ``"fa"``, ``"cm1"``, ``"cm2"``, ``"atp"``, ``"random"`` or ``"index"``.
        corrupted: for ``"cm2"`` and ``"atp"``: the same examples with shuffled
            demonstration labels, aligned one to one (``make_examples(...,
            shuffle_labels=True)`` with the same arguments). Default: made from
            ``examples`` by :func:`shuffled_labels` with ``seed``.
        seed: seed of ``"random"`` and of the default label shuffle.
        batch_size: examples per forward pass (``None``: all at once).
        position: ``"atp"`` only: ``"last"`` prompt token or ``"all"`` positions.
        progress: show progress bars (default: for the slow methods).

    Returns:
        A :class:`HeadScores`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ranking method {method!r}; choose one of {', '.join(METHODS)}")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    spec = describe(model)
    start = time.perf_counter()
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        result = HeadScores(torch.rand(spec.n_layers, spec.n_heads, generator=generator), method)
    elif method == "index":
        index = torch.arange(spec.n_layers * spec.n_heads, dtype=torch.float32)
        result = HeadScores(-index.reshape(spec.n_layers, spec.n_heads), method)
    else:
        show = method in ("cm1", "cm2") if progress is None else progress
        with untouched(model):
            if method in ("ra", "fa"):
                result = _attention_norms(model, examples, method, batch_size, show)
            elif method == "cm1":
                result = _cm1(model, spec, prompt_batch(model, examples), batch_size)
            else:
                clean = prompt_batch(model, examples)
                bad = prompt_batch(model, corrupted if corrupted is not None else shuffled_labels(examples, seed))
                _check_aligned(clean, bad)
                if method == "cm2":
                    result = _cm2(model, spec, clean, bad, batch_size)
                else:
                    result = _atp(model, spec, clean, bad, batch_size, position, show)
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------
# RA and FA norms
# --------------------------------------------------------------------------


def _attention_norms(model, examples, method: str, batch_size, progress: bool) -> HeadScores:
    from tl_reversed.core.reversed_attention import reversed_attention

    prompts, targets = as_prompts_targets(examples)
    result = reversed_attention(model, prompts, targets, keep="norms", batch_size=batch_size, progress=progress)
    norms = result.norms if method == "ra" else result.pattern_norms
    return HeadScores(norms.mean(0), method, n_examples=len(prompts), info={"loss": float(result.loss.mean())})


# --------------------------------------------------------------------------
# Causal mediation with TransformerLens' activation patching
# --------------------------------------------------------------------------


def _p_target_metric(sub: Batch):
    """``logits -> p(first target token)`` at each row's last prompt token, for one sub-batch."""

    def metric(logits: Tensor) -> Tensor:
        rows = torch.arange(len(sub), device=logits.device)
        return target_probs(logits[rows, sub.last.to(logits.device)], sub)

    return metric


def _sweep_heads(model, tokens: Tensor, cache: dict, metric, setter) -> tuple[Tensor, Tensor]:
    """One TransformerLens activation-patching sweep over every (layer, head).

    Returns the per-example metric ``[layer, head, batch]`` and the unpatched baseline ``[batch]``
    (under TransformerLens 2.x/3.x, whose sweep takes scalar metrics: the batch sums,
    ``[layer, head, 1]`` and ``[1]``).
    """
    import inspect

    from transformer_lens.patching import generic_activation_patch

    with torch.no_grad():
        if "reduce" in inspect.signature(generic_activation_patch).parameters:  # TransformerLens 4.x
            result = generic_activation_patch(
                model,
                tokens,
                cache,
                metric,
                setter,
                "z",
                index_axis_names=["layer", "head"],
                reduce="none",
                baseline=True,
            )
            return result.values.float().cpu(), result.baseline.float().cpu()
        # TransformerLens 2.x/3.x: the metric must be a scalar, so sum over the batch
        summed = generic_activation_patch(
            model, tokens, cache, lambda logits: metric(logits).sum(), setter, "z", index_axis_names=["layer", "head"]
        )
        baseline = metric(model(tokens)).sum()
    return summed.float().cpu()[..., None], baseline.float().cpu()[None]


def _cm1(model, spec: ModelSpec, batch: Batch, batch_size) -> HeadScores:
    from transformer_lens.patching import layer_head_vector_patch_setter

    zeros = torch.zeros(1, 1, spec.n_heads, 1, device=model_device(model))
    cache = {attn_hook(layer, "z"): zeros for layer in range(spec.n_layers)}
    drop = torch.zeros(spec.n_layers, spec.n_heads)
    base = 0.0
    for index in batch.chunks(batch_size):
        sub = batch.rows(index)
        values, baseline = _sweep_heads(
            model, sub.tokens.to(model_device(model)), cache, _p_target_metric(sub), layer_head_vector_patch_setter
        )
        drop += (baseline - values).sum(-1)
        base += float(baseline.sum())
    n = len(batch)
    return HeadScores(drop / n, "cm1", n_examples=n, baseline=base / n)


def _mean_z_at_last(model, spec: ModelSpec, batch: Batch, batch_size) -> Float[Tensor, "layer head d_head"]:
    """Each head's ``hook_z`` at the last prompt token, averaged over the prompts."""
    total = torch.zeros(spec.n_layers, spec.n_heads, spec.d_head)
    for index in batch.chunks(batch_size):
        sub = batch.rows(index)
        last = sub.last.to(model_device(model))
        hooks = [(attn_hook(layer, "z"), _sum_at_last(total, layer, last)) for layer in range(spec.n_layers)]
        last_logits(model, sub, hooks, batch_size=None)
    return total / len(batch)


def _sum_at_last(total: Tensor, layer: int, last: Tensor):
    def hook(z: Tensor, hook: object) -> None:
        total[layer] += z[torch.arange(z.shape[0], device=z.device), last].float().sum(0).cpu()

    return hook


def _cm2(model, spec: ModelSpec, clean: Batch, corrupted: Batch, batch_size) -> HeadScores:
    device = model_device(model)
    mean_z = _mean_z_at_last(model, spec, clean, batch_size)
    cache = {attn_hook(layer, "z"): mean_z[layer].to(device) for layer in range(spec.n_layers)}
    rise = torch.zeros(spec.n_layers, spec.n_heads)
    base = 0.0
    for index in corrupted.chunks(batch_size):
        sub = corrupted.rows(index)
        rows, last = torch.arange(len(sub), device=device), sub.last.to(device)

        def setter(z: Tensor, index: Sequence[int], mean: Tensor, rows=rows, last=last) -> Tensor:
            head = index[1]
            z[rows, last, head] = mean[head].to(z.dtype)
            return z

        values, baseline = _sweep_heads(model, sub.tokens.to(device), cache, _p_target_metric(sub), setter)
        rise += (values - baseline).sum(-1)
        base += float(baseline.sum())
    n = len(corrupted)
    return HeadScores(rise / n, "cm2", n_examples=n, baseline=base / n)


# --------------------------------------------------------------------------
# Attribution patching
# --------------------------------------------------------------------------


def _atp(model, spec, clean: Batch, corrupted: Batch, batch_size, position: str, progress: bool) -> HeadScores:
    if position == "all" and not torch.equal(clean.lengths, corrupted.lengths):
        i = int((clean.lengths != corrupted.lengths).nonzero()[0])
        raise ValueError(
            f"position='all' needs clean and corrupted prompts of equal token length, but example {i} has "
            f"{int(clean.lengths[i])} clean and {int(corrupted.lengths[i])} corrupted tokens; use position='last'"
        )
    effect = torch.zeros(spec.n_layers, spec.n_heads)
    base = 0.0
    for index in tqdm(corrupted.chunks(batch_size), desc="attribution patching", disable=not progress, leave=False):
        sub_bad, sub_clean = corrupted.rows(index), clean.rows(index)
        z_clean: dict[int, Tensor] = {}
        hooks = [(attn_hook(layer, "z"), _keep(z_clean, layer)) for layer in range(spec.n_layers)]
        last_logits(model, sub_clean, hooks, batch_size=None)
        z_bad: dict[int, Tensor] = {}
        grads: dict[int, Tensor] = {}
        fwd = [(attn_hook(layer, "z"), _keep(z_bad, layer)) for layer in range(spec.n_layers)]
        bwd = [(attn_hook(layer, "z"), _keep(grads, layer)) for layer in range(spec.n_layers)]
        metric = _p_target_metric(sub_bad)
        p = forward_backward(model, sub_bad, lambda logits, tokens: metric(logits), fwd, bwd)  # type: ignore[arg-type]
        base += float(p.sum())
        rows = torch.arange(len(index))
        for layer in range(spec.n_layers):
            if position == "last":
                diff = z_clean[layer][rows, sub_clean.last] - z_bad[layer][rows, sub_bad.last]
                prod = diff * grads[layer][rows, sub_bad.last]  # [batch, head, d_head]
                effect[layer] += prod.sum((0, -1))
            else:
                width = sub_bad.tokens.shape[1]
                prod = (z_clean[layer][:, :width] - z_bad[layer]) * grads[layer]  # [batch, pos, head, d_head]
                effect[layer] += prod.sum((0, 1, -1))
    n = len(corrupted)
    return HeadScores(effect / n, "atp", n_examples=n, baseline=base / n, info={"position": position})


def _keep(store: dict[int, Tensor], layer: int):
    def hook(x: Tensor, hook: object) -> None:
        store[layer] = x.detach().float().cpu()

    return hook


# --------------------------------------------------------------------------
# Corrupted prompts
# --------------------------------------------------------------------------


def _check_aligned(clean: Batch, corrupted: Batch) -> None:
    if len(clean) != len(corrupted) or not torch.equal(clean.target, corrupted.target):
        raise ValueError(
            f"corrupted examples must line up one to one with the clean ones (same count and targets); got "
            f"{len(clean)} clean and {len(corrupted)} corrupted. Make both with tl_reversed.experiments.tasks.make_examples "
            "and the same arguments, adding shuffle_labels=True for the corrupted set"
        )


def shuffled_labels(examples: object, seed: int = 0) -> list:
    """The same examples with their demonstrations' outputs permuted (Todd et al.'s corruption).

    Works for ``Example`` objects (from :mod:`tl_reversed.experiments.tasks`) in the ICL format or a
    relation format with one demonstration per line. ``make_examples(...,
    shuffle_labels=True)`` gives the canonical corrupted set; this rebuilds one from
    examples already made.
    """
    from dataclasses import replace

    from tl_reversed.experiments.tasks import icl_prompt

    rng = random.Random(f"tl_reversed.experiments.ranking:labels:{seed}")
    out = []
    for i, example in enumerate(examples):  # type: ignore[attr-defined]
        demos = list(getattr(example, "demos", None) or ())
        if not hasattr(example, "demos"):
            raise TypeError(
                "cannot shuffle labels of plain (prompt, target) pairs: pass corrupted=... "
                "(make_examples(..., shuffle_labels=True))"
            )
        outputs = [y for _, y in demos]
        rng.shuffle(outputs)
        shuffled = tuple((x, y) for (x, _), y in zip(demos, outputs))
        if example.prompt == icl_prompt(demos, example.x):
            prompt = icl_prompt(shuffled, example.x)
        else:
            lines = example.prompt.split("\n")
            if len(lines) != len(demos) + 1 or not all(line.endswith(f" {y}") for line, (_, y) in zip(lines, demos)):
                raise ValueError(
                    f"cannot find the demonstration labels in prompt {i} ({example.prompt!r}): pass corrupted="
                    "make_examples(..., shuffle_labels=True) with the arguments that made the clean examples"
                )
            lines = [line[: len(line) - len(y)] + new for line, (_, y), (_, new) in zip(lines, demos, shuffled)] + [
                lines[-1]
            ]
            prompt = "\n".join(lines)
        out.append(replace(example, prompt=prompt, demos=shuffled))
    return out
