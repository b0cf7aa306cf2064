"""Read a model's answer at the last prompt token, batched, under hooks.

The experiments of the paper (head rankings, the perturbation test, attention
patching) all ask one question many times: with these hooks on, what does the model
put at the last prompt token? This module answers it for a set of prompts:

* :func:`prompt_batch` tokenizes prompts once into a right-padded batch and
  remembers where each prompt ends and which token its target starts with;
* :func:`last_logits` runs the model (``torch.no_grad``, hooks on) and returns the
  logits at each prompt's last token;
* :func:`accuracy` and :func:`target_probs` turn those into top-1 accuracy of the
  first target token and ``p(first target token)``.

Padding is on the right: under causal attention no real token attends to a pad that
follows it, so a padded row gives exactly the logits of the prompt run alone.
Mini-batches are formed from prompts sorted by length (less padding), and results
come back in the caller's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_reversed.core.architecture import describe, last_position_hook
from tl_reversed.core.checks import optional_batch_size
from tl_reversed.core.engine import model_device
from tl_reversed.core.inputs import tokenize
from tl_reversed.core.options import show_progress

Hook = tuple[str, Callable]
"""A forward hook as TransformerLens takes it: ``(hook_name, fn(activation, hook))``."""


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


@dataclass
class PromptBatch:
    """Prompts tokenized once, right-padded, with the first token of each target.

    Attributes:
        tokens: prompt tokens (no target tokens), right-padded.
        last: index of each prompt's last token (where its answer is read).
        target: the first token of each target.
        prompts, targets: the strings.
    """

    tokens: Int[Tensor, "batch pos"]
    last: Int[Tensor, " batch"]
    target: Int[Tensor, " batch"]
    prompts: list[str]
    targets: list[str]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Number of prompt tokens of each row."""
        return self.last + 1

    def rows(self, index: Sequence[int]) -> PromptBatch:
        """A sub-batch, trimmed to its longest row."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        width = int(self.last[idx].max()) + 1
        return PromptBatch(
            tokens=self.tokens[idx, :width],
            last=self.last[idx],
            target=self.target[idx],
            prompts=[self.prompts[i] for i in index],
            targets=[self.targets[i] for i in index],
        )

    def chunks(self, batch_size: int | None) -> list[list[int]]:
        """Row indices in mini-batches of similar length (sorted by length, stable)."""
        size = optional_batch_size(batch_size) or len(self)
        order = sorted(range(len(self)), key=lambda i: int(self.last[i]))
        return [order[i : i + size] for i in range(0, len(order), size)]

    def single_length(self) -> int | None:
        """The prompt length when every prompt has the same number of tokens, else None."""
        lengths = self.lengths.unique()
        return int(lengths[0]) if lengths.numel() == 1 else None


def prompt_batch(model: object, examples: object) -> PromptBatch:
    """Tokenize examples into a :class:`PromptBatch` (targets scored by their first token)."""
    prompts, targets = as_prompts_targets(examples)
    if not prompts:
        raise ValueError("no examples given: make some with tl_reversed.experiments.tasks.make_examples(task, model=model)")
    batch = tokenize(model, prompts, targets, describe(model), need_targets=True)
    width = int(batch.prompt_lengths.max())
    return PromptBatch(
        tokens=batch.tokens[:, :width].clone(),
        last=batch.prompt_lengths - 1,
        target=torch.stack([t[0] for t in batch.targets]),
        prompts=prompts,
        targets=targets,
    )


def last_logits(
    model: torch.nn.Module,
    batch: PromptBatch,
    hooks: Sequence[Hook] = (),
    *,
    batch_size: int | None = 16,
    progress: bool | None = False,
) -> Float[Tensor, "batch d_vocab"]:
    """Logits at each prompt's last token with ``hooks`` on, in float32 on the CPU.

    Runs under ``torch.no_grad``; the caller keeps the model untouched
    (:func:`tl_reversed.core.state.untouched`). ``progress``: a bar over the batches
    (``None``: when there is more than one, see :mod:`tl_reversed.core.options`; off by
    default, as this runs inside the experiments' own loops).
    """
    device = model_device(model)
    out: Tensor | None = None
    # unembed only the last prompt token of each row (added after the caller's hooks),
    # unless a caller's hook reads the unembedding's input or output
    only_last = last_position_hook(model, batch.last, beside=hooks)
    with torch.no_grad(), model.hooks(fwd_hooks=[*hooks, *([only_last] if only_last else [])]):  # type: ignore[operator]
        parts = batch.chunks(batch_size)
        for index in tqdm(parts, desc="forward", disable=not show_progress(progress, len(parts)), leave=False):
            sub = batch.rows(index)
            if only_last:
                only_last[1].cols = sub.last
            rows = at_last(model(sub.tokens.to(device)), sub).float().cpu()
            if out is None:
                out = torch.empty(len(batch), rows.shape[-1])
            out[torch.as_tensor(index)] = rows
    assert out is not None
    return out


def at_last(logits: Float[Tensor, "batch pos d_vocab"], batch: PromptBatch) -> Float[Tensor, "batch d_vocab"]:
    """Each row's logits at its last prompt token.

    Also takes the ``[batch, 1, d_vocab]`` logits of a run under
    :func:`tl_reversed.core.architecture.last_position_hook`, which hold that position alone.
    """
    if logits.shape[1] == 1:
        return logits[:, 0]
    return logits[torch.arange(len(batch), device=logits.device), batch.last.to(logits.device)]


def correct(logits: Float[Tensor, "batch d_vocab"], batch: PromptBatch) -> Bool[Tensor, " batch"]:
    """Whether the top-1 token is each example's first target token."""
    return logits.argmax(-1) == batch.target


def target_probs(logits: Float[Tensor, "batch d_vocab"], batch: PromptBatch) -> Float[Tensor, " batch"]:
    """Probability of each example's first target token."""
    return logits.float().softmax(-1).gather(-1, batch.target.to(logits.device)[:, None])[:, 0]


def accuracy(
    model: torch.nn.Module,
    batch: PromptBatch,
    hooks: Sequence[Hook] = (),
    *,
    batch_size: int | None = 16,
) -> float:
    """Top-1 accuracy of the first target token at the last prompt token, with ``hooks`` on."""
    return float(correct(last_logits(model, batch, hooks, batch_size=batch_size), batch).double().mean())
