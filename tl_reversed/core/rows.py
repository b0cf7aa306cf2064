"""Query rows of RA maps, and one layer's RA reduced to norms and kept rows in query tiles.

``reversed_attention(..., query_positions=...)`` keeps, instead of whole
``[query_pos, key_pos]`` maps, the rows of chosen query positions:

* ``"last"``: each example's last prompt token (the position that predicts the first
  target token, where the answer is read);
* ``"targets"``: every position that predicts a target token (``prompt_length - 1`` up to
  ``prompt_length - 2 + n_target_tokens``), so examples may keep different numbers of rows;
* a list of positions, the same for every example (each below every example's length).

One RA row depends only on that row of the pattern and of ``grad(hook_z)``
(``RA[q] = A[q] * (G[q] - A[q].G[q]) * c`` with ``G[q] = dZ[q] V^T``), so kept rows cost
O(tokens) per head and are exactly the matching rows of the full maps.

:func:`reduce_layer` turns one layer's pattern, values and ``grad(hook_z)`` into RA norms
(and maps or rows) without building more than one query tile of RA at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_reversed.core.inputs import Batch

QueryPositions = str | Sequence[int] | None
"""``None`` (whole maps), ``"last"``, ``"targets"`` or a list of query positions."""

QUERY_POSITION_NAMES = ("last", "targets")

TILE_ELEMENTS = 2**22
"""Elements of RA (rows x heads x keys x examples) computed at once when reducing a layer."""


def query_rows(query_positions: QueryPositions, batch: Batch) -> Int[Tensor, "batch row"] | None:
    """The query positions kept for each example, ``-1`` where an example keeps fewer rows.

    ``None`` keeps every row (returns ``None``). Raises ``ValueError`` for an empty list,
    a negative position, a position at or beyond an example's length, or ``"targets"``
    without targets.
    """
    if query_positions is None:
        return None
    n = len(batch)
    if isinstance(query_positions, str):
        if query_positions == "last":
            return batch.last[:, None].clone()
        if query_positions == "targets":
            if any(t.numel() == 0 for t in batch.targets):
                raise ValueError(
                    "query_positions='targets' needs targets (the positions that predict them); with a metric, "
                    "pass 'last' or a list of positions"
                )
            width = max(t.numel() for t in batch.targets)
            rows = torch.full((n, width), -1, dtype=torch.long)
            for i, t in enumerate(batch.targets):
                start = int(batch.prompt_lengths[i]) - 1
                rows[i, : t.numel()] = torch.arange(start, start + t.numel())
            return rows
        raise ValueError(f"query_positions must be None, 'last', 'targets' or a list of positions, got {query_positions!r}")
    if isinstance(query_positions, Tensor):
        query_positions = query_positions.flatten().tolist()
    if not isinstance(query_positions, Sequence):
        raise TypeError(
            f"query_positions must be None, 'last', 'targets' or a list of positions, got {type(query_positions).__name__}"
        )
    positions = list(query_positions)
    if not positions:
        raise ValueError("query_positions is an empty list: give at least one query position, or None for whole maps")
    bad = [p for p in positions if isinstance(p, bool) or not isinstance(p, int)]
    if bad:
        raise TypeError(f"query_positions must be integers, got {bad}")
    negative = [p for p in positions if p < 0]
    if negative:
        raise ValueError(f"query positions {negative} are negative: count positions from 0 (the first token)")
    shortest = int(batch.lengths.min())
    beyond = [p for p in positions if p >= shortest]
    if beyond:
        raise ValueError(
            f"query positions {beyond} are beyond the prompt: the shortest example has {shortest} tokens "
            f"(positions 0..{shortest - 1}: its prompt, then its target tokens but the last)"
        )
    return torch.tensor(positions, dtype=torch.long)[None].expand(n, -1).clone()


def reduce_layer(
    pattern: Float[Tensor, "batch head query_pos key_pos"],
    v: Float[Tensor, "batch key_pos kv_head d_head"],
    grad_z: Float[Tensor, "batch query_pos head d_head"],
    scale: float,
    lengths: Int[Tensor, " batch"],
    rows: Int[Tensor, "batch row"] | None,
    keep_maps: bool,
    tile: int | None = None,
) -> dict[str, Tensor]:
    """One layer's RA as norms ``[batch, head]`` (and maps), on the CPU, in the accumulation dtype.

    With ``rows=None`` the norms are those of the whole maps (real tokens only) and the
    maps ``[batch, head, query_pos, key_pos]``; RA is built ``tile`` query rows at a time.
    With ``rows`` the norms are those of the kept rows and the maps
    ``[batch, head, row, key_pos]`` (zero where ``rows`` is ``-1``). ``pattern_norms`` and
    ``pattern`` follow the same rule.
    """
    from tl_reversed.core.reversed_attention import accumulation_dtype, ra_from_parts

    n, n_heads, width, _ = pattern.shape
    dtype = accumulation_dtype(grad_z.dtype)
    lengths = lengths.to(pattern.device)
    key_real = (torch.arange(width, device=pattern.device)[None] < lengths[:, None]).to(dtype)[:, None, None]
    out: dict[str, Tensor] = {}
    if rows is not None:
        index = rows.to(pattern.device)
        kept = (index >= 0).to(dtype)[:, None, :, None]
        picked = index.clamp_min(0)
        every = torch.arange(n, device=pattern.device)[:, None]
        a = pattern[every, :, picked].transpose(1, 2)  # [batch, head, row, key]
        ra = ra_from_parts(a, v, grad_z[every, picked], scale) * kept * key_real
        forward = a.to(dtype) * kept * key_real
        out["norms"] = ra.flatten(-2).norm(dim=-1).cpu()
        out["pattern_norms"] = forward.flatten(-2).norm(dim=-1).cpu()
        if keep_maps:
            out["maps"], out["pattern"] = ra.cpu(), forward.cpu()
        return out
    step = tile or max(1, TILE_ELEMENTS // max(1, n * n_heads * width))
    squares = torch.zeros(n, n_heads, dtype=dtype, device=pattern.device)
    pattern_squares = torch.zeros_like(squares)
    if keep_maps:
        out["maps"] = torch.zeros(n, n_heads, width, width, dtype=dtype)
        out["pattern"] = torch.zeros_like(out["maps"])
    for start in range(0, width, step):
        stop = min(width, start + step)
        query_real = (torch.arange(start, stop, device=pattern.device)[None] < lengths[:, None]).to(dtype)
        mask = query_real[:, None, :, None] * key_real
        a = pattern[:, :, start:stop]
        ra = ra_from_parts(a, v, grad_z[:, start:stop], scale) * mask
        forward = a.to(dtype) * mask
        squares += ra.square().sum((-2, -1))
        pattern_squares += forward.square().sum((-2, -1))
        if keep_maps:
            out["maps"][:, :, start:stop] = ra.cpu()
            out["pattern"][:, :, start:stop] = forward.cpu()
    out["norms"] = squares.sqrt().cpu()
    out["pattern_norms"] = pattern_squares.sqrt().cpu()
    return out


class TileReducer:
    """One layer's RA reduced tile by tile from the pattern and ``dL/dA`` the tiled backward hands over.

    The same numbers as :func:`reduce_layer` (norms of real tokens, maps or kept rows),
    from ``add(start, pattern, grad_pattern, grad_out, values)`` calls of query rows
    ``start:start + tile`` (pattern and ``dL/dA`` ``[batch, head, tile, key_pos]``, the tile's
    ``dZ`` and the per-head values; see :mod:`tl_reversed.core.tiled_attention`);
    ``finish()`` passes the dict :func:`reduce_layer` returns to ``done``. Where
    :meth:`take_grad` was given the gradient at ``hook_z`` and it differs from the
    attention output's (an edit at ``hook_z``), ``dL/dA`` is rebuilt from it.
    """

    def __init__(
        self,
        lengths: Int[Tensor, " batch"],
        rows: Int[Tensor, "batch row"] | None,
        keep_maps: bool,
        scale: float,
        done,
    ):
        self.lengths, self.rows, self.keep_maps, self.scale, self.done = lengths, rows, keep_maps, scale, done
        self.parts: dict[str, Tensor] = {}
        self.grad_z: Tensor | None = None

    def _start(self, pattern: Tensor) -> None:
        n, n_heads, _, width = pattern.shape
        dtype, device = pattern.dtype, pattern.device
        self.lengths = self.lengths.to(device)
        self.key_real = (torch.arange(width, device=device)[None] < self.lengths[:, None]).to(dtype)[:, None, None]
        self.parts["squares"] = torch.zeros(n, n_heads, dtype=dtype, device=device)
        self.parts["pattern_squares"] = torch.zeros_like(self.parts["squares"])
        n_rows = width if self.rows is None else self.rows.shape[1]
        if self.rows is not None:
            self.rows = self.rows.to(device)
        if self.keep_maps or self.rows is not None:  # kept rows are gathered on the device, then reduced
            where = "cpu" if self.rows is None else device
            self.parts["maps"] = torch.zeros(n, n_heads, n_rows, width, dtype=dtype, device=where)
            self.parts["pattern"] = torch.zeros_like(self.parts["maps"])

    def take_grad(self, grad_z: Float[Tensor, "batch query_pos head d_head"]) -> None:
        """The gradient at ``hook_z`` (a backward hook's view, after any edit made there)."""
        self.grad_z = grad_z.detach()

    def add(self, start: int, pattern: Tensor, grad_pattern: Tensor, grad_out: Tensor, values: Tensor) -> None:
        if not self.parts:
            self._start(pattern)
        stop = start + pattern.shape[2]
        hooked = None if self.grad_z is None else self.grad_z[:, start:stop].transpose(1, 2).to(grad_out.dtype)
        if hooked is not None and not torch.equal(hooked, grad_out):
            # an edit at hook_z (e.g. a head ablated there) makes dL/dZ differ from the gradient at
            # hook_z; RA is defined from the latter on every path (G = grad(hook_z) V^T)
            grad_pattern = hooked @ values.transpose(-1, -2)
        if self.rows is None:
            query_real = (torch.arange(start, stop, device=pattern.device)[None] < self.lengths[:, None]).to(pattern.dtype)
            mask = query_real[:, None, :, None] * self.key_real
            ra = pattern * (grad_pattern - (pattern * grad_pattern).sum(-1, keepdim=True)) * self.scale * mask
            forward = pattern * mask
            self.parts["squares"] += ra.square().sum((-2, -1))
            self.parts["pattern_squares"] += forward.square().sum((-2, -1))
            if self.keep_maps:
                self.parts["maps"][:, :, start:stop] = ra.cpu()
                self.parts["pattern"][:, :, start:stop] = forward.cpu()
            return
        inside = (self.rows >= start) & (self.rows < stop)  # [batch, row]: kept rows in this tile
        if not bool(inside.any()):
            return
        every = torch.arange(pattern.shape[0], device=pattern.device)[:, None]
        local = (self.rows - start).clamp(0, stop - start - 1)
        a = pattern[every, :, local].transpose(1, 2)  # [batch, head, row, key]
        g = grad_pattern[every, :, local].transpose(1, 2)
        ra = a * (g - (a * g).sum(-1, keepdim=True)) * self.scale * self.key_real
        keep = inside[:, None, :, None]
        self.parts["maps"] = torch.where(keep, ra, self.parts["maps"])
        self.parts["pattern"] = torch.where(keep, a * self.key_real, self.parts["pattern"])

    def finish(self) -> None:
        parts = self.parts
        if self.rows is not None:
            parts["squares"] = parts["maps"].flatten(-2).square().sum(-1)
            parts["pattern_squares"] = parts["pattern"].flatten(-2).square().sum(-1)
        out = {"norms": parts["squares"].sqrt().cpu(), "pattern_norms": parts["pattern_squares"].sqrt().cpu()}
        if self.keep_maps:
            out["maps"], out["pattern"] = parts["maps"].cpu(), parts["pattern"].cpu()
        self.parts, self.grad_z = {}, None
        self.done(out)
