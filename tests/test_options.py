"""Typed options: one torch-free module of Literal types and value tuples, one check, one meaning of progress."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch

import tl_reversed
from tl_reversed.core import options

PROMPTS = ["Q: ab\nA:", "Q: cd\nA:", "Q: ef\nA:"]
TARGETS = [" x", " y", " z"]


def test_check_option_names_the_option_the_values_and_the_bad_value():
    assert options.check_option("keep", "norms", options.KEEP) == "norms"
    with pytest.raises(ValueError) as error:
        options.check_option("keep", "x", options.KEEP)
    assert str(error.value) == "keep must be one of ('maps', 'norms'), got 'x'"
    with pytest.raises(ValueError, match=r"got \['maps'\]"):  # not a string: refused, not compared
        options.check_option("keep", ["maps"], options.KEEP)


@pytest.mark.parametrize(
    "literal, values",
    [
        (options.Keep, options.KEEP),
        (options.LensKeep, options.LENS_KEEP),
        (options.Projection, options.PROJECTIONS),
        (options.Site, options.SITES),
        (options.Matrix, options.MATRICES),
        (options.Direction, options.DIRECTIONS),
        (options.Source, options.SOURCES),
        (options.PatchPoint, options.PATCH_POINTS),
        (options.Method, options.METHODS),
        (options.Position, options.POSITIONS),
        (options.TaskKind, options.TASK_KINDS),
        (options.Split, options.SPLITS),
    ],
)
def test_each_tuple_is_the_values_of_its_literal(literal, values):
    assert values == get_args(literal)
    assert all(isinstance(v, str) for v in values)


def test_the_library_uses_the_same_tuples():
    from tl_reversed.core import architecture
    from tl_reversed.experiments import attention_patching, ranking, tasks
    from tl_reversed.lens import backward_lens

    assert ranking.METHODS == options.METHODS  # the live registry starts with the built-in methods
    assert ranking.POSITIONS is options.POSITIONS
    assert architecture.LENS_SITES is options.SITES
    assert architecture.WEIGHT_MATRICES is options.MATRICES
    assert backward_lens.PROJECTIONS is options.PROJECTIONS
    assert attention_patching.SOURCES is options.SOURCES
    assert attention_patching.PATCH_POINTS is options.PATCH_POINTS
    assert tasks.Split is options.Split and tasks.TaskKind is options.TaskKind


def test_options_module_imports_only_typing():
    tree = ast.parse(Path(options.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "typing"}


def test_show_progress_has_one_meaning():
    assert [options.show_progress(None, n) for n in (0, 1, 2, 11)] == [False, False, True, True]
    assert options.show_progress(True, 1) is True
    assert options.show_progress(False, 5) is False


def test_progress_none_shows_a_bar_only_for_more_than_one_chunk(tiny, capsys):
    from tl_reversed import reversed_attention

    reversed_attention(tiny, PROMPTS, TARGETS, keep="norms", batch_size=None)
    assert "reversed attention" not in capsys.readouterr().err
    reversed_attention(tiny, PROMPTS, TARGETS, keep="norms", batch_size=1)
    assert "reversed attention" in capsys.readouterr().err
    reversed_attention(tiny, PROMPTS, TARGETS, keep="norms", batch_size=1, progress=False)
    assert "reversed attention" not in capsys.readouterr().err


def test_bad_options_raise_the_shared_message(tiny):
    from tl_reversed import backward_lens, reversed_attention
    from tl_reversed.experiments.attention_patching import attention_patch_hooks

    with pytest.raises(ValueError, match=r"^keep must be one of \('maps', 'norms'\), got 'all'$"):
        reversed_attention(tiny, PROMPTS[0], TARGETS[0], keep="all")
    with pytest.raises(ValueError, match=r"^at must be one of \('z', 'pattern'\), got 'q'$"):
        attention_patch_hooks(tiny, torch.zeros(2, 4, 3, 3), 1.0, at="q")
    with pytest.raises(ValueError, match=r"^ra_keep must be one of \('maps', 'norms'\), got 'x'$"):
        tl_reversed.backward_lens_and_ra(tiny, PROMPTS[0], TARGETS[0], ra_keep="x")
    lens = backward_lens(tiny, PROMPTS[0], TARGETS[0], heads=False)
    with pytest.raises(ValueError, match=r"^direction must be one of \('toward', 'away'\), got 'up'$"):
        lens.top_tokens("mlp_out", 0, direction="up")


def test_top_heads_refuses_k_below_one_and_non_integers(tiny):
    result = tl_reversed.reversed_attention(tiny, PROMPTS[0], TARGETS[0])
    total = result.norms.shape[1] * result.norms.shape[2]
    for k in (-3, 0, 2.5, True, "3"):
        with pytest.raises(ValueError, match=f"k must be a positive integer .*got {k!r}"):
            result.top_heads(k)  # type: ignore[arg-type]
    assert len(result.top_heads(1)) == 1
    assert len(result.top_heads(total + 5)) == total


def test_head_and_head_pattern_check_the_head_alike(tiny):
    result = tl_reversed.reversed_attention(tiny, PROMPTS[0], TARGETS[0])
    n_heads = result.n_heads
    for bad in (-1, n_heads):
        for method in (result.head, result.head_pattern):
            with pytest.raises(ValueError, match=rf"head {bad} out of range: the model has {n_heads} heads"):
                method(0, bad)
    n = int(result.lengths[0])
    assert torch.equal(result.head_pattern(0, n_heads - 1), result.pattern[0, 0, n_heads - 1, :n, :n])


def _fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter from the repository root; its stdout."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_tl_reversed_does_not_import_torch():
    assert _fresh("import sys, tl_reversed, tl_reversed.core.options; print('torch' in sys.modules)") == "False"


def test_the_package_keeps_its_functions_over_their_submodules():
    code = (
        "import tl_reversed.reversed_attention, tl_reversed.backward_lens, sys, tl_reversed\n"
        "from tl_reversed.core import reversed_attention as ra\n"
        "from tl_reversed.lens import backward_lens as bl\n"
        "print(tl_reversed.reversed_attention is ra.reversed_attention, tl_reversed.backward_lens is bl.backward_lens,\n"
        "      sys.modules['tl_reversed.reversed_attention'] is ra, sys.modules['tl_reversed.backward_lens'] is bl)"
    )
    assert _fresh(code) == "True True True True"
    # the same when the public name is read first and the submodule imported afterwards
    code = (
        "import tl_reversed; f = tl_reversed.reversed_attention\n"
        "import tl_reversed.reversed_attention\n"
        "print(callable(tl_reversed.reversed_attention), tl_reversed.reversed_attention is f)"
    )
    assert _fresh(code) == "True True"


def test_unknown_package_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        tl_reversed.nonexistent  # noqa: B018
    assert set(tl_reversed.__all__) <= set(dir(tl_reversed))
