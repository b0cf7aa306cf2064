"""Greedy generation after a prefill under a segment mask (MAS).

:func:`generate` tokenizes the prompt pieces (:func:`tl_reversed.core.segments.tokenize_pieces`),
then decodes greedily inside :func:`tl_reversed.core.segments.segment_attention`: the
prompt attends segment by segment, every generated token causally (it sees the whole
prompt and the tokens generated before it). Each step recomputes the whole sequence
under the mask, so a step's logits are exactly those of one pass over the final sequence.

No key-value cache: on TransformerLens 4.3 the bridge's manual cache
(``return_type="logits_and_cache"``, then ``past_key_values=``) did not reproduce a full
recompute for the bridge's own attention even without a segment mask (tiny float64
Llama, GPT-2 and Gemma 3: next-token logits off by 0.16 to 0.57; OPT and GPT-J, whose
attention Hugging Face runs, agreed to 1e-10), so correctness comes first here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_reversed.core.results import Result
from tl_reversed.core.segments import prefill_mask, segment_attention, tokenize_pieces
from tl_reversed.core.state import untouched


@dataclass
class SegmentGeneration(Result):
    """A prompt prefilled under a segment mask and its greedy continuation.

    Attributes:
        pieces: the prompt pieces, one segment each.
        tokens: ``[pos]`` the prompt tokens, then the generated ones.
        segment_ids: ``[prompt_pos]`` the prompt's segment ids (BOS in segment 0).
        logprobs: ``[new]`` log-probability of each generated token when it was chosen.
        str_tokens: every token of ``tokens`` as a string.
        text: the generated text (the new tokens decoded).
    """

    pieces: list[str]
    tokens: Int[Tensor, " pos"]
    segment_ids: Int[Tensor, " prompt_pos"]
    logprobs: Float[Tensor, " new"]
    str_tokens: list[str]
    text: str

    @property
    def prompt_length(self) -> int:
        return int(self.segment_ids.shape[0])

    @property
    def new_tokens(self) -> Int[Tensor, " new"]:
        """The generated tokens."""
        return self.tokens[self.prompt_length :]

    def mask(self) -> torch.Tensor:
        """``[pos, pos]`` the mask the last step ran under (True: the query may attend to the key)."""
        return prefill_mask(self.segment_ids, total_len=len(self.tokens))[0]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per token: position, token id and string, segment (-1 for generated), logprob (NaN in the prompt)."""
        n, p = len(self.tokens), self.prompt_length
        logprob = torch.full((n,), float("nan"), dtype=torch.float64)
        logprob[p:] = self.logprobs.double()
        return pd.DataFrame(
            {
                "position": range(n),
                "token": self.tokens.tolist(),
                "str_token": self.str_tokens,
                "segment": self.segment_ids.tolist() + [-1] * (n - p),
                "generated": [i >= p for i in range(n)],
                "logprob": logprob.numpy(),
            }
        )

    def plot(self, **kwargs: object):
        """The attention mask of the prompt and the generated tokens, with the segment boundaries."""
        from tl_reversed.views.segments import plot_segment_mask

        return plot_segment_mask(self.mask(), self.str_tokens, self.segment_ids, **kwargs)


def generate(
    model: torch.nn.Module,
    pieces: Sequence[str],
    max_new_tokens: int,
    *,
    prepend_bos: bool = True,
    stop_at_eos: bool = True,
) -> SegmentGeneration:
    """Prefill ``pieces`` under their segment mask and continue greedily, causally.

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        pieces: the prompt, one string per segment (e.g. ``[instruction, question]``).
        max_new_tokens: how many tokens to generate at most (>= 1).
        prepend_bos: put the model's BOS token first (it joins the first segment).
        stop_at_eos: stop after the tokenizer's end-of-sequence token.

    Returns:
        A :class:`SegmentGeneration` (``text``, ``tokens``, ``to_dataframe()``, ``plot()``).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    tokens, ids = tokenize_pieces(model, pieces, prepend_bos)
    n_ctx = int(model.cfg.n_ctx)  # type: ignore[attr-defined]
    if len(tokens) + max_new_tokens > n_ctx:
        raise ValueError(
            f"the prompt has {len(tokens)} tokens; with {max_new_tokens} new ones it exceeds the model's "
            f"context of {n_ctx}: lower max_new_tokens or shorten the prompt"
        )
    eos = getattr(model.tokenizer, "eos_token_id", None) if stop_at_eos else None  # type: ignore[attr-defined]
    sequence, logprobs = tokens, []
    with untouched(model), torch.no_grad(), segment_attention(model, ids):
        for _ in range(max_new_tokens):
            logits = model(sequence[None])[0, -1].double()
            token = logits.argmax()
            logprobs.append(torch.log_softmax(logits, dim=-1)[token])
            sequence = torch.cat([sequence, token[None].to(sequence.dtype)])
            if eos is not None and int(token) == int(eos):
                break
    new = sequence[len(tokens) :]
    return SegmentGeneration(
        pieces=list(pieces),
        tokens=sequence.cpu(),
        segment_ids=ids.cpu(),
        logprobs=torch.stack(logprobs).cpu(),
        str_tokens=[str(t) for t in model.to_str_tokens(sequence)],  # type: ignore[attr-defined]
        text=model.tokenizer.decode(new.tolist()),  # type: ignore[attr-defined]
    )
