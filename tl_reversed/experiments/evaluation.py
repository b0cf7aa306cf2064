"""Read a model's answer at the last prompt token, batched, under hooks.

The experiments of the paper (head rankings, the perturbation test, attention
patching) all ask one question many times: with these hooks on, what does the model
put at the last prompt token? This module answers it for a set of prompts:

* :func:`prompt_batch` tokenizes prompts once into a right-padded, prompt-only
  :class:`~tl_reversed.core.inputs.Batch` (``batch.last``: where each prompt ends,
  ``batch.target``: the token its target starts with);
* :func:`last_logits` runs the model through the pass engine (forward only,
  ``torch.no_grad``, hooks on) and returns the logits at each prompt's last token;
* :func:`accuracy` and :func:`target_probs` turn those into top-1 accuracy of the
  first target token and ``p(first target token)``.

Padding is on the right: under causal attention no real token attends to a pad that
follows it, so a padded row gives exactly the logits of the prompt run alone.
Mini-batches follow the engine's one chunking rule (prompts sorted by length), and
results come back in the caller's order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_reversed.core.architecture import Model, ModelSpec, describe
from tl_reversed.core.engine import Chunk, Hook, run
from tl_reversed.core.inputs import Batch, tokenize


def as_prompts_targets(examples: object) -> tuple[list[str], list[str]]:
    """Prompts and targets of an ``ExampleSet``, a list of ``Example`` or ``(prompts, targets)``."""
    if isinstance(examples, tuple) and len(examples) == 2 and not hasattr(examples[0], "prompt"):
        prompts, targets = examples
        return list(prompts), list(targets)
    try:
        items = list(examples)  # type: ignore[call-overload]
        return [ex.prompt for ex in items], [ex.target for ex in items]
    except (TypeError, AttributeError):
        raise TypeError(
            f"examples must be a tl_reversed.experiments.tasks.ExampleSet, a list of Example or a tuple "
            f"(prompts, targets); got {type(examples).__name__}. Make them with "
            "tl_reversed.experiments.tasks.make_examples(task, shots=..., model=model)."
        ) from None


def prompt_batch(model: Model, examples: object, spec: ModelSpec | None = None) -> Batch:
    """Tokenize examples into a prompt-only :class:`~tl_reversed.core.inputs.Batch`.

    The batch holds the prompt tokens alone (right-padded); ``batch.last`` is where each
    answer is read and ``batch.target`` the first token of each target (what accuracy scores).
    """
    prompts, targets = as_prompts_targets(examples)
    if not prompts:
        raise ValueError("no examples given: make some with tl_reversed.experiments.tasks.make_examples(task, model=model)")
    spec = describe(model) if spec is None else spec
    return tokenize(model, prompts, targets, spec, need_targets=True).prompt_only()


class Answers:
    """The pass-engine sink of :func:`last_logits`: the logits at each row's last prompt token."""

    def __init__(self, n: int):
        self.n = n
        self.out: Tensor | None = None

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        return [], []

    def merge(self, chunk: Chunk) -> None:
        assert chunk.logits is not None
        if self.out is None:
            self.out = torch.empty(self.n, chunk.logits.shape[-1])
        self.out[chunk.index] = chunk.logits

    def finish(self) -> Float[Tensor, "batch d_vocab"]:
        assert self.out is not None
        return self.out


def last_logits(
    model: Model,
    batch: Batch,
    hooks: Sequence[Hook] = (),
    *,
    batch_size: int | None = 16,
    progress: bool | None = False,
) -> Float[Tensor, "batch d_vocab"]:
    """Logits at each prompt's last token with ``hooks`` on, in float32 on the CPU.

    A forward-only pass of the engine (:func:`tl_reversed.core.engine.run`, which keeps
    the model untouched): under ``torch.no_grad``, unembedding the last prompt token alone.
    """
    sink = Answers(len(batch))
    run(model, batch, [sink], backward=False, batch_size=batch_size, extra_hooks=hooks, progress=progress, desc="forward")
    return sink.finish()


def correct(logits: Float[Tensor, "batch d_vocab"], batch: Batch) -> Bool[Tensor, " batch"]:
    """Whether the top-1 token is each example's first target token."""
    return logits.argmax(-1) == batch.target


def target_probs(logits: Float[Tensor, "batch d_vocab"], batch: Batch) -> Float[Tensor, " batch"]:
    """Probability of each example's first target token."""
    return logits.float().softmax(-1).gather(-1, batch.target.to(logits.device)[:, None])[:, 0]


def accuracy(
    model: Model,
    batch: Batch,
    hooks: Sequence[Hook] = (),
    *,
    batch_size: int | None = 16,
) -> float:
    """Top-1 accuracy of the first target token at the last prompt token, with ``hooks`` on."""
    return float(correct(last_logits(model, batch, hooks, batch_size=batch_size), batch).double().mean())
