"""Segment-by-segment prefill masks (MAS: Katz, Ringel, Romano & Wolf, ACL 2025).

A prompt is cut into segments (for a chat prompt: the system prompt, then the user
turn). During prefill every prompt token attends to every token of its own segment and
of the earlier segments; the tokens after the prompt (the generated ones) stay causal
and see the whole prompt. Segments are given by *segment ids*, one per token::

    pieces  ["<bos>You are kind.", " Hi there"]     (BOS joins the first piece)
    ids     [0, 0, 0, 0, 0, 1, 1, 1]               (one id per token, in order)
    mask    query i may see key j  iff  ids[j] <= ids[i]

One segment per token (``ids = 0..n-1``) is the causal mask; one segment for the whole
prompt is bidirectional prefill. Padding (right-padded batches) has id ``-1``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_reversed.core.architecture import attn_hook, describe, repeat_kv
from tl_reversed.core.attention_seams import mask_route
from tl_reversed.core.inputs import Batch
from tl_reversed.core.state import model_lock

PAD_ID = -1
"""The segment id of padding positions."""

_active: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # models inside segment_attention


def segment_ids(lengths: Sequence[int]) -> Int[Tensor, "pos"]:
    """Segment ids for pieces of the given token counts: ``segment_ids([2, 3]) == [0, 0, 1, 1, 1]``.

    Raises:
        ValueError: a count below 1 (an empty segment has no token to carry its id).
    """
    counts = [int(n) for n in lengths]
    if not counts:
        raise ValueError("segment_ids needs at least one piece: pass the token count of each prompt piece")
    empty = [i for i, n in enumerate(counts) if n < 1]
    if empty:
        raise ValueError(
            f"pieces {empty} have {[counts[i] for i in empty]} tokens: every segment needs at least one token "
            "(drop empty pieces or merge them into a neighbour)"
        )
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def tokenize_pieces(
    model: object, pieces: Sequence[str], prepend_bos: bool = True
) -> tuple[Int[Tensor, "pos"], Int[Tensor, "pos"]]:
    """Tokens and segment ids of one prompt given as text pieces, one segment per piece.

    Each piece is tokenized on its own (no BOS) and the tokens are concatenated, so a
    segment boundary never falls inside a token; with ``prepend_bos`` the model's BOS
    token is put first and joins the first segment. A tokenizer may split the joined
    text differently at the boundaries than the pieces alone.

    Returns:
        ``(tokens, ids)``, both ``[pos]`` on the model's device.

    Raises:
        ValueError: no pieces, or a piece that tokenizes to nothing (an empty string).
    """
    if isinstance(pieces, str) or not pieces:
        raise ValueError("pieces must be a non-empty list of strings, one per segment (e.g. [system, user])")
    parts = [model.to_tokens(piece, prepend_bos=False)[0] for piece in pieces]  # type: ignore[attr-defined]
    lengths = [len(p) for p in parts]
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise ValueError(
            f"pieces {empty} ({[pieces[i] for i in empty]!r}) tokenize to nothing: every segment needs a token"
        )
    if prepend_bos:
        bos = getattr(model.tokenizer, "bos_token_id", None)  # type: ignore[attr-defined]
        if bos is None:
            raise ValueError("this model's tokenizer has no BOS token: call tokenize_pieces(..., prepend_bos=False)")
        parts.insert(0, torch.tensor([bos], dtype=parts[0].dtype, device=parts[0].device))
        lengths[0] += 1
    tokens = torch.cat(parts)
    return tokens, segment_ids(lengths).to(tokens.device)


def chat_pieces(model: object, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[str]:
    """Prompt pieces from a chat: one piece per turn, rendered by the tokenizer's chat template.

    Piece ``k`` is the text the template adds for ``messages[k]`` (rendering the first
    ``k + 1`` turns minus rendering the first ``k``); the generation prompt (e.g.
    ``"<|im_start|>assistant\\n"``) joins the last piece. Templates usually start with the
    BOS text themselves: tokenize the pieces with ``tokenize_pieces(..., prepend_bos=False)``.

    Raises:
        ValueError: no turns, no chat template, or a template whose rendering of fewer turns
            is not the start of its rendering of more (the turns cannot be cut apart).
    """
    tokenizer = getattr(model, "tokenizer", None)
    if not messages:
        raise ValueError("messages is empty: give the chat turns, e.g. [{'role': 'system', 'content': ...}, ...]")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template: give the pieces yourself")
    texts = [""] + [
        tokenizer.apply_chat_template(  # type: ignore[union-attr]
            list(messages[: k + 1]), tokenize=False, add_generation_prompt=add_generation_prompt and k == len(messages) - 1
        )
        for k in range(len(messages))
    ]
    for k in range(1, len(texts)):
        if not texts[k].startswith(texts[k - 1]):
            raise ValueError(
                f"the chat template renders turns 0..{k - 2} as text that does not start turns 0..{k - 1}: "
                "the turns cannot be cut into pieces; give the pieces yourself"
            )
    return [texts[k][len(texts[k - 1]) :] for k in range(1, len(texts))]


def tokenize_batch(
    model: object, prompts: Sequence[Sequence[str]], prepend_bos: bool = True
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Tokens and segment ids of several prompts (each a list of pieces), right-padded.

    Padding positions hold the tokenizer's pad token (or 0 without one) and segment id
    ``-1`` (:data:`PAD_ID`).
    """
    if isinstance(prompts, str) or not prompts or any(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of prompts, each a list of pieces, e.g. [[system, user], ...]")
    rows = [tokenize_pieces(model, pieces, prepend_bos) for pieces in prompts]
    width = max(len(t) for t, _ in rows)
    pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    tokens = torch.full((len(rows), width), pad, dtype=rows[0][0].dtype, device=rows[0][0].device)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long, device=rows[0][0].device)
    for i, (t, s) in enumerate(rows):
        tokens[i, : len(t)] = t
        ids[i, : len(s)] = s
    return tokens, ids


def check_ids(ids: Tensor) -> Int[Tensor, "batch pos"]:
    """``ids`` as a ``[batch, pos]`` long tensor, checked: each row's ids never decrease and
    padding (``-1``) comes only after the prompt (right padding).

    Raises:
        ValueError: with the row and position of the first problem.
    """
    ids = torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"segment ids must be integers, got {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"segment ids must be [pos] or [batch, pos] with pos >= 1, got shape {tuple(ids.shape)}")
    ids = ids.long()
    if bool((ids < PAD_ID).any()):
        raise ValueError("segment ids must be >= 0 (padding: -1)")
    pad = ids == PAD_ID
    late = pad[:, :-1] & ~pad[:, 1:]
    if bool(late.any()):
        row, pos = (int(v) for v in late.nonzero()[0])
        raise ValueError(f"row {row}: padding (id -1) at position {pos} before prompt tokens; pad on the right")
    if bool(pad[:, 0].any()):
        raise ValueError(f"row {int(pad[:, 0].nonzero()[0])} is all padding: every prompt needs a token")
    back = (ids[:, 1:] < ids[:, :-1]) & ~pad[:, 1:]
    if bool(back.any()):
        row, pos = (int(v) for v in back.nonzero()[0])
        raise ValueError(
            f"row {row}: segment id goes down from {int(ids[row, pos])} to {int(ids[row, pos + 1])} at position "
            f"{pos + 1}; segments must come in order (ids never decrease along the prompt)"
        )
    return ids


def prefill_mask(ids: Int[Tensor, "batch pos"], total_len: int | None = None) -> Bool[Tensor, "batch query key"]:
    """The attention mask that segment ids imply: True where a query may attend to a key.

    With ``P = ids.shape[-1]`` prompt positions and ``T = total_len`` (default ``P``):

    * prompt query ``q < P`` with ``ids[q] >= 0``: key ``k`` is allowed iff ``k < P``,
      ``ids[k] >= 0`` and ``ids[k] <= ids[q]`` (its own segment, whole, and the earlier ones);
    * query ``q >= P`` (a generated token): causal, and sees the whole prompt: every
      ``k <= q`` except padding keys;
    * padding keys (id -1) are never seen; a padding query row sees only itself, so its
      softmax stays finite (its outputs mean nothing).

    Args:
        ids: ``[batch, pos]`` (or ``[pos]``) segment ids, non-decreasing, right-padded with -1.
        total_len: the sequence length the mask covers, ``>= pos`` (prompt plus generated tokens).

    Returns:
        ``[batch, total_len, total_len]`` booleans on the device of ``ids``.
    """
    ids = check_ids(ids)
    P = ids.shape[1]
    T = P if total_len is None else int(total_len)
    if T < P:
        raise ValueError(f"total_len={T} is shorter than the prompt ({P} positions): pass total_len >= {P}")
    after = int(ids.max()) + 1 + torch.arange(T - P, device=ids.device)  # generated tokens: one segment each
    seg = torch.cat([ids, after.expand(ids.shape[0], T - P)], dim=1)
    pos = torch.arange(T, device=ids.device)
    real = seg >= 0
    mask = (seg[:, None, :] <= seg[:, :, None]) & real[:, None, :] & real[:, :, None]
    return mask | (~real[:, :, None] & (pos[:, None] == pos[None, :]))


def _rows(
    ids: Tensor, batch: int, n_query: int, allowed: Bool[Tensor, "b query key"]
) -> Bool[Tensor, "batch query key"]:
    """The segment mask for the last ``n_query`` of ``key = allowed.shape[-1]`` positions, given
    what the model itself allows there (its causal rule, sliding window and padding).

    Keys at or before the query: allowed iff the segment mask and the model both allow them
    (so a sliding window still drops keys too far back); keys after the query (inside the
    query's segment): as the segment mask says.
    """
    n_key = allowed.shape[-1]
    if ids.shape[0] not in (1, batch):
        raise ValueError(f"segment ids are for {ids.shape[0]} prompts, but the model runs a batch of {batch}")
    if n_key < ids.shape[1]:
        raise ValueError(
            f"the model runs {n_key} positions but the segment ids cover a prompt of {ids.shape[1]}: "
            "pass ids for the tokens this forward runs (the prompt, optionally followed by generated tokens)"
        )
    seg = prefill_mask(ids.to(allowed.device), total_len=n_key)[:, n_key - n_query :]
    query = torch.arange(n_key - n_query, n_key, device=allowed.device)
    future = torch.arange(n_key, device=allowed.device)[None, :] > query[:, None]
    return seg & (allowed | future)


def _model_allows(mask: Tensor | None, n_query: int, n_key: int, device: torch.device) -> Tensor:
    """What the model's own ``attention_mask`` argument of an attention module allows ``[b, query, key]``."""
    causal = torch.ones(n_key, n_key, dtype=torch.bool, device=device).tril()[n_key - n_query :][None]
    if mask is None:
        return causal
    if mask.ndim == 2:  # a [batch, key] padding mask: the module adds the causal rule
        return causal & mask.bool()[:, None, :n_key]
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return allowed[:, 0, -n_query:, :n_key]


def _kwarg_hook(source: Callable[[], Tensor]):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if len(args) > 1 or not isinstance(hidden, Tensor):
            raise TypeError(
                f"segment_attention needs {type(module).__name__} called with hidden_states first and attention_mask "
                f"by keyword; it got {len(args)} positional arguments: this architecture is not supported"
            )
        own = kwargs.get("attention_mask")
        n_key = own.shape[-1] if isinstance(own, Tensor) and own.ndim == 4 else hidden.shape[1]
        position = kwargs.get("cache_position")
        if isinstance(position, Tensor) and position.numel():
            n_key = max(n_key, int(position[-1]) + 1)
        allowed = _model_allows(own, hidden.shape[1], n_key, hidden.device)
        allowed = _rows(source(), hidden.shape[0], hidden.shape[1], allowed)
        additive = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        kwargs["attention_mask"] = additive.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[:, None]
        return args, kwargs

    return hook


def _score_hooks(model: Any, source: Callable[[], Tensor]) -> list[tuple[str, Any]]:
    """HookedTransformer: recompute each layer's scores from its (post-rotary) q and k, then mask them."""
    route, scales = mask_route(model), describe(model).scales
    hooks: list[tuple[str, Any]] = []
    for layer in range(len(scales)):
        seen: dict[str, Tensor] = {}

        def keep(x: Tensor, hook: Any, name: str, seen: dict[str, Tensor] = seen) -> None:
            seen[name] = x

        def scores(
            x: Float[Tensor, "batch head query key"], hook: Any, seen: dict[str, Tensor] = seen, scale: float = scales[layer]
        ) -> Tensor:
            q, k = seen.pop("q"), repeat_kv(seen.pop("k"), x.shape[1])
            raw = einops.einsum(q, k, "b q h d, b k h d -> b h q k") * scale
            if route.softcap:
                raw = route.softcap * torch.tanh(raw / route.softcap)
            allowed = _rows(source(), x.shape[0], x.shape[2], ~torch.isneginf(x[:, 0]))
            return raw.to(x.dtype).masked_fill(~allowed[:, None], float("-inf"))

        hooks += [
            (attn_hook(layer, route.q_hook), lambda x, hook, f=keep: f(x, hook, "q")),
            (attn_hook(layer, route.k_hook), lambda x, hook, f=keep: f(x, hook, "k")),
            (attn_hook(layer, "attn_scores"), scores),
        ]
    return hooks


@contextmanager
def segment_attention(model: Any, ids: Int[Tensor, "batch pos"]) -> Iterator[None]:
    """Run every forward of ``model`` under the segment mask of ``ids`` (:func:`prefill_mask`).

    Inside the block, a forward over ``T >= pos`` positions attends as :func:`prefill_mask`
    ``(ids, T)`` says, intersected with what the model itself allows behind each query
    (a sliding window, a padding mask passed to the model): prompt tokens see their own
    segment whole and the earlier segments; positions after the prompt stay causal.
    ``ids`` is ``[pos]`` (every prompt of the batch) or ``[batch, pos]`` (right-padded, -1
    for padding, which no query sees). Training works too: nothing is frozen.

    How (see :func:`tl_reversed.core.attention_seams.mask_route`): on a TransformerBridge a
    forward pre-hook on each attention module hands it the 4-D mask as ``attention_mask``;
    on a HookedTransformer, which masks before ``hook_attn_scores``, the scores are
    recomputed there from the post-rotary q and k and masked. Every hook is removed on
    exit, also after an exception. The model's lock is held throughout.

    Raises:
        TypeError: an architecture whose mask cannot be replaced.
        ValueError: bad ids (:func:`check_ids`), or already inside ``segment_attention``.
    """
    ids = check_ids(ids)
    with masked_by(model, lambda: ids):
        yield


@contextmanager
def masked_by(model: Any, source: Callable[[], Tensor]) -> Iterator[None]:
    """:func:`segment_attention` with the ids read from ``source()`` at every forward (checked ids)."""
    route = mask_route(model)
    with model_lock(model), ExitStack() as stack:
        if model in _active:
            raise ValueError("this model is already inside segment_attention: leave it before entering another")
        _active.add(model)
        stack.callback(_active.discard, model)
        if route.kind == "scores":
            stack.enter_context(model.hooks(fwd_hooks=_score_hooks(model, source)))
        else:
            for block in model.blocks:
                handle = block.attn.register_forward_pre_hook(_kwarg_hook(source), with_kwargs=True)
                stack.callback(handle.remove)
        yield


# --------------------------------------------------------------------------- a pass of the engine under the mask


def prompt_ids(segments: Tensor, batch: Batch) -> Int[Tensor, "batch pos"]:
    """The segment ids of each row's prompt, ``[batch, pos]`` over the batch's width, -1 after the prompt.

    ``segments`` is ``[pos]`` (one prompt length for every row) or ``[batch, pos]``
    (right-padded with -1), one id per prompt token as the batch tokenized it.
    """
    ids = check_ids(segments).to(batch.tokens.device)
    n, width = batch.tokens.shape
    if ids.shape[0] == 1 and n > 1:
        ids = ids.expand(n, -1)
    if ids.shape[0] != n:
        raise ValueError(f"segments has {ids.shape[0]} rows of ids for {n} prompts: give one row per prompt")
    out = torch.full((n, width), PAD_ID, dtype=torch.long, device=ids.device)
    for i in range(n):
        real, prompt = int((ids[i] >= 0).sum()), int(batch.prompt_lengths[i])
        if real != prompt:
            raise ValueError(
                f"segments row {i} has {real} ids but prompt {i} has {prompt} tokens: give one id per prompt "
                "token (tokenize the pieces with tokenize_pieces and pass its tokens as the prompt)"
            )
        out[i, :prompt] = ids[i, :prompt]
    return out


def unpad(prompts: Any, segments: Tensor) -> Any:
    """Right-padded token prompts ``[batch, pos]`` as a list of rows without their padding
    (where ``segments`` is -1); anything else unchanged."""
    if not isinstance(prompts, Tensor) or prompts.ndim != 2 or torch.as_tensor(segments).shape != prompts.shape:
        return prompts
    ids = torch.as_tensor(segments)
    return [row[: int((seg >= 0).sum())] for row, seg in zip(prompts, ids)]


def run_ids(prompt: Int[Tensor, "batch pos"], lengths: Int[Tensor, " batch"]) -> Int[Tensor, "batch pos"]:
    """Ids for a whole pass: each row's prompt ids, then one fresh id per later real token
    (they attend causally and see the whole prompt), then -1 on padding."""
    out = prompt.clone()
    width = prompt.shape[1]
    for i in range(prompt.shape[0]):
        start, stop = int((prompt[i] >= 0).sum()), int(lengths[i])
        out[i, start:stop] = int(prompt[i].max()) + 1 + torch.arange(stop - start, device=out.device)
    return out[:, :width]


class SegmentSink:
    """A pass-engine sink that collects nothing: it hands each chunk's rows of ``ids`` to the mask.

    Run the pass inside ``masked_by(model, sink.current)``; the engine calls ``hooks`` before
    each chunk's forward, which points the mask at that chunk's rows.
    """

    def __init__(self, ids: Int[Tensor, "batch pos"]):
        self.ids, self._now = ids, ids

    def current(self) -> Tensor:
        return self._now

    def hooks(self, chunk: Any) -> tuple[list, list]:
        self._now = self.ids[chunk.index, : chunk.batch.tokens.shape[1]]
        return [], []

    def merge(self, chunk: Any) -> None:
        return None

    def finish(self) -> None:
        return None
