"""Head rankings: which heads matter for a task, by seven methods (and any you register).

:func:`head_scores` gives every head a score (higher = more important) by one of the
methods in the registry (``METHODS`` is a live view of it; add one with ``@register("name")``):

``"ra"``
    Reversed Attention: each head's RA Frobenius norm, averaged over examples
    (mean of per-example norms, the paper's head score).
``"fa"``
    The same for the forward attention pattern.
``"cm1"``
    Causal mediation by zero ablation: zero one head's ``hook_z`` (all positions) and
    measure the drop of ``p(first target token)`` at the last prompt token, averaged
    over examples. Patched with TransformerLens' ``layer_head_vector_patch_setter``
    and a cache of zeros as the "clean" activation, by the stacked sweep of
    :class:`~tl_reversed.experiments.mediation.SweepHeads`: per layer, one forward of
    the mini-batch repeated once per head, each copy with one head patched, reading the
    last prompt token alone (a HookedTransformer starts it at the patched layer). It
    equals TransformerLens' ``generic_activation_patch`` sweep (``SweepHeads(...,
    stacked=False)``, one forward per head) to float rounding.
``"cm2"``
    Todd et al.'s function-vector heads: each head's mean ``hook_z`` at the last
    prompt token over the clean prompts is patched, at the last token, into prompts
    whose demonstration labels are shuffled; importance = rise of ``p(target)``,
    averaged over examples. The same stacked sweep, with a patch setter that writes
    the mean at each row's last prompt token.
``"atp"``
    Attribution patching at node level (one node per head, at ``hook_z``), in
    TransformerLens' denoising convention: the gradient of ``p(target)`` is taken on
    the shuffled-label (corrupted) run and the score is
    ``(z_clean - z_corrupt) . grad``, summed over ``d_head`` at the last prompt token
    (``position="last"``, default) or over all positions (``position="all"``, needs
    clean and corrupted prompts of equal length), averaged over examples.
``"atp0"``
    The first-order estimate of ``"cm1"`` (attribution patching with a zero baseline):
    per head, ``hook_z . d p(target) / d hook_z`` summed over positions and ``d_head``,
    averaged over examples; one backward pass. :func:`ra_and_atp0` gives it and ``"ra"``
    from one pass. It answers *which heads matter*; RA, *how attention would change*.
``"random"``
    A seeded random order.
``"index"``
    Layer order: earlier layers first (``order(reverse=True)`` puts the last layer first).

Without demonstrations (0 shots) or with one, shuffling labels changes nothing, so
``"atp"`` scores are all zero there and ``"cm2"`` measures only the effect of
replacing each head's output with its mean.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_reversed.core.architecture import Model, ModelSpec, attn_hook, describe
from tl_reversed.core.checks import optional_batch_size
from tl_reversed.core.options import POSITIONS, RA_PATHS, Position, RAPath, check_option
from tl_reversed.core.results import Result
from tl_reversed.core.engine import model_device, run
from tl_reversed.core.inputs import Batch
from tl_reversed.experiments.evaluation import as_prompts_targets, prompt_batch
from tl_reversed.experiments.agreement import Agreement, agreement
from tl_reversed.experiments.mediation import AttributionPatching, MeanZAtLast, SweepHeads, ZeroAblationAttribution
from tl_reversed.experiments.tasks import shuffled_labels

__all__ = [
    "METHODS", "Agreement", "HeadScores", "RankingContext", "agreement", "head_scores", "ra_and_atp0", "register",
    "registered", "shuffled_labels", "unregister",
]  # fmt: skip


@dataclass(frozen=True)
class RankingContext:
    """Everything a ranking method gets besides the model and the examples.

    Attributes:
        spec: the model described once (:func:`tl_reversed.core.architecture.describe`).
        corrupted: the shuffled-label examples (``"cm2"``, ``"atp"``), or None for the default.
        seed: seed of ``"random"`` and of the default label shuffle.
        batch_size: examples per pass (``None``: all at once).
        position: ``"atp"``: ``"last"`` prompt token or ``"all"`` positions.
        progress: show a progress bar over the batches (``None``: when there is more than one).
        path: ``"ra"``, ``"fa"``: the pass of :func:`~tl_reversed.core.reversed_attention.reversed_attention`
            (``"auto"``, ``"standard"`` or ``"bounded"``; see :mod:`tl_reversed.core.paths`).
    """

    spec: ModelSpec
    corrupted: object | None = None
    seed: int = 0
    batch_size: int | None = 32
    position: Position = "last"
    progress: bool | None = None
    path: RAPath = "auto"


RankingMethod = Callable[[Model, object, RankingContext], "HeadScores | Float[Tensor, 'layer head']"]
"""``method(model, examples, context)`` -> a :class:`HeadScores` or a ``[layer, head]`` tensor."""

_REGISTRY: dict[str, RankingMethod] = {}


def register(name: str) -> Callable[[RankingMethod], RankingMethod]:
    """Decorator: make ``fn(model, examples, context)`` the ranking method ``name`` of :func:`head_scores`.

    The method returns a ``[layer, head]`` tensor (higher = more important) or a
    :class:`HeadScores`; it then appears in :data:`METHODS` and in the command line's
    ``--methods``. Remove it with :func:`unregister` (or use :func:`registered`).
    """
    if not isinstance(name, str) or not name or name != name.strip().lower() or "," in name:
        raise ValueError(f"a ranking method's name must be a non-empty lower-case word without commas, got {name!r}")

    def decorate(fn: RankingMethod) -> RankingMethod:
        if name in _REGISTRY:
            raise ValueError(f"ranking method {name!r} is already registered; unregister({name!r}) first")
        _REGISTRY[name] = fn
        return fn

    return decorate


def unregister(name: str) -> None:
    """Remove a ranking method registered with :func:`register`."""
    if name not in _REGISTRY:
        raise ValueError(f"no ranking method {name!r} is registered; the methods are {', '.join(_REGISTRY)}")
    del _REGISTRY[name]


@contextmanager
def registered(name: str, fn: RankingMethod) -> Iterator[RankingMethod]:
    """Context manager: ``fn`` is the ranking method ``name`` inside the block only (for tests)."""
    register(name)(fn)
    try:
        yield fn
    finally:
        _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered ranking methods, in registration order (what :data:`METHODS` reads)."""
    return tuple(_REGISTRY)


def __getattr__(name: str) -> object:
    if name == "METHODS":  # a live view of the registry: ranking.METHODS is computed at each access
        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class HeadScores(Result):
    """One score per head; a higher score means a more important head.

    Attributes:
        scores: ``[layer, head]`` scores.
        method: the method that made them (a name in :data:`METHODS`).
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
        from tl_reversed.views.plotting import figure_and_axes

        fig, ax = figure_and_axes(ax, (1.2 + 0.45 * self.n_heads, 1.0 + 0.22 * self.n_layers))
        image = ax.imshow(self.scores.float().numpy(), aspect="auto", cmap=cmap, origin="lower")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(self.n_heads))
        ax.set_title(title or f"head scores: {self.method}")
        fig.colorbar(image, ax=ax, shrink=0.8)
        return fig


def head_scores(
    model: Model,
    examples: object,
    method: str,
    *,
    corrupted: object | None = None,
    seed: int = 0,
    batch_size: int | None = 32,
    position: Position = "last",
    progress: bool | None = None,
    path: RAPath = "auto",
) -> HeadScores:
    """Score every head for a task by one of the registered methods (:data:`METHODS`).

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        examples: an ``ExampleSet`` (see :func:`tl_reversed.experiments.tasks.make_examples`), a list
            of ``Example`` or ``(prompts, targets)``. Targets are scored by their first token.
        method: ``"ra"``, ``"fa"``, ``"cm1"``, ``"cm2"``, ``"atp"``, ``"random"``, ``"index"``
            or a name given to :func:`register`.
        corrupted: for ``"cm2"`` and ``"atp"``: the same examples with shuffled
            demonstration labels, aligned one to one (``make_examples(...,
            shuffle_labels=True)`` with the same arguments). Default: made from
            ``examples`` by :func:`tl_reversed.experiments.tasks.shuffled_labels` with ``seed``.
        seed: seed of ``"random"`` and of the default label shuffle.
        batch_size: examples per forward pass (``None``: all at once).
        position: ``"atp"`` only: ``"last"`` prompt token or ``"all"`` positions.
        progress: show a progress bar over the batches (``None``: when there is more than
            one; see :mod:`tl_reversed.core.options`).
        path: ``"ra"`` and ``"fa"`` only (the other methods ignore it): ``"standard"``
            (the model's own pass), ``"bounded"`` (blocks checkpointed, attention in query
            tiles where the model allows it, else one layer's attention alive at a time;
            for long prompts) or ``"auto"`` (bounded above 1 GiB of stored patterns), as in
            :func:`~tl_reversed.core.reversed_attention.reversed_attention`; the same scores.

    Returns:
        A :class:`HeadScores`.
    """
    if method not in _REGISTRY:
        raise ValueError(f"unknown ranking method {method!r}; choose one of {', '.join(_REGISTRY)}")
    check_option("position", position, POSITIONS)
    check_option("path", path, RA_PATHS)
    batch_size = optional_batch_size(batch_size)
    spec = describe(model)
    context = RankingContext(spec, corrupted, seed, batch_size, position, progress, path)
    start = time.perf_counter()
    out = _REGISTRY[method](model, examples, context)
    if isinstance(out, HeadScores):
        result = out
    elif isinstance(out, Tensor) and out.shape == (spec.n_layers, spec.n_heads):
        result = HeadScores(out.detach().float().cpu(), method)
    else:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"ranking method {method!r} returned {shape}: it must return HeadScores or a [layer, head] tensor "
            f"of shape ({spec.n_layers}, {spec.n_heads})"
        )
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------
# The methods (registered in the order METHODS lists them)
# --------------------------------------------------------------------------


def _attention_norms(model: Model, examples: object, context: RankingContext, method: str) -> HeadScores:
    from tl_reversed.core.reversed_attention import reversed_attention

    prompts, targets = as_prompts_targets(examples)
    result = reversed_attention(
        model, prompts, targets, keep="norms", batch_size=context.batch_size, progress=context.progress,
        path=context.path,
    )
    norms = result.norms if method == "ra" else result.pattern_norms
    return HeadScores(norms.mean(0), method, n_examples=len(prompts), info={"loss": float(result.loss.mean())})


@register("ra")
def _ra(model: Model, examples: object, context: RankingContext) -> HeadScores:
    """Mean over examples of each head's RA norm."""
    return _attention_norms(model, examples, context, "ra")


@register("fa")
def _fa(model: Model, examples: object, context: RankingContext) -> HeadScores:
    """Mean over examples of each head's forward-attention norm."""
    return _attention_norms(model, examples, context, "fa")


@register("cm1")
def _cm1(model: Model, examples: object, context: RankingContext) -> HeadScores:
    """Drop of p(target) when one head's hook_z is zeroed (TransformerLens' activation patching)."""
    from transformer_lens.patching import layer_head_vector_patch_setter

    spec = context.spec
    batch = prompt_batch(model, examples, spec)
    zeros = torch.zeros(1, 1, spec.n_heads, 1, device=model_device(model))
    cache = {attn_hook(layer, "z"): zeros for layer in range(spec.n_layers)}
    sweep = SweepHeads(model, spec, cache, lambda sub: layer_head_vector_patch_setter, drop=True)
    run(model, batch, [sweep], backward=False, batch_size=context.batch_size, progress=context.progress, desc="CM1")
    scores, baseline = sweep.finish()
    return HeadScores(scores, "cm1", n_examples=len(batch), baseline=baseline)


@register("cm2")
def _cm2(model: Model, examples: object, context: RankingContext) -> HeadScores:
    """Rise of p(target) on shuffled-label prompts when one head's mean clean hook_z is patched in."""
    spec, device = context.spec, model_device(model)
    clean, corrupted = _clean_and_corrupted(model, examples, context)
    mean = MeanZAtLast(spec)
    run(model, clean, [mean], backward=False, batch_size=context.batch_size, progress=False, desc="mean z")
    mean_z = mean.finish()
    cache = {attn_hook(layer, "z"): mean_z[layer].to(device) for layer in range(spec.n_layers)}

    def setter_for(sub: Batch):
        rows, last = torch.arange(len(sub), device=device), sub.last.to(device)

        def setter(z: Tensor, index: Sequence[int], mean: Tensor) -> Tensor:
            head = index[1]
            z[rows, last, head] = mean[head].to(z.dtype)
            return z

        return setter

    sweep = SweepHeads(model, spec, cache, setter_for, drop=False)
    run(model, corrupted, [sweep], backward=False, batch_size=context.batch_size, progress=context.progress, desc="CM2")
    scores, baseline = sweep.finish()
    return HeadScores(scores, "cm2", n_examples=len(corrupted), baseline=baseline)


@register("atp")
def _atp(model: Model, examples: object, context: RankingContext) -> HeadScores:
    """Attribution patching at hook_z: (z_clean - z_corrupt) . grad p(target), denoising."""
    clean, corrupted = _clean_and_corrupted(model, examples, context)
    if context.position == "all" and not torch.equal(clean.lengths, corrupted.lengths):
        i = int((clean.lengths != corrupted.lengths).nonzero()[0])
        raise ValueError(
            f"position='all' needs clean and corrupted prompts of equal token length, but example {i} has "
            f"{int(clean.lengths[i])} clean and {int(corrupted.lengths[i])} corrupted tokens; use position='last'"
        )
    sink = AttributionPatching(model, context.spec, clean, context.position)
    # p(target) reads each row's own last prompt token, so chunks may mix lengths (as the curves do)
    run(model, corrupted, [sink], metric=sink.metric, batch_size=context.batch_size, progress=context.progress,
        desc="attribution patching", same_length=False)  # fmt: skip
    effect, baseline = sink.finish()
    return HeadScores(effect, "atp", n_examples=len(corrupted), baseline=baseline, info={"position": context.position})


@register("atp0")
def _atp0(model: Model, examples: object, context: RankingContext) -> HeadScores:
    """First-order estimate of CM1: sum over positions of hook_z . grad p(target), one backward pass."""
    batch = prompt_batch(model, examples, context.spec)
    sink = ZeroAblationAttribution(context.spec, len(batch))
    # p(target) reads each row's own last prompt token, so chunks may mix lengths
    run(model, batch, [sink], metric=sink.metric, batch_size=context.batch_size, progress=context.progress,
        desc="zero-ablation attribution", same_length=False)  # fmt: skip
    estimate, baseline = sink.finish()
    return HeadScores(estimate, "atp0", n_examples=len(batch), baseline=baseline)


def ra_and_atp0(
    model: Model, examples: object, *, batch_size: int | None = 32, progress: bool | None = None
) -> tuple[HeadScores, HeadScores]:
    """``"ra"`` and ``"atp0"`` scores from one forward and backward pass.

    The pass differentiates ``-log p(first target token)`` at the last prompt token (each
    target cut to its first token; for one-token targets, the loss of ``"ra"``). RA comes
    from :class:`~tl_reversed.core.reversed_attention.RASink`, the zero-ablation estimate
    from :class:`~tl_reversed.experiments.mediation.ZeroAblationAttribution` (``of="nll"``)
    on the same gradients. Returns ``(ra, atp0)`` :class:`HeadScores`.
    """
    from tl_reversed.core.reversed_attention import RASink

    spec = describe(model)
    batch_size = optional_batch_size(batch_size)
    full = prompt_batch(model, examples, spec)
    batch = dataclasses.replace(full, targets=[t[:1] for t in full.targets])  # prompt, then the first target token
    start = time.perf_counter()
    ra = RASink(model, spec, list(range(spec.n_layers)), batch, "norms")
    atp0 = ZeroAblationAttribution(spec, len(batch), of="nll")
    run(model, batch, [ra, atp0], batch_size=batch_size, progress=progress, desc="RA and zero-ablation attribution")
    seconds = time.perf_counter() - start
    result = ra.finish()
    estimate, baseline = atp0.finish()
    info = {"loss": float(result.loss.mean()), "shared_pass": True}
    return (
        HeadScores(result.norms.mean(0), "ra", seconds=seconds, n_examples=len(batch), info=info),
        HeadScores(estimate, "atp0", seconds=seconds, n_examples=len(batch), baseline=baseline, info={"shared_pass": True}),
    )


@register("random")
def _random(model: Model, examples: object, context: RankingContext) -> HeadScores:
    """A seeded random order."""
    generator = torch.Generator().manual_seed(context.seed)
    return HeadScores(torch.rand(context.spec.n_layers, context.spec.n_heads, generator=generator), "random")


@register("index")
def _index(model: Model, examples: object, context: RankingContext) -> HeadScores:
    """Layer order: earlier layers first."""
    spec = context.spec
    index = torch.arange(spec.n_layers * spec.n_heads, dtype=torch.float32)
    return HeadScores(-index.reshape(spec.n_layers, spec.n_heads), "index")


# --------------------------------------------------------------------------
# Corrupted prompts
# --------------------------------------------------------------------------


def _clean_and_corrupted(model: Model, examples: object, context: RankingContext) -> tuple[Batch, Batch]:
    """The clean and the shuffled-label prompts, tokenized and checked to line up."""
    clean = prompt_batch(model, examples, context.spec)
    bad_examples = context.corrupted if context.corrupted is not None else shuffled_labels(examples, context.seed)
    corrupted = prompt_batch(model, bad_examples, context.spec)
    _check_aligned(clean, corrupted)
    return clean, corrupted


def _check_aligned(clean: Batch, corrupted: Batch) -> None:
    if len(clean) != len(corrupted) or not torch.equal(clean.target, corrupted.target):
        raise ValueError(
            f"corrupted examples must line up one to one with the clean ones (same count and targets); got "
            f"{len(clean)} clean and {len(corrupted)} corrupted. Make both with tl_reversed.experiments.tasks.make_examples "
            "and the same arguments, adding shuffle_labels=True for the corrupted set"
        )
