"""tl_reversed.html: one self-contained page with the tokens, per-head-scaled RA and nothing remote."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser

import pytest
import torch

import tl_reversed
from tl_reversed.html import circuitsvis_bundle, normalise_per_head, to_html
from tl_reversed.testing import tiny_model

REMOTE = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)


class Page(HTMLParser):
    """Collects script and link tags with their attributes and the scripts' text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[tuple[dict, str]] = []
        self._in_script: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "script":
            self._in_script = attrs
            self.scripts.append((attrs, ""))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None

    def handle_data(self, data):
        if self._in_script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def data_block(self, element_id: str) -> dict:
        (text,) = [text for attrs, text in self.scripts if attrs.get("id") == element_id]
        return json.loads(text)


def remote_loads(page: Page) -> list[str]:
    """Every URL a script, link, iframe or img tag, or a script's ES import, would fetch remotely."""
    found = []
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            if tag in ("script", "link", "iframe", "img") and REMOTE.match(attrs.get(key) or ""):
                found.append(f"<{tag} {key}={attrs[key]}>")
    for _, text in page.scripts:
        found += re.findall(r"""(?:\bfrom|\bimport\s*\(?)\s*["'](?:https?:)?//[^"']+""", text)
        found += re.findall(r"sourceMappingURL=\S+", text)
    return found


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2, seed=0)


@pytest.fixture(scope="module")
def result(model):
    return tl_reversed.reversed_attention(model, ["a<b>cd", "xyz"], ["e", "f"])


def test_page_has_tokens_heads_and_loads_nothing_remote(result, tmp_path):
    path = tmp_path / "sub" / "map.html"
    text = result.to_html(path)
    assert path.read_text(encoding="utf-8") == text
    page = Page(text)
    assert remote_loads(page) == []
    tokens = result.str_tokens[0]
    assert tokens == ["<bos>", "a", "<", "b", ">", "c", "d"]
    for token in tokens:
        assert f'<span class="tok">{html.escape(token)}<sub>' in text
    ra = page.data_block("cv-ra-props")
    fa = page.data_block("cv-fa-props")
    assert ra["tokens"] == fa["tokens"] == tokens
    top = result.top_heads(8)  # 2 layers x 4 heads: all of them, largest first
    assert ra["attentionHeadNames"] == [f"L{layer}H{head}" for layer, head in top]
    assert (ra["minValue"], ra["maxValue"]) == (-1.0, 1.0)
    assert ra["negativeColor"] != ra["positiveColor"]
    # the CircuitsVis bundle is inlined exactly once and renders both views
    assert text.count("var CircuitsVis=") == 1
    assert sum("CircuitsVis.render(" in script for _, script in page.scripts) == 1


def test_ra_is_scaled_per_head_with_its_sign(result, tmp_path):
    heads = [(1, 3), (0, 0)]
    page = Page(to_html(result, tmp_path / "map.html", heads=heads, example=1))
    ra = torch.tensor(page.data_block("cv-ra-props")["attention"])
    fa = torch.tensor(page.data_block("cv-fa-props")["attention"])
    assert page.data_block("cv-ra-props")["tokens"] == ["<bos>", "x", "y", "z"]
    for shown, shown_fa, (layer, head) in zip(ra, fa, heads):
        raw = result.head(layer, head, example=1).float()
        assert shown.abs().max() == pytest.approx(1.0)
        torch.testing.assert_close(shown, raw / raw.abs().max(), atol=1e-5, rtol=0)
        big = raw.abs() > 1e-3 * raw.abs().max()
        assert torch.equal(shown[big].sign(), raw[big].sign())
        torch.testing.assert_close(shown_fa, result.head_pattern(layer, head, example=1).float(), atol=1e-5, rtol=0)


def test_normalise_per_head_keeps_zero_maps():
    maps = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[-4.0, 0.0], [2.0, -1.0]]])
    expected = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[-1.0, 0.0], [0.5, -0.25]]])
    torch.testing.assert_close(normalise_per_head(maps), expected)


def test_script_closing_text_in_tokens_cannot_break_the_page(model, tmp_path):
    result = tl_reversed.reversed_attention(model, "</script><b>", "x")
    text = to_html(result, title="</script> title")
    page = Page(text)
    assert [attrs.get("type") for attrs, _ in page.scripts] == [None, "application/json", "application/json", None]
    assert page.data_block("cv-ra-props")["tokens"] == result.str_tokens[0]
    assert "</script" not in circuitsvis_bundle()


def test_bad_arguments_say_what_to_do(model, result, tmp_path):
    norms_only = tl_reversed.reversed_attention(model, "abc", "d", keep="norms")
    with pytest.raises(ValueError, match="keep='maps'"):
        to_html(norms_only, tmp_path / "x.html")
    with pytest.raises(ValueError, match="heads is empty"):
        to_html(result, tmp_path / "x.html", heads=[])
    with pytest.raises(IndexError, match="example 5 out of range"):
        to_html(result, tmp_path / "x.html", example=5)


@pytest.mark.embedded
def test_embedded_model_page_has_the_prompt_tokens(embedded_model, tmp_path):
    result = tl_reversed.reversed_attention(embedded_model, "The capital city of France is", " Paris")
    text = result.to_html(tmp_path / "map.html", heads=result.top_heads(3))
    page = Page(text)
    assert remote_loads(page) == []
    for token in [" capital", " city", " of", " France", " is"]:
        assert f'<span class="tok">{token}<sub>' in text
    assert page.data_block("cv-ra-props")["tokens"][1:] == ["The", " capital", " city", " of", " France", " is"]
    assert "&#x27; Paris&#x27;" in text  # the target, in the title


def test_the_remote_check_catches_circuitsvis_cdn_html():
    from circuitsvis.attention import attention_heads

    cdn = attention_heads(torch.zeros(1, 2, 2), ["a", "b"]).cdn_src
    assert remote_loads(Page(cdn)) and all("unpkg.com" in url for url in remote_loads(Page(cdn)))
