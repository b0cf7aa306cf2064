"""Backward lens: VJPs equal autograd and finite differences, the projection is what the
docs say, weight gradients are sums of outer products of bounded rank, and the embedded
model's gradient reads " Rome" when asked to say " Rome"."""

from __future__ import annotations

import dataclasses
import math
import re
from html.parser import HTMLParser

import pytest
import torch

from tl_reversed.core.architecture import EMBED, block_hook, final_norm, weight_io
from tl_reversed.backward_lens import backward_lens, backward_lens_and_ra, gradient_rank
from tl_reversed.reversed_attention import reversed_attention
from tl_reversed.core.state import hook_count
from tl_reversed.testing import tiny_model

PROMPT, TARGET = "Hello wor", "l"  # the character-level tiny models read one token per character


def _tiny64(arch: str = "llama"):
    """A tiny float64 model with a non-trivial final-norm weight (and bias, where it has one)."""
    model = tiny_model(arch, dtype=torch.float64)
    norm = model.ln_final.original_component
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.3, 2.0, norm.weight.shape[0], dtype=torch.float64))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.linspace(-0.2, 0.2, norm.weight.shape[0], dtype=torch.float64))
    return model


@pytest.fixture
def tiny64():
    """A tiny float64 Llama (grouped-query attention)."""
    return _tiny64("llama")


# Hugging Face's Llama computes its RMSNorm and attention softmax in float32 whatever the
# model's dtype, so a float64 Llama's loss is only smooth to ~1e-7 (errors of ~1e-6 in a
# derivative at any step); GPT-2 stays in float64 throughout (~1e-11).
FD_SETTINGS = {"llama": (1e-2, 5e-6), "gpt2": (1e-3, 1e-9)}  # step along a unit direction, atol


def _derivative(f, eps: float) -> float:
    """f'(0) by the fourth-order central difference (error O(eps^4) plus rounding / eps)."""
    return (8 * (f(eps) - f(-eps)) - (f(2 * eps) - f(-2 * eps))) / (12 * eps)


def _loss_with_hooks(model, prompt: str, target: str, fwd_hooks) -> torch.Tensor:
    """-log p(target | prompt) computed by hand (one target token), under extra forward hooks."""
    tokens = model.to_tokens(prompt)
    target_id = model.to_tokens(target, prepend_bos=False)[0, 0]
    with model.hooks(fwd_hooks=fwd_hooks):
        logits = model(tokens)
    return -logits[0, -1].log_softmax(-1)[target_id]


def _saver(saved: dict, name: str):
    """A forward hook that returns a copy of its input and keeps it: the copy is what the model uses."""

    def hook(x, hook):
        saved[name] = x.clone()
        return saved[name]

    return hook


def _autograd_activations(model, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and d loss / d activation at each hook in ``names``, by torch.autograd.grad."""
    def leaf(x, hook):
        return x.detach().requires_grad_(True)

    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            hooks = [(EMBED, leaf)]
            saved: dict[str, torch.Tensor] = {}
            for name in names:
                hooks.append((name, _saver(saved, name)))
            loss = _loss_with_hooks(model, PROMPT, TARGET, hooks)
            grads = torch.autograd.grad(loss, [saved[n] for n in names])
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return loss.detach(), dict(zip(names, grads))


# --------------------------------------------------------------------------- VJPs


def test_vjp_equals_autograd_gradient_at_each_hook(tiny64):
    # the residual sites are checked against autograd of the residual tensor itself in
    # test_residual_vjps_equal_autograd_of_the_residual_itself (a bridge's hook_resid_mid
    # is an alias of ln2.hook_in, whose gradient is the MLP branch's alone)
    lens = backward_lens(tiny64, PROMPT, TARGET, sites=("mlp_out", "attn_out"))
    names = [block_hook(layer, site) for site in lens.sites for layer in lens.layers]
    names += [f"blocks.{layer}.attn.hook_z" for layer in lens.layers]
    loss, grads = _autograd_activations(tiny64, names)
    assert float(lens.loss[0]) == pytest.approx(float(loss), abs=1e-10)
    for s, site in enumerate(lens.sites):
        for j, layer in enumerate(lens.layers):
            expected = grads[block_hook(layer, site)][0]
            assert expected.abs().max() > 1e-4  # a real gradient, not a vacuous zero
            torch.testing.assert_close(lens.vjps[0, s, j], expected, atol=1e-6, rtol=0)
            torch.testing.assert_close(lens.norms[0, s, j], expected.norm(dim=-1), atol=1e-6, rtol=0)
    for j, layer in enumerate(lens.layers):
        dz = grads[f"blocks.{layer}.attn.hook_z"][0]  # [pos, head, d_head]
        w_o = tiny64.blocks[layer].attn.W_O.detach()  # [head, d_head, d_model]
        expected = torch.einsum("phd,hdm->hpm", dz, w_o)
        torch.testing.assert_close(lens.head_vjps[0, j], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vjp_matches_finite_difference_along_random_direction(arch):
    tiny64 = _tiny64(arch)
    eps, atol = FD_SETTINGS[arch]
    lens = backward_lens(tiny64, PROMPT, TARGET, sites=("mlp_out", "attn_out"))
    generator = torch.Generator().manual_seed(0)
    for s, site in enumerate(lens.sites):
        for j, layer in enumerate(lens.layers):
            vjp = lens.vjps[0, s, j]
            direction = torch.randn(vjp.shape, generator=generator, dtype=torch.float64)
            direction /= direction.norm()

            def loss_at(step: float) -> float:
                shift = [(block_hook(layer, site), lambda x, hook: x + step * direction[None])]
                with torch.no_grad():
                    return float(_loss_with_hooks(tiny64, PROMPT, TARGET, shift))

            analytic = float((vjp * direction).sum())
            assert abs(analytic) > 1e-3
            assert _derivative(loss_at, eps) == pytest.approx(analytic, abs=atol), (site, layer)


# --------------------------------------------------------------------------- projection


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weight_projection_is_gain_then_unembedding(arch):
    tiny64 = _tiny64(arch)
    lens = backward_lens(tiny64, PROMPT, TARGET, top_k=5)
    gain = tiny64.ln_final.original_component.weight.detach()
    w_u = tiny64.W_U.detach()
    for s in range(len(lens.sites)):
        for j in range(len(lens.layers)):
            for p in range(int(lens.lengths[0])):
                vjp = lens.vjps[0, s, j, p]
                if not vjp.any():  # no path to the loss (last layer, before the target): nothing to read
                    assert (lens.top.toward_ids[0, s, j, p] == -1).all()
                    assert int(lens.top.target_rank[0, s, j, p]) == 0
                    continue
                if arch == "gpt2":  # LayerNorm centres; its bias does not act on a direction
                    vjp = vjp - vjp.mean()
                logits = (vjp * gain) @ w_u
                toward = (-logits).topk(5)
                away = logits.topk(5)
                assert lens.top.toward_ids[0, s, j, p].tolist() == toward.indices.tolist()
                torch.testing.assert_close(lens.top.toward_values[0, s, j, p], toward.values)
                assert lens.top.away_ids[0, s, j, p].tolist() == away.indices.tolist()
                torch.testing.assert_close(lens.top.away_values[0, s, j, p], away.values)
                target = tiny64.to_tokens(TARGET, prepend_bos=False)[0, 0]
                rank = int((logits < logits[target]).sum()) + 1
                assert int(lens.top.target_rank[0, s, j, p]) == rank


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_jacobian_projection_is_first_order_logit_change(arch):
    """-lens(g) through the final norm's Jacobian = d logits / d step along -g at the last layer."""
    tiny64 = _tiny64(arch)
    eps, _ = FD_SETTINGS[arch]
    last = tiny64.cfg.n_layers - 1
    lens = backward_lens(tiny64, PROMPT, TARGET, sites="mlp_out", layers=[last], projection="jacobian", top_k=8)
    tokens = tiny64.to_tokens(PROMPT)
    p = int(lens.lengths[0]) - 1
    g = lens.vjps[0, 0, 0, p]

    ids = lens.top.toward_ids[0, 0, 0, p]
    unit = g / g.norm()

    def logits_after(step: float) -> torch.Tensor:
        def hook(x, hook):
            x = x.clone()
            x[0, p] = x[0, p] - step * unit
            return x

        with torch.no_grad(), tiny64.hooks(fwd_hooks=[(block_hook(last, "mlp_out"), hook)]):
            return tiny64(tokens)[0, p]

    change = _derivative(logits_after, eps) * g.norm()  # d logits / d step along -g
    rtol = 1e-7 if arch == "gpt2" else 3e-4  # Llama's final RMSNorm rounds its input to float32
    torch.testing.assert_close(lens.top.toward_values[0, 0, 0, p], change[ids], atol=0, rtol=rtol)
    assert ids.tolist() == change.topk(8).indices.tolist()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_final_norm_gain_read_by_probe(arch):
    model = tiny_model(arch, dtype=torch.float64)
    norm = model.ln_final.original_component
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 2.0, norm.weight.shape[0], dtype=torch.float64))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.linspace(-0.1, 0.1, norm.weight.shape[0], dtype=torch.float64))
    affine = final_norm(model)
    expected = norm.weight + 1 if arch == "gemma3" else norm.weight  # Gemma's RMSNorm scales by 1 + weight
    torch.testing.assert_close(affine.gain, expected.detach(), atol=1e-6, rtol=0)
    assert affine.centered == (arch == "gpt2")
    assert (affine.bias is not None) == (arch == "gpt2")


# --------------------------------------------------------------------------- gradient rank


def _autograd_weight_gradient(model, layer: int, matrix: str) -> torch.Tensor:
    """d loss / d W by autograd on the Hugging Face weight behind a TransformerLens matrix, as ``[d_in, d_out]``.

    Only that one parameter requires grad for the duration; every flag and ``.grad`` is restored.
    """
    where = {"W_in": ("mlp", "in"), "W_gate": ("mlp", "gate"), "W_out": ("mlp", "out"), "W_O": ("attn", "o")}
    parent, name = where[matrix]
    module = getattr(getattr(model.blocks[layer], parent), name).original_component
    param = module.weight
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        param.requires_grad_(True)
        param.grad = None
        with torch.enable_grad():
            _loss_with_hooks(model, PROMPT, TARGET, []).backward()
        gradient = param.grad.detach().clone()
    finally:
        param.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)
    # nn.Linear stores [d_out, d_in]; GPT-2's Conv1D stores [d_in, d_out]
    return gradient if type(module).__name__ == "Conv1D" else gradient.T


@pytest.mark.parametrize("matrix", ["W_in", "W_gate", "W_out", "W_O"])
@pytest.mark.parametrize("layer", [0, 1])
def test_weight_gradient_is_sum_of_outer_products(tiny64, matrix, layer):
    result = gradient_rank(tiny64, PROMPT, TARGET, layer, matrix)
    autograd = _autograd_weight_gradient(tiny64, layer, matrix)
    assert autograd.abs().max() > 1e-4
    torch.testing.assert_close(result.gradient, autograd, atol=1e-5, rtol=0)
    n_positions = tiny64.to_tokens(PROMPT).shape[1]
    assert result.n_positions == n_positions
    assert result.rank <= n_positions < min(result.gradient.shape)
    assert result.rank == int(torch.linalg.matrix_rank(autograd))
    assert result.rank >= 1
    if layer == 1:  # the last layer's MLP only reaches the loss through the last position
        assert result.rank == 1 or matrix == "W_O"


def test_gradient_rank_sums_positions_over_examples(tiny64):
    one = gradient_rank(tiny64, PROMPT, TARGET, 0, "W_out")
    two = gradient_rank(tiny64, [PROMPT, "Hi the"], [TARGET, "r"], 0, "W_out")
    other = gradient_rank(tiny64, "Hi the", "r", 0, "W_out")
    assert two.n_positions == one.n_positions + other.n_positions
    torch.testing.assert_close(two.gradient, one.gradient + other.gradient, atol=1e-12, rtol=0)
    assert two.rank <= two.n_positions


# --------------------------------------------------------------------------- one pass, batches


def test_lens_and_ra_from_one_pass_equal_separate_calls(tiny64):
    prompts, targets = [PROMPT, "Hi there, frie"], [TARGET, "n"]
    both = backward_lens_and_ra(tiny64, prompts, targets)
    ra = reversed_attention(tiny64, prompts, targets)
    lens = backward_lens(tiny64, prompts, targets)
    torch.testing.assert_close(both.ra.maps, ra.maps, atol=1e-12, rtol=0)
    torch.testing.assert_close(both.ra.norms, ra.norms, atol=1e-12, rtol=0)
    torch.testing.assert_close(both.ra.pattern, ra.pattern, atol=1e-12, rtol=0)
    torch.testing.assert_close(both.lens.vjps, lens.vjps, atol=1e-12, rtol=0)
    torch.testing.assert_close(both.lens.head_vjps, lens.head_vjps, atol=1e-12, rtol=0)
    assert torch.equal(both.lens.top.toward_ids, lens.top.toward_ids)
    torch.testing.assert_close(both.lens.loss, ra.loss)


def test_one_pass_runs_the_model_once(tiny64):
    calls = []
    handle = tiny64.register_forward_hook(lambda *args: calls.append(1))
    try:
        backward_lens_and_ra(tiny64, PROMPT, TARGET)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_batched_equals_one_by_one(tiny64):
    prompts, targets = ["Hello wor", "A longer prompt, th"], ["l", "e"]
    batched = backward_lens(tiny64, prompts, targets, batch_size=2)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        alone = backward_lens(tiny64, prompt, target)
        n = int(alone.lengths[0])
        assert int(batched.lengths[i]) == n
        torch.testing.assert_close(batched.vjps[i, :, :, :n], alone.vjps[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.head_norms[i, :, :, :n], alone.head_norms[0], atol=1e-6, rtol=0)
        assert torch.equal(batched.top.toward_ids[i, :, :, :n], alone.top.toward_ids[0])
        assert torch.equal(batched.top.target_rank[i, :, :, :n], alone.top.target_rank[0])
        assert batched.str_tokens[i] == alone.str_tokens[0]
    short = int(batched.lengths[0])
    assert (batched.norms[0, :, :, short:] == 0).all()
    assert (batched.top.toward_ids[0, :, :, short:] == -1).all()


def test_metric_instead_of_targets(tiny64):
    target = tiny64.to_tokens(TARGET, prepend_bos=False)[0, 0]

    def metric(logits, tokens):
        return -logits[:, -1].log_softmax(-1)[:, target]

    by_metric = backward_lens(tiny64, PROMPT, metric=metric)
    by_target = backward_lens(tiny64, PROMPT, TARGET)
    torch.testing.assert_close(by_metric.vjps, by_target.vjps, atol=1e-12, rtol=0)
    assert by_metric.top.target_rank is None
    with pytest.raises(ValueError, match="no targets were given"):
        by_metric.target_ranks()


# --------------------------------------------------------------------------- results


def test_dataframe_grid_plot_and_html(tiny64, tmp_path):
    lens = backward_lens(tiny64, PROMPT, TARGET, top_k=3)
    n = int(lens.lengths[0])
    frame = lens.to_dataframe()
    assert len(frame) == len(lens.sites) * len(lens.layers) * n
    columns = {"example", "site", "layer", "position", "token", "norm", "top_toward", "toward", "away", "target_rank"}
    assert columns <= set(frame.columns)
    row = frame[(frame.site == "mlp_out") & (frame.layer == 1) & (frame.position == n - 1)].iloc[0]
    assert row.toward == [t for t, _ in lens.top_tokens("mlp_out", 1)]
    assert row.norm == pytest.approx(float(lens.norms[0, lens.sites.index("mlp_out"), 1, n - 1]))
    heads = lens.to_dataframe(heads=True)
    assert len(heads) == len(lens.layers) * tiny64.cfg.n_heads * n
    grid = lens.grid("mlp_out")
    assert grid.shape == (len(lens.layers), n)
    assert grid.iloc[1, n - 1] == lens.top_tokens("mlp_out", 1)[0][0]

    fig = lens.plot()
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    panel = fig.axes[0]
    texts = [t.get_text() for t in panel.texts]
    assert len(texts) == len(lens.layers) * n
    assert texts[-1] == lens.top_tokens(lens.sites[0], lens.layers[-1])[0][0]
    image = torch.as_tensor(panel.images[0].get_array().data)
    norms = lens.norms[0, 0, :, :n]
    torch.testing.assert_close(image.nan_to_num(0.0), norms, atol=1e-12, rtol=0)
    assert torch.equal(image.isnan(), norms == 0)  # zero VJPs are blank
    assert panel.images[0].norm.vmin == pytest.approx(float(norms[norms > 0].min()))  # log scale
    linear = lens.plot("mlp_out", log=False).axes[0].images[0].norm
    assert (linear.vmin, linear.vmax) == (0.0, pytest.approx(float(lens.norms[0, 0, :, :n].max())))

    page = lens.to_html(tmp_path / "lens.html")
    assert (tmp_path / "lens.html").read_text(encoding="utf-8") == page
    assert "http" not in page and "<script" not in page and "src=" not in page
    assert page.count("<td ") == len(lens.sites) * len(lens.layers) * n


class _LensPage(HTMLParser):
    """The legends (``div.legend``: attributes, texts of its spans by class) and the cells' backgrounds per site."""

    def __init__(self, text: str):
        super().__init__()
        self.legends: list[dict] = []
        self.cells: list[list[str]] = []
        self._span: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("class") == "legend":
            self.legends.append({"attrs": attrs, "texts": {}})
            self.cells.append([])
        elif tag == "span" and self.legends:
            self._span = attrs.get("class")
            if self._span == "bar":
                self.legends[-1]["bar"] = attrs["style"]
        elif tag == "td" and self.cells:
            self.cells[-1].append(re.search(r"background:(#[0-9a-f]{6})", attrs["style"]).group(1))

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None

    def handle_data(self, data):
        if self._span is not None:
            texts = self.legends[-1]["texts"]
            texts[self._span] = texts.get(self._span, "") + data


@pytest.mark.parametrize("log", [True, False])
def test_html_legend_gives_each_sites_colour_scale(tiny64, log):
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    lens = backward_lens(tiny64, PROMPT, TARGET, top_k=3)
    n = int(lens.lengths[0])
    page = _LensPage(lens.to_html(log=log))
    assert [legend["attrs"]["data-site"] for legend in page.legends] == lens.sites
    viridis = colormaps["viridis"]
    for legend, cells, site in zip(page.legends, page.cells, lens.sites):
        norms = lens.norms[0, lens.sites.index(site), :, :n]
        low = float(norms[norms > 0].min()) if log else 0.0
        high = float(norms.max())
        assert (float(legend["attrs"]["data-min"]), float(legend["attrs"]["data-max"])) == (low, high)
        assert legend["attrs"]["data-scale"] == ("log" if log else "linear")
        assert (legend["texts"]["lo"], legend["texts"]["hi"]) == (f"{low:.4g}", f"{high:.4g}")
        caption = legend["texts"]["caption"]
        assert "norm of the VJP" in caption and ("log scale" if log else "linear scale") in caption
        # the bar runs from the colour of the smallest cell to that of the largest
        stops = re.findall(r"#[0-9a-f]{6}", legend["bar"])
        assert (stops[0], stops[-1]) == (to_hex(viridis(0.0)), to_hex(viridis(1.0)))
        if log:
            assert cells[int(norms.flip(0).flatten().masked_fill(norms.flip(0).flatten() == 0, math.inf).argmin())] == stops[0]
        assert cells[int(norms.flip(0).flatten().argmax())] == stops[-1]  # page order: last layer first
    # an all-zero site has a legend saying so, and no bar
    zero = _LensPage(dataclasses.replace(lens, norms=torch.zeros_like(lens.norms)).to_html(site="mlp_out", log=log))
    assert "bar" not in zero.legends[0] and "data-min" not in zero.legends[0]["attrs"]
    assert zero.legends[0]["texts"]["caption"].startswith("every VJP of this site is zero")


def test_top_token_queries(tiny64):
    lens = backward_lens(tiny64, PROMPT, TARGET, top_k=4)
    toward = lens.top_tokens("attn_out", 0, position=2)
    away = lens.top_tokens("attn_out", 0, position=2, direction="away", k=2)
    assert len(toward) == 4 and len(away) == 2
    assert all(value > 0 for _, value in toward + away)
    assert [v for _, v in toward] == sorted((v for _, v in toward), reverse=True)
    head = lens.head_top_tokens(1, 3)
    assert len(head) == 4
    ranks = lens.target_ranks("mlp_out")
    assert set(ranks) == set(lens.layers) and all(r >= 1 for r in ranks.values())
    with pytest.raises(ValueError, match="site 'resid_post' was not computed"):
        lens.top_tokens("resid_post", 0)
    with pytest.raises(IndexError, match="position 40 out of range"):
        lens.top_tokens("mlp_out", 0, position=40)
    with pytest.raises(ValueError, match="direction must be"):
        lens.top_tokens("mlp_out", 0, direction="up")


# --------------------------------------------------------------------------- state and errors


def _snapshot(model):
    return (
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def test_no_state_left_on_the_model(tiny64):
    params = list(tiny64.parameters())
    params[0].requires_grad_(False)  # a mixed set of flags, as a user may leave them
    marker = torch.ones_like(params[1])
    params[1].grad = marker
    tiny64.train()
    before = _snapshot(tiny64)
    backward_lens(tiny64, PROMPT, TARGET)
    backward_lens_and_ra(tiny64, PROMPT, TARGET, projection="jacobian")
    gradient_rank(tiny64, PROMPT, TARGET, 0, "W_in")
    with pytest.raises(ValueError):
        backward_lens(tiny64, PROMPT, TARGET, sites="nowhere")
    with pytest.raises(ValueError):
        gradient_rank(tiny64, PROMPT, "", 0, "W_in")
    after = _snapshot(tiny64)
    assert hook_count(tiny64) == 0
    assert after[0] == before[0]
    assert all(a is b for a, b in zip(after[1], before[1]))
    assert params[1].grad is marker
    assert after[2] == before[2] and tiny64.training


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": None}, ValueError, "no targets given"),
        ({"targets": ""}, ValueError, "target 0 is empty"),
        ({"targets": [TARGET, TARGET]}, ValueError, "got 1 prompts but 2 targets"),
        ({"prompts": "  "}, ValueError, "prompt 0 is empty"),
        ({"prompts": 3}, TypeError, "prompts must be a string"),
        ({"sites": ("mlp_out", "nowhere")}, ValueError, "unknown sites"),
        ({"sites": ()}, ValueError, "sites is empty"),
        ({"sites": ("mlp_out", "mlp_out")}, ValueError, "repeat a site"),
        ({"layers": [5]}, ValueError, "out of range"),
        ({"projection": "tuned"}, ValueError, "projection must be one of"),
        ({"top_k": 0}, ValueError, "top_k must be an integer"),
        ({"top_k": 10**6}, ValueError, "top_k must be an integer"),
        ({"keep": "all"}, ValueError, "keep must be one of"),
    ],
)
def test_bad_input_raises_clear_errors(tiny64, kwargs, error, match):
    args = {"prompts": PROMPT, "targets": TARGET, **kwargs}
    with pytest.raises(error, match=match):
        backward_lens(tiny64, args.pop("prompts"), args.pop("targets"), **args)
    assert hook_count(tiny64) == 0


def test_gradient_rank_bad_input(tiny64):
    with pytest.raises(ValueError, match="unknown matrix 'W_Q'"):
        gradient_rank(tiny64, PROMPT, TARGET, 0, "W_Q")
    with pytest.raises(ValueError, match="layer 7 out of range"):
        gradient_rank(tiny64, PROMPT, TARGET, 7, "W_in")
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match="not gated"):
        gradient_rank(gpt2, PROMPT, TARGET, 0, "W_gate")
    assert weight_io(gpt2, 0, "W_in").grad_hook == "blocks.0.mlp.hook_pre"


def test_not_a_model():
    with pytest.raises(TypeError, match="expected a TransformerLens model"):
        backward_lens(torch.nn.Linear(2, 2), PROMPT, TARGET)


@pytest.mark.parametrize("arch", ["gpt2", "gemma3", "neox"])
def test_other_architectures_match_autograd(arch):
    model = tiny_model(arch, dtype=torch.float64)
    lens = backward_lens(model, PROMPT, TARGET, sites="mlp_out", layers=[0])
    _, grads = _autograd_activations(model, [block_hook(0, "mlp_out")])
    torch.testing.assert_close(lens.vjps[0, 0, 0], grads[block_hook(0, "mlp_out")][0], atol=1e-6, rtol=0)
    for matrix in ("W_in", "W_out", "W_O"):  # Gemma's post-norms sit after W_O and W_out: not in the way
        result = gradient_rank(model, PROMPT, TARGET, 0, matrix)
        torch.testing.assert_close(result.gradient, _autograd_weight_gradient(model, 0, matrix), atol=1e-5, rtol=0)
        assert result.rank <= result.n_positions


# --------------------------------------------------------------------------- CLI


def test_cli_prints_grid_and_writes_figure(tiny64, tmp_path, monkeypatch, capsys):
    import tl_reversed
    from tl_reversed.cli import main

    monkeypatch.setattr(tl_reversed, "load_model", lambda name=None, device=None: tiny64)
    code = main(["lens", "--prompt", PROMPT, "--target", TARGET, "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    lens = backward_lens(tiny64, PROMPT, TARGET)
    assert "mlp_out" in printed and "attn_out" in printed
    assert lens.top_tokens("mlp_out", 1)[0][0] in printed
    assert (tmp_path / "backward_lens.png").stat().st_size > 1000
    assert (tmp_path / "backward_lens.html").exists()
    assert main(["lens", "--prompt", PROMPT, "--target", "", "--out", str(tmp_path)]) == 2


# --------------------------------------------------------------------------- embedded model


@pytest.mark.embedded
def test_embedded_rome_is_pushed_toward_in_the_last_layers(embedded_model):
    model = embedded_model
    prompt = "The capital city of France is"
    with torch.no_grad():
        answer = model.to_string(model(model.to_tokens(prompt))[0, -1].argmax())
    assert answer == " Paris"
    lens = backward_lens(model, prompt, " Rome", heads=False, keep="tokens")
    assert lens.vjps is None and lens.head_norms is None
    n_layers = model.cfg.n_layers
    for layer in range(n_layers - 5, n_layers):
        toward = [token for token, _ in lens.top_tokens("mlp_out", layer, position=-1)]
        assert " Rome" in toward[:10], (layer, toward)
    ranks = lens.target_ranks("mlp_out")
    assert all(ranks[layer] == 1 for layer in range(n_layers - 5, n_layers))
    assert ranks[0] > 100  # the first layers' gradients do not read as the target
    assert hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.embedded
def test_embedded_rank_of_mlp_gradient_is_bounded_by_positions(embedded_model):
    result = gradient_rank(embedded_model, "The capital city of France is", " Rome", 20, "W_out")
    assert result.n_positions == 7
    assert result.rank <= 7 and result.rank >= 2
    assert math.isfinite(float(result.singular_values[0]))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("path", ["standard", "bounded"])
def test_residual_vjps_equal_autograd_of_the_residual_itself(arch, path):
    """The residual sites' VJPs are the gradients of the residual tensors, skip connection included.

    On a TransformerBridge ``hook_resid_mid`` is ``ln2.hook_in``: a backward hook there sees
    the MLP branch alone (the ``branch`` reading below, far from the truth); the lens reads
    the residual's own gradient.
    """
    model = tiny_model(arch)
    prompt, target = "The cat sat on the", " mat"
    sites = ["resid_pre", "resid_mid", "resid_post"]
    lens = backward_lens(model, prompt, target, sites=sites, path=path)
    tokens = model.to_tokens(prompt + target[:-1])
    n_prompt = model.to_tokens(prompt).shape[1]
    answer = model.to_tokens(target, prepend_bos=False)[0]
    names = [block_hook(layer, site) for site in sites for layer in range(model.cfg.n_layers)]
    kept, branch = {}, {}

    def keep(name):
        def hook(x, hook):
            kept[name] = x  # hook.name is the canonical name on a bridge: bind the alias
            return x

        return hook

    def keep_branch(grad, hook):
        branch[len(branch)] = grad.detach()

    mids = [block_hook(layer, "resid_mid") for layer in range(model.cfg.n_layers)]
    leaf = (EMBED, lambda x, hook: x.detach().requires_grad_(True))

    def loss_of(run):
        logits = run(tokens)[0, n_prompt - 1 : n_prompt - 1 + len(answer)]
        return -logits.float().log_softmax(-1).gather(-1, answer[:, None]).sum()

    with torch.enable_grad(), model.hooks(fwd_hooks=[leaf, *[(n, keep(n)) for n in names]]):
        loss = loss_of(model)
        grads = torch.autograd.grad(loss, [kept[n] for n in names])
    with torch.enable_grad(), model.hooks(fwd_hooks=[leaf], bwd_hooks=[(n, keep_branch) for n in mids]):
        loss_of(model).backward()
    assert float(lens.loss[0]) == pytest.approx(float(loss.detach()), rel=1e-5)
    n_layers = model.cfg.n_layers
    for s in range(len(sites)):
        for layer in range(n_layers):
            want = grads[s * n_layers + layer][0]
            torch.testing.assert_close(lens.vjps[0, s, layer, : want.shape[0]], want, atol=1e-6, rtol=1e-5)
    # the backward hook at hook_resid_mid (fired last layer first) misses the skip connection
    mid_true = torch.stack([grads[n_layers + layer][0] for layer in range(n_layers)])
    mid_branch = torch.stack([branch[n_layers - 1 - layer][0] for layer in range(n_layers)])
    assert (mid_true - mid_branch).abs().max() > 0.1 * mid_true.abs().max()
