"""Segment masks (MAS): ids, masks, running and generating under them, RA under them.

Runs twice like test_core: TransformerBridge models, and with ``TL_REVERSED_LEGACY=1``
HookedTransformer models (tests marked ``bridge`` are deselected there).
"""

from __future__ import annotations

import pytest
import torch

from conftest import LEGACY, make_tiny
from tl_reversed.core.segments import PAD_ID, prefill_mask, segment_ids, tokenize_batch, tokenize_pieces

# --------------------------------------------------------------------------- ids and masks


def test_segment_ids_number_the_pieces_in_order():
    assert segment_ids([2, 3, 1]).tolist() == [0, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match=r"pieces \[1\] have \[0\] tokens: every segment needs at least one token"):
        segment_ids([2, 0])


def test_prefill_mask_by_hand():
    ids = torch.tensor([[0, 0, 1, 1], [0, 1, PAD_ID, PAD_ID]])
    mask = prefill_mask(ids, total_len=6).int()
    assert mask[0].tolist() == [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    assert mask[1].tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],  # padding rows see only themselves
        [0, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # generated tokens: the whole prompt, no padding, causal after it
        [1, 1, 0, 0, 1, 1],
    ]


def test_one_segment_per_token_is_causal_and_one_segment_is_full():
    n = 7
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(prefill_mask(torch.arange(n))[0], causal)
    assert torch.equal(prefill_mask(torch.zeros(n, dtype=torch.long))[0], torch.ones(n, n, dtype=torch.bool))
    after = prefill_mask(torch.zeros(3, dtype=torch.long), total_len=n)[0]
    assert torch.equal(after[3:], causal[3:])  # positions after the prompt never see later ones


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([0, 1, 0], r"row 0: segment id goes down from 1 to 0 at position 2; segments must come in order"),
        ([[0, -1, 1]], r"row 0: padding \(id -1\) at position 1 before prompt tokens; pad on the right"),
        ([[0, 0], [-1, -1]], r"row 1 is all padding"),
        ([0.0, 1.0], r"segment ids must be integers, got torch.float32"),
        ([0, -2], r"segment ids must be >= 0 \(padding: -1\)"),
    ],
)
def test_prefill_mask_rejects_bad_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        prefill_mask(torch.tensor(ids))


def test_prefill_mask_rejects_a_short_total_len():
    with pytest.raises(ValueError, match=r"total_len=2 is shorter than the prompt \(3 positions\)"):
        prefill_mask(torch.zeros(3, dtype=torch.long), total_len=2)


def test_tokenize_pieces_and_batch():
    model = make_tiny("gpt2")
    tokens, ids = tokenize_pieces(model, ["ab", "cde"])
    assert torch.equal(tokens, model.to_tokens("abcde")[0])  # one character per token
    assert ids.tolist() == [0, 0, 0, 1, 1, 1]  # BOS joins the first segment
    tokens, ids = tokenize_pieces(model, ["ab", "cde"], prepend_bos=False)
    assert ids.tolist() == [0, 0, 1, 1, 1] and len(tokens) == 5
    batch, batch_ids = tokenize_batch(model, [["ab", "cde"], ["x", "y"]])
    assert batch_ids.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, -1, -1, -1]]
    assert torch.equal(batch[1, :3], model.to_tokens("xy")[0])
    assert batch[1, 3:].tolist() == [model.tokenizer.pad_token_id] * 3
    with pytest.raises(ValueError, match=r"pieces \[1\] \(\[''\]\) tokenize to nothing"):
        tokenize_pieces(model, ["ab", ""])
    with pytest.raises(ValueError, match=r"pieces must be a non-empty list of strings"):
        tokenize_pieces(model, "ab")
