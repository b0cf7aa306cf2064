"""Results are data: every result type, computed for real on a tiny model, saves to one file
and loads back equal; bad files are refused with a message that says what to do; the AUC
has one definition; a notebook shows the same page as ``to_html``."""

from __future__ import annotations

import dataclasses
import html
import json

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tl_reversed.core.results import FORMAT_VERSION, Result, load_result
from tl_reversed.core.reversed_attention import ReversedAttention, reversed_attention
from tl_reversed.experiments.attention_patching import (
    AttentionMaps,
    IterativePatching,
    PatchingSweep,
    average_maps,
    evaluate_patching,
    iterative_patching,
)
from tl_reversed.experiments.perturbation import PerturbationResult, auc, perturbation_test
from tl_reversed.experiments.ranking import HeadScores, head_scores
from tl_reversed.lens.backward_lens import BackwardLens, GradientRank, TopTokens, backward_lens, gradient_rank
from tl_reversed.testing import tiny_model

TRAIN = (["Q: cat\nA: do", "Q: sun\nA: mo", "Q: red\nA: bl"], ["g", "o", "u"])
TEST = (["Q: fox\nA: ow", "Q: one\nA: tw"], ["l", "o"])


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2, seed=0)


@pytest.fixture(scope="module")
def results(model) -> dict[str, Result]:
    """One real result of every type (and the variants with None fields and nested results)."""
    ra = reversed_attention(model, ["a<b>cd", "xyz"], ["e", "f"])
    scores = head_scores(model, TRAIN, "ra")
    maps = average_maps(model, TRAIN, "ra")
    sweep = evaluate_patching(model, TRAIN, TEST, "ra", [0.0, -1.0], maps=maps)
    lens = backward_lens(model, "Hello wor", "l", top_k=3)
    return {
        "ReversedAttention": ra,
        "ReversedAttention norms only": reversed_attention(model, ["a<b>cd", "xyz"], ["e", "f"], keep="norms"),
        "HeadScores": scores,
        "HeadScores atp": head_scores(model, TRAIN, "atp", corrupted=(TRAIN[0][::-1], TRAIN[1])),
        "PerturbationResult": perturbation_test(model, TEST, scores, (0.0, 0.5, 1.0), reverse=True, progress=False),
        "AttentionMaps": maps,
        "PatchingSweep": sweep,
        "PatchingSweep without maps": dataclasses.replace(sweep, maps=None),
        "IterativePatching": iterative_patching(model, TRAIN, TEST, lr=-1.0, steps=1, progress=False),
        "BackwardLens": lens,
        "BackwardLens metric, no vectors": backward_lens(
            model, "Hello wor", metric=lambda logits, tokens: logits[:, -1, 5], keep="tokens", heads=False
        ),
        "TopTokens": lens.head_top,
        "GradientRank": gradient_rank(model, "Hello wor", "l", 0, "W_in"),
    }


def assert_same(a: object, b: object, where: str = "result") -> None:
    """Equal field by field: tensors exactly (dtype, shape, values; NaN equals NaN), types kept."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point() and bool(a.isnan().any()):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), where
        else:
            assert torch.equal(a, b), where
    elif dataclasses.is_dataclass(a):
        for item in dataclasses.fields(a):
            assert_same(getattr(a, item.name), getattr(b, item.name), f"{where}.{item.name}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert type(key) is type(next(k for k in b if k == key)), f"{where}: key type of {key!r}"
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


CASES = [
    "ReversedAttention",
    "ReversedAttention norms only",
    "HeadScores",
    "HeadScores atp",
    "PerturbationResult",
    "AttentionMaps",
    "PatchingSweep",
    "PatchingSweep without maps",
    "IterativePatching",
    "BackwardLens",
    "BackwardLens metric, no vectors",
    "TopTokens",
    "GradientRank",
]


@pytest.mark.parametrize("case", CASES)
def test_every_result_round_trips_through_one_file(results, case, tmp_path):
    result = results[case]
    cls = type(result)
    path = result.save(tmp_path / "sub" / "result.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.safetensors"]  # no partial file left
    loaded = cls.load(path)
    assert_same(result, loaded)
    assert_same(result, load_result(path))
    pd.testing.assert_frame_equal(result.to_dataframe(), loaded.to_dataframe())


def test_the_file_records_type_version_and_absent_tensors(results, tmp_path):
    path = results["ReversedAttention norms only"].save(tmp_path / "ra.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["tl_reversed"])
        names = set(handle.keys())
    assert header["type"] == "ReversedAttention" and header["format"] == FORMAT_VERSION
    assert header["fields"]["maps"] == {"kind": "value", "value": None}  # None tensors: recorded as absent
    assert names == {"norms", "pattern_norms", "loss", "tokens", "lengths"}
    lens = results["BackwardLens"].save(tmp_path / "lens.safetensors")
    with safe_open(str(lens), framework="pt") as handle:
        assert {"top.toward_ids", "head_top.away_values", "top.target_rank"} <= set(handle.keys())


def test_bad_files_are_refused_with_what_to_do(results, tmp_path):
    path = results["HeadScores"].save(tmp_path / "scores.safetensors")
    with pytest.raises(ValueError, match=r"holds a HeadScores, not a ReversedAttention: load it with HeadScores\.load"):
        ReversedAttention.load(path)
    whole = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"truncated\.safetensors is not a readable result file \(truncated or corrupted"):
        HeadScores.load(truncated)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\xff not a safetensors file" * 10)
    with pytest.raises(ValueError, match=r"junk\.safetensors is not a readable result file .*recompute the result"):
        HeadScores.load(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a tl_reversed result .* safetensors.torch.load_file"):
        HeadScores.load(plain)
    with pytest.raises(FileNotFoundError, match="no result file"):
        HeadScores.load(tmp_path / "missing.safetensors")


def test_a_newer_format_version_is_refused(results, tmp_path):
    path = results["PerturbationResult"].save(tmp_path / "curve.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["tl_reversed"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    header["format"] = FORMAT_VERSION + 1
    save_file(tensors, str(path), metadata={"tl_reversed": json.dumps(header)})
    with pytest.raises(ValueError, match=f"result format {FORMAT_VERSION + 1}.*upgrade tl_reversed"):
        PerturbationResult.load(path)


def test_a_failed_save_leaves_the_old_file_whole(results, tmp_path):
    scores = results["HeadScores"]
    path = scores.save(tmp_path / "scores.safetensors")
    before = path.read_bytes()
    broken = dataclasses.replace(scores, info={"what": object()})
    with pytest.raises(TypeError, match="cannot save info: a object is neither a tensor"):
        broken.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scores.safetensors"]


def test_gradient_rank_table_and_plot(results):
    rank = results["GradientRank"]
    frame = rank.to_dataframe()
    assert frame["singular_value"].tolist() == rank.singular_values.double().tolist()
    assert set(frame["rank"]) == {rank.rank} and set(frame["bound"]) == {rank.bound}
    ax = rank.plot().axes[0]
    assert [line.get_label() for line in ax.get_lines()] == [
        "singular values", f"numerical rank {rank.rank}", f"bound {rank.bound}"
    ]


def test_top_tokens_table_is_the_tensors(results):
    top = results["TopTokens"]
    frame = top.to_dataframe()
    assert len(frame) == top.toward_ids.numel()
    row = frame.iloc[7]
    index = (*[int(row[f"axis{i}"]) for i in range(top.toward_ids.ndim - 1)], int(row["rank"]))
    assert row["toward_ids"] == int(top.toward_ids[index]) and row["away_ids"] == int(top.away_ids[index])


# --------------------------------------------------------------------------- one AUC


def test_one_auc_definition():
    from tl_reversed.views import plotting

    assert plotting.curve_auc is auc
    # trapezoid over the fractions, divided by their span; points taken in fraction order
    assert auc([0.2, 0.6, 1.0], [0.0, 0.5, 1.0]) == pytest.approx((0.4 * 0.25 + 0.4 * 0.75) / 0.8)
    assert auc([1.0, 0.0], [0.75, 0.1]) == pytest.approx(0.425)
    with pytest.raises(ValueError, match="one accuracy per fraction"):
        auc([0.0, 1.0], [0.5])


def test_plot_labels_show_the_results_auc(results):
    from tl_reversed.views.plotting import plot_perturbation

    result = results["PerturbationResult"]
    (line,) = result.plot().axes[0].get_lines()
    assert line.get_label() == f"{result.label}: AUC {result.auc:.3f}"
    (line,) = plot_perturbation({"RA reversed": (result.fractions, result.accuracy)}).axes[0].get_lines()
    assert line.get_label() == f"RA reversed (AUC {result.auc:.3f})"


def test_committed_tables_keep_their_auc():
    """The AUCs in docs/results are the one AUC of their committed curves (to the 4 digits written)."""
    from pathlib import Path

    folder = Path(__file__).parent.parent / "docs" / "results" / "perturbation"
    aucs = pd.read_csv(folder / "capitalize_auc.csv")
    curves = pd.read_csv(folder / "capitalize_curves.csv")
    for _, row in aucs.iterrows():
        for reverse, column in ((False, "auc"), (True, "auc_reverse")):
            part = curves[(curves["shots"] == row["shots"]) & (curves["method"] == row["method"]) & (curves["reverse"] == reverse)]
            assert len(part) == 11
            assert auc(part["fraction"], part["accuracy"]) == pytest.approx(row[column], abs=1e-4)


# --------------------------------------------------------------------------- notebooks


def test_reversed_attention_shows_itself_in_a_notebook(results):
    result = results["ReversedAttention"]
    page = result._repr_html_()
    assert page == result.to_html()
    for token in result.str_tokens[0]:
        assert f'<span class="tok">{html.escape(token)}<sub>' in page
    start = page.index('id="cv-ra-props">') + len('id="cv-ra-props">')
    props = json.loads(page[start : page.index("</script>", start)])
    layer, head = result.top_heads(1)[0]
    raw = result.head(layer, head).float()
    torch.testing.assert_close(torch.tensor(props["attention"][0]), raw / raw.abs().max(), atol=1e-5, rtol=0)
    assert "body {" not in page  # the styles are scoped: shown inline, the page restyles nothing around it
    assert results["ReversedAttention norms only"]._repr_html_() is None  # no maps: the plain repr


def test_backward_lens_shows_itself_in_a_notebook(results):
    lens = results["BackwardLens"]
    page = lens._repr_html_()
    assert page == lens.to_html()
    for token in lens.str_tokens[0]:
        assert f"<br>{html.escape(token)}</th>" in page
    top = lens.top_tokens("mlp_out", lens.layers[-1], -1)[0][0]
    assert f">{html.escape(top)}</td>" in page
    assert "body {" not in page


def test_load_result_in_a_fresh_process_imports_the_type_it_needs(tmp_path):
    """The core layer imports no experiment: ``load_result`` imports the module the file names."""
    import subprocess
    import sys

    scores = HeadScores(torch.arange(6.0).reshape(2, 3), "index", n_examples=0)
    path = scores.save(tmp_path / "scores.safetensors")
    code = (
        "import sys\nfrom tl_reversed.core.results import load_result\n"
        "assert 'tl_reversed.experiments.ranking' not in sys.modules\n"
        f"r = load_result({str(path)!r})\n"
        "print(type(r).__module__, type(r).__name__, r.scores.flatten().tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["tl_reversed.experiments.ranking", "HeadScores", "[0.0,", "1.0,", "2.0,", "3.0,", "4.0,", "5.0]"]
