"""The result of :func:`tl_reversed.flow_graph`: :class:`FlowGraph`.

What its nodes and edges are is defined in :mod:`tl_reversed.lens.flow_graph`; the
figure and the interactive page are drawn by :mod:`tl_reversed.views.flow_graph`,
imported only when :meth:`FlowGraph.plot` or :meth:`FlowGraph.to_html` is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from tl_reversed.core.results import Result

WHICH = ("nodes", "edges")


@dataclass
class FlowGraph(Result):
    """One prompt's flow graph at one position: nodes, edges and the tensors they were cut from.

    Attributes:
        nodes: columns of the node table (see :meth:`to_dataframe`): ``id``, ``kind``
            (``resid_pre``, ``resid_mid``, ``resid_post``, ``head``, ``memory``, ``neuron``,
            ``final``), ``layer``, ``head``, ``index`` (key position of a memory, neuron
            index), ``name``, ``norm``; the logit lens: ``top_tokens``, ``top_probs``,
            ``rank`` and ``prob`` of the tracked token, ``entropy`` (nats); the backward
            view: ``toward``/``away`` (tokens a descent step along ``-VJP`` raises/lowers),
            ``backward_rank`` (the tracked token's rank among ``toward``; -1 without a VJP),
            ``dloss`` (the first-order loss change the contribution causes: negative
            helps the target), ``ra`` (a memory's Reversed Attention entry; a head's RA row norm).
        edges: columns of the edge table: ``source``, ``target`` (node ids), ``kind``
            (``residual``, ``skip``, ``head``, ``memory``, ``neuron``), ``weight`` (forward:
            a head's or the residual's projection on the direction of the node it writes to,
            a memory's or neuron's norm), ``backward_weight`` (``|dloss|``), ``dloss``.
        str_tokens: the prompt's tokens; position: the query position (absolute).
        layers: the chosen layers (axis ``layer`` of the tensors).
        prompt, target: the strings given; tracked, tracked_id: the token whose rank every
            node reports (the target's first token, or the model's own top-1).
        loss: the target cross-entropy (NaN without a backward pass).
        parallel: per layer, whether the block is parallel (no ``resid_mid``: the middle
            slot of ``resid`` holds ``resid_pre + attn_out``, and of ``resid_grad`` the
            gradient of ``resid_post``).
        final_logits: the model's logits at the position.
        resid: ``[layer, 3, d_model]`` resid_pre, resid_mid, resid_post at the position.
        attn_out, mlp_out: the sublayer outputs added to the residual stream.
        head_out: ``[layer, head, d_model]``; ``sum(head_out) + attn_bias == attn_out``.
        memories: ``[layer, head, key, d_model]``; ``memories.sum(key) == head_out``.
        neuron_acts: ``[layer, d_mlp]`` (``mlp.hook_post``, gate product included);
            ``(neuron_acts @ W_out) * mlp_gain + mlp_bias == mlp_out``.
        mlp_gain: a post-norm's gain over its (frozen) scale, ones without post-norm.
        resid_grad, z_grad, act_grad: the gradients of the loss at the same activations.
        ra_rows: ``[layer, head, key]`` each head's Reversed Attention row at the position.
    """

    nodes: dict
    edges: dict
    str_tokens: list[str]
    position: int
    layers: list[int]
    prompt: str
    target: str | None
    tracked: str
    tracked_id: int
    loss: float
    parallel: list[bool]
    final_logits: Float[Tensor, " d_vocab"]
    resid: Float[Tensor, "layer 3 d_model"]
    attn_out: Float[Tensor, "layer d_model"]
    mlp_out: Float[Tensor, "layer d_model"]
    head_out: Float[Tensor, "layer head d_model"]
    memories: Float[Tensor, "layer head key d_model"]
    attn_bias: Float[Tensor, "layer d_model"]
    neuron_acts: Float[Tensor, "layer d_mlp"]
    mlp_gain: Float[Tensor, "layer d_model"]
    mlp_bias: Float[Tensor, "layer d_model"]
    resid_grad: Float[Tensor, "layer 3 d_model"] | None = None
    z_grad: Float[Tensor, "layer head d_head"] | None = None
    act_grad: Float[Tensor, "layer d_mlp"] | None = None
    ra_rows: Float[Tensor, "layer head key"] | None = None

    @property
    def backward(self) -> bool:
        """Whether the graph carries the backward view."""
        return self.resid_grad is not None

    def __len__(self) -> int:
        return len(self.nodes["id"])

    def to_dataframe(self, which: str = "nodes") -> pd.DataFrame:
        """The node table (``which="nodes"``, one row per node) or the edge table (``"edges"``)."""
        if which not in WHICH:
            raise ValueError(f"which must be one of {WHICH}, got {which!r}")
        return pd.DataFrame(self.nodes if which == "nodes" else self.edges)

    def edges_dataframe(self) -> pd.DataFrame:
        """The edge table: ``to_dataframe("edges")``."""
        return self.to_dataframe("edges")

    def node(self, node_id: str) -> dict:
        """One node's row as a dict, by id (e.g. ``"L3.H2"``, ``"final"``)."""
        ids = self.nodes["id"]
        if node_id not in ids:
            raise KeyError(f"no node {node_id!r} in this graph; its ids are e.g. {ids[:4]}")
        i = ids.index(node_id)
        return {name: values[i] for name, values in self.nodes.items()}

    def to_networkx(self):
        """A ``networkx.DiGraph`` with every node's and edge's columns as attributes."""
        try:
            import networkx as nx
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("to_networkx needs networkx: pip install networkx") from error
        graph = nx.DiGraph(prompt=self.prompt, target=self.target, tracked=self.tracked, position=self.position)
        for row in self.to_dataframe("nodes").to_dict("records"):
            graph.add_node(row.pop("id"), **row)
        for row in self.to_dataframe("edges").to_dict("records"):
            graph.add_edge(row.pop("source"), row.pop("target"), **row)
        return graph

    def plot(self, view: str = "forward", ax=None):
        """A static matplotlib figure of the graph (``view="forward"`` or ``"backward"``); a Figure."""
        from tl_reversed.views.flow_graph import plot_flow_graph

        return plot_flow_graph(self, view=view, ax=ax)

    def to_html(self, path: str | Path | None = None, title: str | None = None) -> str:
        """An interactive, offline page (plotly Sankey, forward/backward toggle), written to ``path`` when given.

        Returns the page as a string (see :func:`tl_reversed.views.flow_graph.flow_graph_html`).
        """
        from tl_reversed.views.flow_graph import flow_graph_html

        return flow_graph_html(self, path, title=title)

    def _repr_html_(self) -> str:
        """The :meth:`to_html` page, so a bare result in a notebook cell shows the graph inline."""
        return self.to_html()
