"""Interactive attention maps as one self-contained HTML file (CircuitsVis).

:func:`to_html` makes a page with CircuitsVis ``AttentionHeads`` views of the RA maps
and the forward attention of chosen heads (hover a cell for its tokens and value,
click a head to lock it), the prompt's tokens, and a table of what each head's
dominant query row pushes up and down.

The page opens offline: CircuitsVis' own ``attention_heads(...)`` HTML imports its
JavaScript from a CDN unless it detects that it is offline, so this module inlines the
bundle that ships inside the ``circuitsvis`` wheel (``dist/cdn/iife.js``) once, and
renders each view from a JSON data block. Nothing on the page names a remote URL.

RA maps are scaled per head to ``[-1, 1]`` by the head's largest ``|RA|`` for display
(the sign is kept: blue negative, red positive); the table lists the unscaled norms.
A gradient-descent step moves attention along ``-RA``, so blue keys gain attention.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from tl_reversed.views.segments import result_boundaries

if TYPE_CHECKING:  # pragma: no cover
    from tl_reversed.core.reversed_attention import ReversedAttention

NEGATIVE_COLOR = "#2166ac"  # blue, as matplotlib's RdBu_r in tl_reversed.views.plotting
POSITIVE_COLOR = "#b2182b"  # red
FA_COLOR = "#08519c"
DEFAULT_HEADS = 10
DIGITS = 5

_STYLE = """
.tlr-page { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1100px;
            color: #222; line-height: 1.45; padding: 0 16px; }
.tlr-page h1 { font-size: 1.5em; margin-bottom: 0.2em; }
.tlr-page h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.tlr-page .note { color: #555; font-size: 0.95em; }
.tlr-page .tokens { display: flex; flex-wrap: wrap; gap: 4px; margin: 8px 0; }
.tlr-page .tok { white-space: pre; font-family: ui-monospace, monospace; background: #f3f3f3; border: 1px solid #ddd;
                 border-radius: 3px; padding: 1px 4px; }
.tlr-page .tok sub { color: #888; font-size: 0.7em; }
.tlr-page table { border-collapse: collapse; font-size: 0.9em; }
.tlr-page th, .tlr-page td { border-bottom: 1px solid #e4e4e4; padding: 3px 10px; text-align: left; }
.tlr-page td.num { text-align: right; font-variant-numeric: tabular-nums; }
.tlr-page code { white-space: pre; background: #f6f6f6; padding: 0 3px; }
.tlr-page .up { color: #2166ac; } .tlr-page .down { color: #b2182b; }
"""
# Scoped to .tlr-page, so the page shown inline in a notebook (``_repr_html_``) restyles nothing around it.

_RENDER = """
(function () {
  // Look the views up next to this script, not by document-wide id: a notebook may show several pages.
  const me = document.currentScript;
  const root = (me && me.closest(".tlr-page")) || document;
  for (const id of %s) {
    const props = JSON.parse(root.querySelector('[id="' + id + '-props"]').textContent);
    const target = root.querySelector('[id="' + id + '"]');
    if (document.querySelectorAll('[id="' + id + '"]').length > 1) {  // another page's view holds this id
      target.id = id + "-" + Math.random().toString(36).slice(2);
    }
    CircuitsVis.render(target.id, CircuitsVis.AttentionHeads, props);
  }
})();
"""


def circuitsvis_bundle() -> str:
    """The CircuitsVis browser bundle from the installed wheel, safe to inline in a script tag."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.exists():
        raise FileNotFoundError(
            f"the CircuitsVis bundle {path} is missing: reinstall it with pip install --force-reinstall circuitsvis"
        )
    source = path.read_text(encoding="utf-8")
    lines = [line for line in source.splitlines() if not line.startswith("//# sourceMappingURL=")]
    # "</script" inside a string literal would end the script element; "<\/script" is the same string.
    return "\n".join(lines).replace("</script", "<\\/script")


def _json_block(value: object) -> str:
    """JSON safe inside ``<script type="application/json">`` (no ``</``)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


def normalise_per_head(maps: Float[Tensor, "head query_pos key_pos"]) -> Float[Tensor, "head query_pos key_pos"]:
    """Each head's map divided by its largest absolute value (zero maps stay zero)."""
    peak = maps.abs().amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def _rounded(maps: Tensor) -> list:
    return torch.round(maps.float(), decimals=DIGITS).tolist()


def _heads(result: ReversedAttention, heads: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    if heads is None:
        return result.top_heads(min(DEFAULT_HEADS, len(result.layers) * result.n_heads))
    chosen = [(int(layer), int(head)) for layer, head in heads]
    if not chosen:
        raise ValueError("heads is empty: pass None for the top heads or a list of (layer, head) pairs")
    return chosen


def _token_spans(tokens: Sequence[str], starts: Sequence[int] = ()) -> str:
    """The tokens as boxes; a box that starts a segment (``starts``) gets a red left edge."""
    edge = ' style="border-left: 3px solid #d62728"'
    return "".join(
        f'<span class="tok"{edge if i in starts else ""}>{html.escape(t)}<sub>{i}</sub></span>' for i, t in enumerate(tokens)
    )


def _head_table(result: ReversedAttention, heads: list[tuple[int, int]], example: int) -> str:
    rows = []
    i = result._example(example)
    for layer, head in heads:
        info = result.describe_head(layer, head, example)
        fa = float(result.pattern_norms[i, result._layer_index(layer), head])
        peak = float(result.head(layer, head, example).abs().max())
        up = ", ".join(f"<code>{html.escape(t)}</code>" for t, _ in info["pushed_up"]) or "-"
        down = ", ".join(f"<code>{html.escape(t)}</code>" for t, _ in info["pushed_down"]) or "-"
        query = f"{info['query_pos']}: <code>{html.escape(info['query_token'])}</code>"
        rows.append(
            f"<tr><td>L{layer}H{head}</td><td class='num'>{info['ra_norm']:.4g}</td><td class='num'>{fa:.3f}</td>"
            f"<td class='num'>{peak:.3g}</td><td>{query}</td><td class='up'>{up}</td><td class='down'>{down}</td></tr>"
        )
    header = (
        "<tr><th>head</th><th>RA norm</th><th>FA norm</th><th>max |RA|</th><th>dominant query row</th>"
        "<th>pushed up (gains attention)</th><th>pushed down</th></tr>"
    )
    return f"<table>{header}{''.join(rows)}</table>"


def _square(result: ReversedAttention, rows: Tensor, example: int) -> Tensor:
    """A map of chosen query rows placed in the ``[query_pos, key_pos]`` square (other rows 0).

    The page's CircuitsVis view needs square maps; whole maps pass through unchanged.
    """
    if result.query_positions is None:
        return rows
    n = rows.shape[-1]
    square = torch.zeros(n, n, dtype=rows.dtype)
    square[result.rows(example)] = rows
    return square


def render_html(
    result: ReversedAttention,
    heads: Sequence[tuple[int, int]] | None = None,
    example: int = 0,
    title: str | None = None,
) -> str:
    """The page :func:`to_html` writes, as a string."""
    if result.maps is None or result.pattern is None:
        raise ValueError("this result kept only norms: call reversed_attention(..., keep='maps') for HTML maps")
    chosen = _heads(result, heads)
    i = result._example(example)
    tokens = list(result.str_tokens[i])
    ra = torch.stack([_square(result, result.head(layer, head, i), i) for layer, head in chosen])
    fa = torch.stack([_square(result, result.head_pattern(layer, head, i), i) for layer, head in chosen])
    names = [f"L{layer}H{head}" for layer, head in chosen]
    ra_props = {
        "attention": _rounded(normalise_per_head(ra)),
        "tokens": tokens,
        "attentionHeadNames": names,
        "minValue": -1.0,
        "maxValue": 1.0,
        "negativeColor": NEGATIVE_COLOR,
        "positiveColor": POSITIVE_COLOR,
        "maskUpperTri": result.segments is None,  # under a segment mask, a segment's future keys are real
    }
    fa_props = {
        "attention": _rounded(fa),
        "tokens": tokens,
        "attentionHeadNames": names,
        "minValue": 0.0,
        "maxValue": 1.0,
        "positiveColor": FA_COLOR,
        "maskUpperTri": result.segments is None,
    }
    prompt = result.prompts[i] if result.prompts else "".join(tokens)
    target = result.targets[i] if result.targets else None
    loss = float(result.loss[i])
    heading = title or f"Reversed Attention: {prompt!r}" + (f" \u2192 {target!r}" if target else "")
    about = f"target <code>{html.escape(target)}</code>, " if target else ""
    if loss == loss:  # not NaN (results from ra_from_cache carry no loss)
        about += f"loss {loss:.3f}, "
    about += f"{len(chosen)} head{'s' if len(chosen) != 1 else ''} shown"
    if result.query_positions is not None:
        about += f" (query rows {result.rows(i)} only: the other rows were not computed and show 0)"
    starts = result_boundaries(result, i)
    if result.segments is not None:
        about += (f". Run under a segment mask (MAS): each prompt token sees its whole segment and the earlier ones; "
                  f"new segments (red edges below) start at positions {starts}, the last one being the end of the prompt "
                  "if tokens follow it")  # fmt: skip
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(heading)}</title>
<style>{_STYLE}</style>
</head>
<body>
<div class="tlr-page">
<h1>{html.escape(heading)}</h1>
<p class="note">{about}. RA is the gradient of the loss with respect to each head's
Q&middot;K<sup>T</sup> (Katz &amp; Wolf, NAACL 2025). A gradient-descent step moves attention along
&minus;RA: <span class="up">blue (negative) keys gain attention</span>, <span class="down">red (positive)
keys lose it</span>. Rows are queries, columns keys; keys the mask hides show 0.</p>
<h2>Tokens</h2>
<div class="tokens" id="tokens">{_token_spans(tokens, starts)}</div>
<h2>Reversed attention</h2>
<p class="note">Each head is scaled to its own largest |RA| (sign kept), so shapes compare across heads,
sizes do not: see the norms in the table. Hover a thumbnail to view a head, click to lock it; hover a cell
for its query, key and value.</p>
<div id="cv-ra"></div>
<h2>Forward attention</h2>
<p class="note">The same heads' attention patterns (0 to 1).</p>
<div id="cv-fa"></div>
<h2>Heads</h2>
{_head_table(result, chosen, i)}
<script>{circuitsvis_bundle()}</script>
<script type="application/json" id="cv-ra-props">{_json_block(ra_props)}</script>
<script type="application/json" id="cv-fa-props">{_json_block(fa_props)}</script>
<script>{_RENDER % json.dumps(["cv-ra", "cv-fa"])}</script>
</div>
</body>
</html>
"""


def to_html(
    result: ReversedAttention,
    path: str | Path | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    example: int = 0,
    title: str | None = None,
) -> str:
    """An interactive, self-contained HTML page of RA and forward-attention maps.

    Args:
        result: a :class:`~tl_reversed.ReversedAttention` that kept its maps.
        path: where to write the page (parent folders are created); None writes nothing.
        heads: ``(layer, head)`` pairs to show; default the top 10 by RA norm.
        example: which example of the result to show.
        title: the page title (default: the prompt and target).

    Returns:
        The page as a string (the same for every caller: ``IPython.display.HTML(page)``
        shows it inline). It loads nothing from the network (the CircuitsVis bundle is
        inlined, about 1.3 MB) and opens offline in any modern browser.
    """
    page = render_html(result, heads=heads, example=example, title=title)
    if path is not None:
        write_page(page, path)
    return page


def write_page(page: str, path: str | Path) -> Path:
    """Write an HTML page as UTF-8, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
