"""tl_reversed.plotting: figures carry the right data, scales, titles and token labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import tl_reversed
from tl_reversed import plotting
from tl_reversed.testing import tiny_model

PROMPTS = ["abcd", "xyzwv"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2, seed=0)


@pytest.fixture(scope="module")
def result(model):
    return tl_reversed.reversed_attention(model, PROMPTS, ["e", "f"])


def image_axes(fig: Figure):
    """The axes that hold an image (maps and heatmaps, not colour bars), in order."""
    return [ax for ax in fig.axes if ax.images]


def ticks(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels()]


def test_plot_head_shows_pattern_and_symmetric_ra(result):
    fig = plotting.plot_head(result, 1, 2, example=1)
    assert isinstance(fig, Figure)
    ax_fa, ax_ra = image_axes(fig)
    assert fig._suptitle.get_text() == "L1H2"
    assert ax_fa.get_title() == "forward attention"
    assert ax_ra.get_title() == "reversed attention\ntarget 'f'"
    ra = result.head(1, 2, example=1).numpy()
    fa = result.head_pattern(1, 2, example=1).numpy()
    assert ra.shape == (6, 6)  # <bos> x y z w v: the second example, trimmed
    limit = np.abs(ra).max()
    assert limit > 0
    assert ax_ra.images[0].get_clim() == pytest.approx((-limit, limit))
    assert ax_fa.images[0].get_clim() == (0.0, 1.0)
    shown = ax_ra.images[0].get_array()
    assert shown.mask.tolist() == np.triu(np.ones((6, 6), bool), k=1).tolist()
    np.testing.assert_allclose(shown.filled(0.0), np.tril(ra), rtol=1e-6)
    np.testing.assert_allclose(ax_fa.images[0].get_array().filled(0.0), fa, rtol=1e-6)
    for ax in (ax_fa, ax_ra):
        assert ticks(ax.xaxis) == result.str_tokens[1] == ["<bos>", "x", "y", "z", "w", "v"]
        assert ticks(ax.yaxis) == result.str_tokens[1]


@pytest.mark.embedded
def test_plot_head_tick_labels_are_real_tokens(embedded_model):
    result = tl_reversed.reversed_attention(embedded_model, "The capital city of France is", " Paris")
    fig = plotting.plot_head(result, 12, 0)
    expected = ["<|im_start|>", "The", " capital", " city", " of", " France", " is"]
    for ax in image_axes(fig):
        assert ticks(ax.xaxis) == expected
        assert ticks(ax.yaxis) == expected
    ra = image_axes(fig)[1].images[0]
    low, high = ra.get_clim()
    assert low == -high == pytest.approx(-float(result.head(12, 0).abs().max()))


def test_token_labels_escape_only_what_breaks_matplotlib():
    assert plotting.token_labels([" a", "$x$", "\n", "b\t"]) == [" a", r"\$x\$", "\\n", "b\\t"]


def test_plot_norms_shows_mean_norms_per_layer_and_head(result):
    fig = result.plot()
    assert isinstance(fig, Figure)
    ax_fa, ax_ra = image_axes(fig)
    assert (ax_fa.get_title(), ax_ra.get_title()) == ("forward attention norm", "reversed attention norm")
    np.testing.assert_allclose(ax_ra.images[0].get_array(), result.norms.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(ax_fa.images[0].get_array(), result.pattern_norms.mean(0).numpy(), rtol=1e-6)
    assert ticks(ax_ra.yaxis) == ["0", "1"]
    assert ticks(ax_ra.xaxis) == [str(h) for h in range(result.n_heads)]
    one = plotting.plot_norms(result, example=1)
    np.testing.assert_allclose(image_axes(one)[1].images[0].get_array(), result.norms[1].numpy(), rtol=1e-6)


def test_plot_norms_labels_the_computed_layers(model):
    result = tl_reversed.reversed_attention(model, "abc", "d", layers=[1], keep="norms")
    ax_fa, ax_ra = image_axes(plotting.plot_norms(result))
    assert ticks(ax_ra.yaxis) == ticks(ax_fa.yaxis) == ["1"]
    with pytest.raises(ValueError, match="keep='maps'"):
        plotting.plot_head(result, 1, 0)


@pytest.mark.parametrize("shared", [False, True])
def test_plot_top_heads_ranks_and_scales(result, shared):
    fig = plotting.plot_top_heads(result, 4, shared_scale=shared)
    axes = image_axes(fig)
    top = result.top_heads(4)
    assert [ax.get_title() for ax in axes] == [f"L{layer}H{head}" for layer, head in top]
    limits = [float(result.head(layer, head).abs().max()) for layer, head in top]
    for ax, limit in zip(axes, limits):
        low, high = ax.images[0].get_clim()
        assert low == -high
        assert high == pytest.approx(max(limits) if shared else limit)
        assert ticks(ax.xaxis) == result.str_tokens[0]
    assert len(fig.axes) == 4 + (1 if shared else 4)  # maps, then one shared or four colour bars
    assert len({ax.images[0].get_clim() for ax in axes}) == (1 if shared else len(set(limits)))


def test_plot_compare_shows_both_targets_and_their_difference(model):
    a = tl_reversed.reversed_attention(model, "abcd", "e")
    b = tl_reversed.reversed_attention(model, "abcd", "q")
    fig = plotting.plot_compare(a, b, 0, 1)
    first, second, diff = image_axes(fig)
    assert [ax.get_title() for ax in (first, second)] == ["'e'", "'q'"]
    assert diff.get_title() == "difference\n'e' $-$ 'q'"
    ra_a, ra_b = a.head(0, 1).numpy(), b.head(0, 1).numpy()
    assert not np.allclose(ra_a, ra_b)
    np.testing.assert_allclose(diff.images[0].get_array().filled(0.0), np.tril(ra_a - ra_b), rtol=1e-5, atol=1e-12)
    shared = max(np.abs(ra_a).max(), np.abs(ra_b).max())
    assert first.images[0].get_clim() == second.images[0].get_clim() == pytest.approx((-shared, shared))
    limit = np.abs(ra_a - ra_b).max()
    assert diff.images[0].get_clim() == pytest.approx((-limit, limit))


def test_plot_compare_uses_the_shared_tokens_of_longer_targets(model):
    a = tl_reversed.reversed_attention(model, "abcd", "e")  # reads <bos> a b c d
    b = tl_reversed.reversed_attention(model, "abcd", "xy")  # reads <bos> a b c d x
    axes = image_axes(plotting.plot_compare(a, b, 1, 0, labels=("one", "two")))
    assert [ax.get_title() for ax in axes[:2]] == ["one", "two"]
    for ax in axes:
        assert ticks(ax.xaxis) == ["<bos>", "a", "b", "c", "d"]
    np.testing.assert_allclose(axes[1].images[0].get_array().filled(0.0), np.tril(b.head(1, 0)[:5, :5].numpy()))
    other = tl_reversed.reversed_attention(model, "zz", "e")
    other.str_tokens = [["z", "z", "z"]]
    with pytest.raises(ValueError, match="share no leading tokens"):
        plotting.plot_compare(a, other, 0, 0)


CURVES = {
    "RA": ([0.0, 0.5, 1.0], [0.0, 0.6, 0.9]),
    "RA reversed": ([0.0, 0.5, 1.0], [0.0, 0.2, 0.9]),
    "CM1": ([0.0, 0.5, 1.0], [0.1, 0.4, 0.9]),
}


def test_plot_perturbation_from_dict_and_dataframe(result):
    rows = [(m, f, a) for m, (fs, accs) in CURVES.items() for f, a in zip(fs, accs)]
    frame = pd.DataFrame(rows, columns=["method", "fraction", "accuracy"])
    for source in (CURVES, frame):
        fig = plotting.plot_perturbation(source, title="capitalize")
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        assert ax.get_title() == "capitalize"
        lines = {line.get_label(): line for line in ax.get_lines()}
        # AUC by the trapezoid rule: RA 0.5*(0+0.6)/2 + 0.5*(0.6+0.9)/2 = 0.525
        assert set(lines) == {"RA (AUC 0.525)", "RA reversed (AUC 0.325)", "CM1 (AUC 0.450)"}
        ra, rev = lines["RA (AUC 0.525)"], lines["RA reversed (AUC 0.325)"]
        assert ra.get_ydata().tolist() == [0.0, 0.6, 0.9]
        assert (ra.get_linestyle(), rev.get_linestyle()) == ("-", "--")
        assert ra.get_color() == rev.get_color() != lines["CM1 (AUC 0.450)"].get_color()


def test_plot_perturbation_averages_repeated_points_and_checks_columns():
    frame = pd.DataFrame(
        {"method": ["RA"] * 4, "fraction": [1.0, 0.0, 1.0, 0.0], "accuracy": [1.0, 0.2, 0.5, 0.0], "task": list("aabb")}
    )
    (line,) = plotting.plot_perturbation(frame).axes[0].get_lines()
    assert line.get_xdata().tolist() == [0.0, 1.0]
    assert line.get_ydata().tolist() == pytest.approx([0.1, 0.75])
    assert plotting.curve_auc([1.0, 0.0], [0.75, 0.1]) == pytest.approx(0.425)
    with pytest.raises(ValueError, match="missing \\['fraction'\\]"):
        plotting.plot_perturbation(frame.drop(columns="fraction"))
    with pytest.raises(ValueError, match="2 fractions but 3 accuracies"):
        plotting.plot_perturbation({"RA": ([0, 1], [0, 1, 2])})


def test_plot_lr_sweep_one_line_per_source_with_baselines():
    df = pd.DataFrame(
        {
            "lr": [-30, -10, 0, -30, -10, 0, 1, 0],
            "accuracy": [0.4, 0.3, 0.0, 0.2, 0.1, 0.0, 0.05, 0.0],
            "source": ["RA"] * 6 + ["FA"] * 2,
        }
    )
    fig = plotting.plot_lr_sweep(df, baselines={"5-shot": 0.9})
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"RA", "FA", "5-shot (0.90)"}
    assert lines["RA"].get_xdata().tolist() == [-30, -10, 0]
    assert lines["RA"].get_ydata().tolist() == pytest.approx([0.3, 0.2, 0.0])
    assert lines["FA"].get_xdata().tolist() == [0, 1]
    assert list(lines["5-shot (0.90)"].get_ydata()) == [0.9, 0.9]
    assert len(ax.collections) == 1  # the RA min..max band; FA has one row per lr
    with pytest.raises(ValueError, match="missing \\['source'\\]"):
        plotting.plot_lr_sweep(df.drop(columns="source"))


def test_plot_into_given_axes_returns_that_figure():
    fig = Figure()
    ax = fig.subplots()
    assert plotting.plot_perturbation(CURVES, ax=ax) is fig
    assert plotting.plot_lr_sweep(pd.DataFrame({"lr": [1], "accuracy": [0.5], "source": ["RA"]}), ax=ax) is fig


def test_figures_never_touch_pyplot(result):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plotting.plot_head(result, 0, 0)
    plotting.plot_norms(result)
    plotting.plot_top_heads(result, 2)
    plotting.plot_compare(result, result, 0, 0)
    plotting.plot_perturbation(CURVES)
    assert plt.get_fignums() == before


def test_maps_in_float64_plot_too(model):
    result = tl_reversed.reversed_attention(model, "abc", "d")
    result.maps, result.pattern = result.maps.double(), result.pattern.double()
    fig = plotting.plot_head(result, 0, 0)
    assert image_axes(fig)[1].images[0].get_clim()[1] == pytest.approx(float(result.head(0, 0).abs().max()))
    assert torch.is_tensor(result.maps)


def test_results_without_targets_get_neutral_titles(model):
    tokens = model.to_tokens("abcd")
    a = tl_reversed.ra_from_cache(tl_reversed.cache_with_grads(model, "abcd", "e"), tokens=tokens)
    b = tl_reversed.ra_from_cache(tl_reversed.cache_with_grads(model, "abcd", "q"), tokens=tokens)
    assert image_axes(plotting.plot_head(a, 0, 0))[1].get_title() == "reversed attention"
    assert [ax.get_title() for ax in image_axes(plotting.plot_compare(a, b, 0, 0))][:2] == ["first", "second"]
    direct = tl_reversed.reversed_attention(model, "abcd", "e")
    from_cache = image_axes(plotting.plot_head(a, 1, 1))[1].images[0].get_clim()
    assert from_cache == pytest.approx(image_axes(plotting.plot_head(direct, 1, 1))[1].images[0].get_clim(), rel=1e-5)
