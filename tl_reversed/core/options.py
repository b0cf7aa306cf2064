"""The string options of the public API, as ``Literal`` types and as tuples of their values.

Each option has one ``Literal`` type (for annotations and type checkers) and one tuple
made from it with ``get_args`` (for runtime checks and the command line's ``choices``),
so the allowed values are written once. This module imports nothing but ``typing``:
the command line reads it to build ``--help`` without importing torch.

Progress bars: every function with a ``progress`` argument takes ``bool | None``.
``True`` always shows the bar, ``False`` never does, and ``None`` (the default) shows it
when the work has more than one step (more than one chunk of prompts, lr, head, ...);
:func:`show_progress` decides.
"""

from __future__ import annotations

from typing import Literal, get_args

Keep = Literal["maps", "norms"]
"""What :func:`tl_reversed.reversed_attention` keeps: full RA maps or their norms only."""
KEEP: tuple[str, ...] = get_args(Keep)

RAPath = Literal["auto", "standard", "bounded"]
"""How :func:`tl_reversed.reversed_attention` runs: the model's own pass (``"standard"``), the
memory-bounded pass that recomputes one block at a time (``"bounded"``), or whichever the
estimated memory of the stored attention patterns calls for (``"auto"``)."""
RA_PATHS: tuple[str, ...] = get_args(RAPath)

LensKeep = Literal["vectors", "tokens"]
"""What :func:`tl_reversed.backward_lens` keeps: the VJP vectors or only their top tokens."""
LENS_KEEP: tuple[str, ...] = get_args(LensKeep)

Projection = Literal["weight", "jacobian"]
"""How the backward lens reads a VJP through the final norm: its gain, or its linearisation."""
PROJECTIONS: tuple[str, ...] = get_args(Projection)

Site = Literal["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
"""Block outputs the backward lens reads (their gradient lives in the residual stream)."""
SITES: tuple[str, ...] = get_args(Site)

Matrix = Literal["W_in", "W_gate", "W_out", "W_O"]
"""Weight matrices whose gradient :func:`tl_reversed.backward_lens.gradient_rank` rebuilds."""
MATRICES: tuple[str, ...] = get_args(Matrix)

Direction = Literal["toward", "away"]
"""Tokens a gradient-descent step pushes an output toward (``-VJP``) or away from (``+VJP``)."""
DIRECTIONS: tuple[str, ...] = get_args(Direction)

Source = Literal["ra", "fa"]
"""Maps for attention patching: Reversed Attention or forward attention."""
SOURCES: tuple[str, ...] = get_args(Source)

PatchPoint = Literal["z", "pattern"]
"""Where an attention patch is added: at ``hook_z`` (every architecture) or ``hook_pattern``."""
PATCH_POINTS: tuple[str, ...] = get_args(PatchPoint)

Method = Literal["ra", "fa", "cm1", "cm2", "atp", "atp0", "random", "index"]
"""The built-in head-ranking methods of :func:`tl_reversed.ranking.head_scores`."""
METHODS: tuple[str, ...] = get_args(Method)

Position = Literal["last", "all"]
"""Where attribution patching compares activations: the last prompt token or every position."""
POSITIONS: tuple[str, ...] = get_args(Position)

TaskKind = Literal["icl", "relation"]
"""Todd et al.'s in-context-learning pairs or Hernandez et al.'s relations."""
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)

Split = Literal["test", "train", "all"]
"""Which part of a task's examples: held-out test third, training rest, or all."""
SPLITS: tuple[str, ...] = get_args(Split)

Draw = Literal["current", "0.1.0"]
"""Which seeded draw of demonstrations and label shuffles: this version's, or tl_reversed 0.1.0's
(the first release; its tables in ``docs/results`` were made with it)."""
DRAWS: tuple[str, ...] = get_args(Draw)


RankBy = Literal["forward", "backward"]
"""How :func:`tl_reversed.flow_graph` orders heads, memories and neurons: contribution size or loss effect."""
RANK_BY: tuple[str, ...] = get_args(RankBy)


def check_option(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else a ``ValueError`` naming the option and its values.

    >>> check_option("keep", "maps", KEEP)
    'maps'
    >>> check_option("keep", "x", KEEP)
    Traceback (most recent call last):
    ...
    ValueError: keep must be one of ('maps', 'norms'), got 'x'
    """
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def show_progress(progress: bool | None, steps: int) -> bool:
    """Whether to show a progress bar over ``steps`` steps (see the module docstring)."""
    return steps > 1 if progress is None else bool(progress)
