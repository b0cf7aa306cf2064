"""The results of the backward lens: :class:`BackwardLens`, :class:`TopTokens`, :class:`LensAndRA`
and :class:`GradientRank`.

What they hold is defined in :mod:`tl_reversed.lens.backward_lens` (sign, projections);
the figures and the HTML page are drawn by :mod:`tl_reversed.views.lens`, imported
only when :meth:`BackwardLens.plot` or :meth:`BackwardLens.to_html` is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from jaxtyping import Float, Int
from torch import Tensor

from tl_reversed.core.options import DIRECTIONS, Direction, check_option
from tl_reversed.core.results import Result
from tl_reversed.core.reversed_attention import ReversedAttention

@dataclass
class TopTokens(Result):
    """What a set of VJPs pushes toward and away from, in the vocabulary.

    Leading axes are those of the vectors (``[batch, site, layer, pos]`` for sites,
    ``[batch, layer, head, pos]`` for heads); the last axis is the ``k`` tokens, best first.

    Attributes:
        toward_ids, toward_values: the tokens whose logits a descent step (``-VJP``) raises
            most, and by how much per unit step (positive numbers).
        away_ids, away_values: the tokens whose logits it lowers most, and by how much
            (positive numbers: the logit falls by that much).
        target_rank: rank (1 = first) of each example's first target token among the
            pushed-toward tokens, or None where a metric replaced the targets.

    Padding positions, and VJPs that are exactly zero (no path from there to the loss,
    e.g. the last layer at positions before the target), hold id -1, value NaN and rank 0.
    """

    toward_ids: Int[Tensor, "... k"]
    toward_values: Float[Tensor, "... k"]
    away_ids: Int[Tensor, "... k"]
    away_values: Float[Tensor, "... k"]
    target_rank: Int[Tensor, "..."] | None = None

    def to_dataframe(self) -> pd.DataFrame:
        """One row per vector and rank: its index along the leading axes, ``rank`` (0 = best), ids and values."""
        shape = self.toward_ids.shape
        index = np.indices(shape).reshape(len(shape), -1).T
        frame = pd.DataFrame(index[:, :-1], columns=[f"axis{i}" for i in range(len(shape) - 1)])
        frame["rank"] = index[:, -1]
        for name in ("toward_ids", "toward_values", "away_ids", "away_values"):
            frame[name] = getattr(self, name).flatten().numpy()
        if self.target_rank is not None:
            frame["target_rank"] = self.target_rank[..., None].expand(shape).flatten().numpy()
        return frame


@dataclass
class BackwardLens(Result):
    """VJPs of the loss at each site, layer and position, and their tokens.

    Attributes:
        norms: L2 norm of each VJP ``[batch, site, layer, pos]`` (0 on padding).
        top: the sites' :class:`TopTokens` ``[batch, site, layer, pos, k]``.
        head_norms: norm of each head's ``dz_h @ W_O[h]`` ``[batch, layer, head, pos]``
            (None with ``heads=False``).
        head_top: the heads' :class:`TopTokens` ``[batch, layer, head, pos, k]``.
        vjps: the VJPs ``[batch, site, layer, pos, d_model]`` (``keep="vectors"`` only).
        head_vjps: ``dz_h @ W_O[h]`` ``[batch, layer, head, pos, d_model]`` (``keep="vectors"``
            and ``heads=True`` only).
        loss: the per-example loss that was differentiated.
        tokens: the input tokens (prompt, then target minus its last token), right-padded.
        lengths: the real length of each row of ``tokens``.
        str_tokens: the input tokens as strings, one list per example (no padding).
        sites, layers: the labels of the ``site`` and ``layer`` axes.
        vocab: the string of every token id that appears in ``top`` / ``head_top``.
        projection: ``"weight"`` or ``"jacobian"`` (see :mod:`tl_reversed.lens.backward_lens`).
        prompts, targets: the strings given, if any.
    """

    norms: Float[Tensor, "batch site layer pos"]
    top: TopTokens
    loss: Float[Tensor, " batch"]
    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    str_tokens: list[list[str]]
    sites: list[str]
    layers: list[int]
    vocab: dict[int, str] = field(repr=False)
    projection: str = "weight"
    head_norms: Float[Tensor, "batch layer head pos"] | None = None
    head_top: TopTokens | None = None
    vjps: Float[Tensor, "batch site layer pos d_model"] | None = field(default=None, repr=False)
    head_vjps: Float[Tensor, "batch layer head pos d_model"] | None = field(default=None, repr=False)
    prompts: list[str] | None = None
    targets: list[str] | None = None

    def __len__(self) -> int:
        return self.norms.shape[0]

    @property
    def k(self) -> int:
        """How many tokens are kept per vector and direction."""
        return self.top.toward_ids.shape[-1]

    # ----------------------------------------------------------------- indexing

    def example_index(self, example: int) -> int:
        """``example`` as a row of the result (negative counts from the end); IndexError if out of range."""
        if not -len(self) <= example < len(self):
            raise IndexError(f"example {example} out of range for {len(self)} examples")
        return example % len(self)

    def site_index(self, site: str) -> int:
        """The index of ``site`` on the ``site`` axis; ValueError naming the sites computed if absent."""
        if site not in self.sites:
            raise ValueError(f"site {site!r} was not computed; this result has sites {self.sites}")
        return self.sites.index(site)

    def _layer(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not computed; this result has layers {self.layers}")
        return self.layers.index(layer)

    def _position(self, position: int, example: int) -> int:
        n = int(self.lengths[example])
        if not -n <= position < n:
            raise IndexError(f"position {position} out of range for example {example} of {n} tokens")
        return position % n

    def _strings(self, ids: Tensor, values: Tensor, k: int | None) -> list[tuple[str, float]]:
        k = self.k if k is None else k
        return [(self.vocab[int(i)], float(v)) for i, v in zip(ids[:k], values[:k]) if int(i) >= 0]

    # ----------------------------------------------------------------- queries

    def top_tokens(
        self,
        site: str,
        layer: int,
        position: int = -1,
        example: int = 0,
        *,
        direction: Direction = "toward",
        k: int | None = None,
    ) -> list[tuple[str, float]]:
        """The tokens one site's VJP pushes ``"toward"`` (``-VJP``) or ``"away"`` (``+VJP``).

        ``position`` counts real tokens of the example; -1 is its last position (the one
        that predicts the first target token when the target is one token).
        Returns ``(token, logit change per unit step)`` pairs, largest first.
        """
        i = self.example_index(example)
        index = (i, self.site_index(site), self._layer(layer), self._position(position, i))
        return self._pick(self.top, index, direction, k)

    def head_top_tokens(
        self,
        layer: int,
        head: int,
        position: int = -1,
        example: int = 0,
        *,
        direction: Direction = "toward",
        k: int | None = None,
    ) -> list[tuple[str, float]]:
        """The tokens one head's output is pushed toward / away from (``dz_h @ W_O[h]``)."""
        if self.head_top is None or self.head_norms is None:
            raise ValueError("this result has no heads: call backward_lens(..., heads=True)")
        n_heads = self.head_norms.shape[2]
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n_heads:
            raise ValueError(f"head {head!r} out of range: the model has {n_heads} heads (0..{n_heads - 1})")
        i = self.example_index(example)
        index = (i, self._layer(layer), head, self._position(position, i))
        return self._pick(self.head_top, index, direction, k)

    def _pick(self, top: TopTokens, index: tuple, direction: Direction, k: int | None) -> list[tuple[str, float]]:
        if check_option("direction", direction, DIRECTIONS) == "toward":
            return self._strings(top.toward_ids[index], top.toward_values[index], k)
        return self._strings(top.away_ids[index], top.away_values[index], k)

    def target_ranks(self, site: str = "mlp_out", position: int = -1, example: int = 0) -> dict[int, int]:
        """Rank (1 = first) of the first target token among the pushed-toward tokens, per layer."""
        if self.top.target_rank is None:
            raise ValueError("no targets were given (a metric was used), so there is no target rank")
        i = self.example_index(example)
        s, p = self.site_index(site), self._position(position, i)
        return {layer: int(self.top.target_rank[i, s, j, p]) for j, layer in enumerate(self.layers)}

    # ----------------------------------------------------------------- tables

    def to_dataframe(self, heads: bool = False) -> pd.DataFrame:
        """One row per (example, site, layer, position), or per (example, layer, head, position).

        Columns: ``example, site, layer, position, token`` (the input token there),
        ``norm``, ``top_toward`` (the first pushed-toward token), ``toward`` and ``away``
        (the ``k`` tokens, best first) and, where targets were given, ``target_rank``.
        With ``heads=True`` the ``site`` column is replaced by ``head``.
        """
        if heads:
            if self.head_norms is None or self.head_top is None:
                raise ValueError("this result has no heads: call backward_lens(..., heads=True)")
            norms, top, labels = self.head_norms, self.head_top, None
        else:
            norms, top, labels = self.norms, self.top, self.sites
        rows = []
        n, a, b, _ = norms.shape
        for i in range(n):
            for x in range(a):
                for y in range(b):
                    for p in range(int(self.lengths[i])):
                        index = (i, x, y, p)
                        toward = self._strings(top.toward_ids[index], top.toward_values[index], None)
                        away = self._strings(top.away_ids[index], top.away_values[index], None)
                        row = {"example": i}
                        if heads:
                            row.update(layer=self.layers[x], head=y)
                        else:
                            row.update(site=labels[x], layer=self.layers[y])  # type: ignore[index]
                        row.update(
                            position=p,
                            token=self.str_tokens[i][p],
                            norm=float(norms[index]),
                            top_toward=toward[0][0] if toward else None,
                            toward=[t for t, _ in toward],
                            away=[t for t, _ in away],
                        )
                        if top.target_rank is not None:
                            row["target_rank"] = int(top.target_rank[index])
                        rows.append(row)
        return pd.DataFrame(rows)

    def grid(self, site: str = "mlp_out", example: int = 0) -> pd.DataFrame:
        """The top pushed-toward token of each layer (rows) and position (columns) of one site."""
        i = self.example_index(example)
        s = self.site_index(site)
        n = int(self.lengths[i])
        columns = [f"{p}:{t}" for p, t in enumerate(self.str_tokens[i])]
        data = [
            [self.vocab.get(int(self.top.toward_ids[i, s, j, p, 0]), "") for p in range(n)]
            for j in range(len(self.layers))
        ]
        return pd.DataFrame(data, index=pd.Index(self.layers, name="layer"), columns=columns)

    # ----------------------------------------------------------------- pictures

    def plot(
        self, site: str | Sequence[str] | None = None, example: int = 0, *, log: bool = True, max_chars: int = 8
    ):
        """Layer x position grids (paper Figure 5): colour = VJP norm, text = top pushed-toward token.

        One panel per site (default: every site of the result), layer 0 at the bottom,
        the example's input tokens along the x axis. The colour scale is logarithmic by
        default (VJP norms span orders of magnitude across layers and positions;
        ``log=False`` for a linear one); zero VJPs (no path to the loss) are blank.
        Returns a :class:`matplotlib.figure.Figure`; never calls ``plt.show()``.
        """
        from tl_reversed.views.lens import plot_lens

        return plot_lens(self, site, example, log=log, max_chars=max_chars)

    def to_html(
        self,
        path: str | Path | None = None,
        site: str | Sequence[str] | None = None,
        example: int = 0,
        *,
        log: bool = True,
    ) -> str:
        """A self-contained HTML page of the grids (inline CSS; no scripts, no remote URLs).

        Each cell shows the top pushed-toward token on a background coloured by the VJP
        norm (log scale unless ``log=False``); hovering shows the norm, the ``k`` tokens
        pushed toward and away and the target's rank. Writes the page to ``path`` when
        given; returns it as a string (``IPython.display.HTML(...)`` shows it inline).
        """
        from tl_reversed.views.lens import render_html

        page = render_html(self, site, example, log=log)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(page, encoding="utf-8")
        return page

    def _repr_html_(self) -> str:
        """The :meth:`to_html` page, so a bare result in a notebook cell shows its grids inline."""
        return self.to_html()


class LensAndRA(NamedTuple):
    """The backward lens and Reversed Attention of one backward pass."""

    lens: BackwardLens
    ra: ReversedAttention


@dataclass
class GradientRank(Result):
    """The gradient of one weight matrix rebuilt from hooks, and its rank.

    ``gradient = inputs^T @ vjps`` summed over every real position of every example, in
    TransformerLens orientation ``[d_in, d_out]`` (``W_O``: ``[head * d_head, d_model]``).

    Attributes:
        matrix, layer: which matrix.
        rank: numerical rank of ``gradient`` (``torch.linalg.matrix_rank`` in float64).
        n_positions: the number of positions summed over: the lemma's bound, ``rank <=
            n_positions`` (and ``<= min(d_in, d_out)``).
        singular_values: of ``gradient``, largest first.
        gradient: ``[d_in, d_out]``, float64.
        inputs: the forward inputs ``[n_positions, d_in]``.
        vjps: the gradients at the matrix's output ``[n_positions, d_out]``.
    """

    matrix: str
    layer: int
    rank: int
    n_positions: int
    singular_values: Float[Tensor, " rank_bound"]
    gradient: Float[Tensor, "d_in d_out"] = field(repr=False)
    inputs: Float[Tensor, "n_positions d_in"] = field(repr=False)
    vjps: Float[Tensor, "n_positions d_out"] = field(repr=False)

    @property
    def bound(self) -> int:
        """``min(n_positions, d_in, d_out)``: the most the rank can be."""
        return min(self.n_positions, *self.gradient.shape)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per singular value, largest first: ``matrix, layer, index, singular_value, rank, bound``."""
        values = self.singular_values.double().numpy()
        return pd.DataFrame(
            {"matrix": self.matrix, "layer": self.layer, "index": np.arange(len(values)), "singular_value": values}
        ).assign(rank=self.rank, bound=self.bound)

    def plot(self, ax=None):
        """The singular values on a log axis, with the numerical rank and its bound marked; a Figure."""
        from tl_reversed.views.plotting import plot_singular_values

        return plot_singular_values(self, ax=ax)
