"""Turn prompts and targets into one right-padded token batch, with clear errors.

The model reads ``prompt + target[:-1]`` (teacher forcing) and the loss is the
cross-entropy of the target tokens. Batches are padded on the right: under causal
attention no real token ever attends to a pad that follows it, so a padded row gives
exactly the maps of the same prompt run alone, on every architecture and without an
attention mask. Pad rows and columns are masked out of the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_reversed.core.architecture import ModelSpec
from tl_reversed.core.checks import optional_batch_size

PromptsLike = str | Sequence[str] | Tensor | Sequence[Tensor]
TargetsLike = str | Sequence[str] | None


@dataclass
class Batch:
    """Tokenized inputs of one call.

    Attributes:
        tokens: input tokens, prompt then target minus its last token, right-padded.
        lengths: real length of each row of ``tokens``.
        prompt_lengths: number of prompt tokens in each row.
        targets: target token ids of each example (empty where a metric is used).
        prompts, target_strings: the strings, where strings were given.
    """

    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    prompt_lengths: Int[Tensor, " batch"]
    targets: list[Tensor]
    prompts: list[str] | None
    target_strings: list[str] | None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index: Sequence[int]) -> Batch:
        """A sub-batch, trimmed to its longest row."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        width = int(self.lengths[idx].max())
        return Batch(
            tokens=self.tokens[idx, :width],
            lengths=self.lengths[idx],
            prompt_lengths=self.prompt_lengths[idx],
            targets=[self.targets[i] for i in index],
            prompts=None if self.prompts is None else [self.prompts[i] for i in index],
            target_strings=None if self.target_strings is None else [self.target_strings[i] for i in index],
        )

    @property
    def last(self) -> Int[Tensor, " batch"]:
        """Position of each row's last prompt token (where its answer is read)."""
        return self.prompt_lengths - 1

    @property
    def target(self) -> Int[Tensor, " batch"]:
        """The first token of each example's target (the answer scored by accuracy)."""
        if any(t.numel() == 0 for t in self.targets):
            raise ValueError("these inputs have no targets: give one target string per prompt")
        return torch.stack([t[0] for t in self.targets])

    def prompt_only(self) -> Batch:
        """The same examples with the prompt tokens alone (for reading answers at :attr:`last`)."""
        width = int(self.prompt_lengths.max())
        tokens = self.tokens[:, :width].clone()
        return Batch(tokens, self.prompt_lengths.clone(), self.prompt_lengths.clone(), self.targets,
                     self.prompts, self.target_strings)  # fmt: skip

    def single_length(self) -> int | None:
        """The row length when every row has the same number of tokens, else None."""
        lengths = self.lengths.unique()
        return int(lengths[0]) if lengths.numel() == 1 else None

    def chunks(self, batch_size: int | None, *, same_length: bool = False) -> list[list[int]]:
        """Row indices in mini-batches: the one chunking rule of the package.

        Rows are taken in order of length (stable, so rows of one length keep their order)
        and cut into chunks of ``batch_size`` (``None``: one chunk); ``same_length``
        never puts rows of different lengths in one chunk (a custom metric must not see
        padding). Results are scattered back into example order by the pass engine.
        """
        size = optional_batch_size(batch_size) or len(self)
        order = sorted(range(len(self)), key=lambda i: int(self.lengths[i]))
        if not same_length:
            return [order[i : i + size] for i in range(0, len(order), size)]
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(int(self.lengths[i]), []).append(i)
        return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]

    def key_mask(self) -> Float[Tensor, "batch query_pos key_pos"]:
        """1 where both the query and the key position are real tokens, else 0."""
        pos = torch.arange(self.tokens.shape[1], device=self.lengths.device)
        real = pos[None, :] < self.lengths[:, None]
        return (real[:, :, None] & real[:, None, :]).float()


def _as_list(value: str | Sequence[str], what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{what} must be a string or a list of strings, got {type(value).__name__}")


def _pad_id(model: object) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def tokenize(
    model: object,
    prompts: PromptsLike,
    targets: TargetsLike,
    spec: ModelSpec,
    *,
    need_targets: bool,
    metric: bool = False,
) -> Batch:
    """Validate and tokenize prompts and targets into a right-padded :class:`Batch`.

    ``need_targets``: targets must be given. ``metric``: a metric replaces the target
    loss, so ``targets`` must be None (targets given beside a metric would be silently
    ignored). With neither, targets are optional.
    """
    if metric and targets is not None:
        raise ValueError(
            "give targets or a metric, not both: the metric replaces the target loss, so the targets would be "
            "ignored; drop targets=... (or drop metric=... to use the target cross-entropy)"
        )
    prompt_strings: list[str] | None = None
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, Tensor) for p in prompts):
        if any(p.ndim != 1 or p.numel() == 0 or p.dtype not in (torch.int64, torch.int32) for p in prompts):
            raise ValueError("token prompts given as a list must be non-empty 1-D integer tensors, one per prompt")
        prompt_tokens = [p.long().cpu() for p in prompts]
    elif isinstance(prompts, Tensor):
        if prompts.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token prompts must be an integer tensor, got {prompts.dtype}")
        rows = prompts[None] if prompts.ndim == 1 else prompts
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise ValueError(f"token prompts must have shape [batch, pos] with pos > 0, got {tuple(prompts.shape)}")
        prompt_tokens = [row.long().cpu() for row in rows]
    else:
        prompt_strings = _as_list(prompts, "prompts")
        if not prompt_strings:
            raise ValueError("no prompts given: pass a string or a non-empty list of strings")
        for i, p in enumerate(prompt_strings):
            if not p.strip():
                raise ValueError(f"prompt {i} is empty: give the text the model should read")
        prompt_tokens = [model.to_tokens(p)[0].cpu() for p in prompt_strings]  # type: ignore[attr-defined]

    target_strings: list[str] | None = None
    target_tokens: list[Tensor] = [torch.empty(0, dtype=torch.long) for _ in prompt_tokens]
    if targets is None:
        if need_targets:
            raise ValueError(
                "no targets given: pass targets (one string per prompt, e.g. ' Paris') or a metric "
                "callable (logits, tokens) -> per-example loss"
            )
    else:
        target_strings = _as_list(targets, "targets")
        if len(target_strings) != len(prompt_tokens):
            raise ValueError(
                f"got {len(prompt_tokens)} prompts but {len(target_strings)} targets: give one target per prompt"
            )
        for i, t in enumerate(target_strings):
            if t == "":
                raise ValueError(f"target {i} is empty: give the answer the prompt should continue with, e.g. ' Paris'")
        target_tokens = [model.to_tokens(t, prepend_bos=False)[0].cpu() for t in target_strings]  # type: ignore[attr-defined]
        for i, t in enumerate(target_tokens):
            if t.numel() == 0:
                raise ValueError(f"target {i} ({target_strings[i]!r}) tokenizes to nothing")

    sequences = [torch.cat([p, t[:-1]]) for p, t in zip(prompt_tokens, target_tokens)]
    for i, (seq, t) in enumerate(zip(sequences, target_tokens)):
        if seq.numel() > spec.n_ctx:  # the model reads prompt + target[:-1]: the last target token is never input
            what = f" with its target minus its last token ({t.numel()} target tokens)" if target_strings else ""
            raise ValueError(
                f"prompt {i} is {seq.numel()} tokens{what}, longer than the model's context of "
                f"{spec.n_ctx} tokens: shorten it"
            )
    lengths = torch.tensor([s.numel() for s in sequences])
    tokens = torch.full((len(sequences), int(lengths.max())), _pad_id(model), dtype=torch.long)
    for i, seq in enumerate(sequences):
        tokens[i, : seq.numel()] = seq
    return Batch(
        tokens=tokens,
        lengths=lengths,
        prompt_lengths=torch.tensor([p.numel() for p in prompt_tokens]),
        targets=target_tokens,
        prompts=prompt_strings,
        target_strings=target_strings,
    )


def target_positions(batch: Batch) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
    """Where the default loss reads the logits: ``(row, position)`` of each target token.

    Target token ``j`` of example ``i`` is predicted at position ``prompt_length - 1 + j``
    of row ``i``; the two tensors list every target token of every example in order.
    """
    rows, cols = [], []
    for i, target in enumerate(batch.targets):
        start = int(batch.prompt_lengths[i]) - 1
        n = target.numel()
        rows += [i] * n
        cols += range(start, start + n)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def target_loss(
    logits: Float[Tensor, "batch pos vocab"] | Float[Tensor, "n 1 vocab"], batch: Batch, *, picked: bool = False
) -> Float[Tensor, " batch"]:
    """Cross-entropy of each example's target tokens, teacher-forced, summed over tokens.

    Computed per example in float32 (float64 for float64 models) and never averaged over the batch, so a batch gives
    the same gradients, example by example, as one prompt at a time.

    ``picked=True`` takes the logits of the :func:`target_positions` alone, in their
    order (``[n, 1, vocab]``, from a run under
    :func:`tl_reversed.core.engine.positions_hook`), instead of the full logits.

    All target positions are picked with one indexing operation: indexing example by
    example would make the backward pass add one logits-sized zero tensor per example
    (quadratic in the batch size).
    """
    rows, cols = target_positions(batch)
    device = logits.device
    if picked:
        if logits.shape[:2] != (rows.numel(), 1):
            raise ValueError(
                f"picked logits must have shape [{rows.numel()}, 1, vocab] (one row per target token), "
                f"got {tuple(logits.shape)}"
            )
        picked_logits = logits[:, 0]
    else:
        picked_logits = logits[rows.to(device), cols.to(device)]
    picked_logits = picked_logits if picked_logits.dtype == torch.float64 else picked_logits.float()
    ids = torch.cat([t.reshape(-1) for t in batch.targets]).to(device=device, dtype=torch.long)
    chosen = picked_logits.log_softmax(-1).gather(-1, ids[:, None])[:, 0]
    losses = torch.zeros(len(batch.targets), dtype=picked_logits.dtype, device=device)
    return losses.index_add(0, rows.to(device), -chosen)
