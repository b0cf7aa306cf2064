"""The pass-engine sinks of the lens: :class:`LensSink` (each chunk's VJPs projected to the
vocabulary, gathered in a :class:`Collector`) and :class:`WeightSink` (a weight's inputs
and VJPs, for :func:`tl_reversed.lens.backward_lens.gradient_rank`).

Each follows :class:`tl_reversed.core.engine.Sink`: ``hooks(chunk)``, ``merge(chunk)``,
``finish()``.
"""

from __future__ import annotations

import einops
import torch
from torch import Tensor

from tl_reversed.core.architecture import FINAL_NORM, FINAL_NORM_SCALE, attn_hook, block_hook
from tl_reversed.core.engine import Chunk, Hook
from tl_reversed.core.inputs import Batch
from tl_reversed.lens.projection import Projector, store_rows
from tl_reversed.lens.results import TopTokens

RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post")
"""Sites read by a gradient hook on the tensor itself (see :meth:`LensHooks._tensor_grad`)."""


class LensHooks:
    """Hooks that keep the VJPs of the chosen sites (and of ``hook_z``) during one chunk's pass.

    The residual-stream sites are read by a hook on the tensor itself, registered in a
    forward hook: its gradient is the VJP of the residual, whatever reads it afterwards.
    A backward hook would see only what flows back through the hook point's output: on a
    TransformerBridge ``hook_resid_mid`` is ``ln2.hook_in``, whose output feeds the MLP
    branch alone while the residual also feeds the skip connection.
    """

    def __init__(self, sites: list[str], layers: list[int], heads: bool, jacobian: bool):
        self.sites, self.layers, self.heads, self.jacobian = sites, layers, heads, jacobian
        self.grads: dict[tuple[str, int], Tensor] = {}
        self.final: dict[str, Tensor] = {}

    def hooks(self) -> tuple[list, list]:
        fwd, bwd = [], []
        if self.jacobian:
            fwd += [(FINAL_NORM, self._save(FINAL_NORM)), (FINAL_NORM_SCALE, self._save(FINAL_NORM_SCALE))]
        for layer in self.layers:
            for site in self.sites:
                if site in RESIDUAL_SITES:
                    fwd.append((block_hook(layer, site), self._tensor_grad(site, layer)))
                else:
                    bwd.append((block_hook(layer, site), self._grad(site, layer)))
            if self.heads:
                bwd.append((attn_hook(layer, "z"), self._grad("z", layer)))
        return fwd, bwd

    def _save(self, name: str):
        def hook(x: Tensor, hook: object) -> None:
            self.final[name] = x.detach()

        return hook

    def _grad(self, site: str, layer: int):
        def hook(grad: Tensor, hook: object) -> None:
            self.grads[(site, layer)] = grad.detach()

        return hook

    def _tensor_grad(self, site: str, layer: int):
        def hook(x: Tensor, hook: object) -> Tensor:
            if x.requires_grad:  # (on the bounded pass, the recomputed copy's hook never fires: it is not differentiated)
                x.register_hook(lambda grad: self.grads.__setitem__((site, layer), grad.detach()))
            return x  # returned, so the model reads this very tensor on

        return hook

    def check_fired(self) -> None:
        missing = [(site, layer) for layer in self.layers for site in self.sites if (site, layer) not in self.grads]
        if missing:
            site, layer = missing[0]
            raise TypeError(
                f"the backward hook on {block_hook(layer, site)} never fired: this model does not carry "
                "gradients through that hook point; choose other sites"
            )
        bad = [key for key, grad in self.grads.items() if not bool(torch.isfinite(grad).all())]
        if bad:  # the engine checks the gradients of backward hooks; tensor hooks are checked here
            raise FloatingPointError(
                f"the gradient at {block_hook(bad[0][1], bad[0][0])} has NaN or inf entries: the model overflowed in "
                "its dtype; run it in float32 (load_model(..., dtype=torch.float32)) or shorten the prompt"
            )


class LensSink:
    """The pass-engine sink of the backward lens: each chunk's VJPs projected to the vocabulary."""

    def __init__(self, model: torch.nn.Module, batch: Batch, *, sites: list[str], layers: list[int], n_heads: int,
                 heads: bool, keep: str, projector: Projector, with_rank: bool):  # fmt: skip
        n, width = batch.tokens.shape
        self.model, self.sites, self.layers, self.heads, self.projector = model, sites, layers, heads, projector
        self.dtype = projector.gain.dtype
        self.out = Collector(n, width, sites=sites, layers=layers, n_heads=n_heads, heads=heads, keep=keep,
                             k=projector.top_k, d_model=projector.d_model, dtype=self.dtype, with_rank=with_rank)  # fmt: skip
        self._hooks: LensHooks | None = None

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        self._hooks = LensHooks(self.sites, self.layers, self.heads, self.projector.jacobian)
        return self._hooks.hooks()

    def merge(self, chunk: Chunk) -> None:
        assert self._hooks is not None
        self._hooks.check_fired()
        with torch.no_grad():
            fill(self.out, chunk.index, self._hooks, chunk.batch, sites=self.sites, layers=self.layers,
                 heads=self.heads, projector=self.projector, model=self.model, dtype=self.dtype)  # fmt: skip
        self._hooks = None

    def finish(self) -> Collector:
        return self.out


class Collector:
    """Accumulates the per-chunk results of :class:`LensSink` into padded tensors."""

    def __init__(self, n: int, width: int, *, sites: list[str], layers: list[int], n_heads: int, heads: bool,
                 keep: str, k: int, d_model: int, dtype: torch.dtype, with_rank: bool):  # fmt: skip
        self.site_shape = (n, len(sites), len(layers), width)
        self.head_shape = (n, len(layers), n_heads, width)
        self.norms = torch.zeros(self.site_shape, dtype=dtype)
        self.top = self._top(self.site_shape, k, dtype, with_rank)
        self.vjps = torch.zeros(*self.site_shape, d_model, dtype=dtype) if keep == "vectors" else None
        self.head_norms = torch.zeros(self.head_shape, dtype=dtype) if heads else None
        self.head_top = self._top(self.head_shape, k, dtype, with_rank) if heads else None
        self.head_vjps = torch.zeros(*self.head_shape, d_model, dtype=dtype) if heads and keep == "vectors" else None

    @staticmethod
    def _top(shape: tuple, k: int, dtype: torch.dtype, with_rank: bool) -> TopTokens:
        return TopTokens(
            toward_ids=torch.full((*shape, k), -1, dtype=torch.long),
            toward_values=torch.full((*shape, k), float("nan"), dtype=dtype),
            away_ids=torch.full((*shape, k), -1, dtype=torch.long),
            away_values=torch.full((*shape, k), float("nan"), dtype=dtype),
            target_rank=torch.zeros(shape, dtype=torch.long) if with_rank else None,
        )


def fill(
    out: Collector,
    idx: Tensor,
    sink: LensHooks,
    sub: Batch,
    *,
    sites: list[str],
    layers: list[int],
    heads: bool,
    projector: Projector,
    model: torch.nn.Module,
    dtype: torch.dtype,
) -> None:
    """Project the VJPs of one chunk and write them into ``out`` at rows ``idx``."""
    n, w = sub.tokens.shape
    device = projector.w_u.device
    real = (torch.arange(w)[None, :] < sub.lengths[:, None]).to(device)  # [n, w]
    xhat = scale = None
    if projector.jacobian:
        xhat = sink.final[FINAL_NORM].to(device, dtype).flatten(0, 1)
        scale = sink.final[FINAL_NORM_SCALE].to(device, dtype).flatten()
    target = None
    if out.top.target_rank is not None:
        first = torch.stack([t[0] for t in sub.targets]).to(device)
        target = einops.repeat(first, "b -> (b p)", p=w)
    for s, site in enumerate(sites):
        for j, layer in enumerate(layers):
            g = sink.grads[(site, layer)].to(device, dtype) * real[..., None]  # [n, w, d_model], on the projector's device
            index = (idx, s, j, slice(0, w))
            norms = g.norm(dim=-1)
            out.norms[index] = norms.cpu()
            if out.vjps is not None:
                out.vjps[index] = g.cpu()
            live = real & (norms > 0)  # a zero VJP (e.g. the last layer before the target) reads as nothing
            flat = live.flatten()
            parts = projector.top(
                g.flatten(0, 1)[flat],
                None if xhat is None else xhat[flat],
                None if scale is None else scale[flat],
                None if target is None else target[flat],
            )
            store_rows(out.top, index, live.cpu(), parts)
    if not heads:
        return
    for j, layer in enumerate(layers):
        w_o = model.blocks[layer].attn.W_O.detach().to(device, dtype)  # type: ignore[index]
        dz = sink.grads[("z", layer)].to(device, dtype)
        mapped = einops.einsum(dz, w_o, "b p h d, h d m -> b h p m") * real[:, None, :, None]
        index = (idx, j, slice(None), slice(0, w))
        norms = mapped.norm(dim=-1)
        out.head_norms[index] = norms.cpu()  # type: ignore[index]
        if out.head_vjps is not None:
            out.head_vjps[index] = mapped.cpu()
        n_heads = mapped.shape[1]
        head_real = (einops.repeat(real, "b p -> b h p", h=n_heads) & (norms > 0)).flatten()

        def per_head(t: Tensor | None) -> Tensor | None:
            """Rows indexed by (batch, pos) repeated for every head, real rows only."""
            if t is None:
                return None
            grid = t.view(n, w, *t.shape[1:])
            return einops.repeat(grid, "b p ... -> b h p ...", h=n_heads).flatten(0, 2)[head_real]

        rows = mapped.flatten(0, 2)[head_real]
        parts = projector.top(rows, per_head(xhat), per_head(scale), per_head(target))
        store_rows(out.head_top, index, head_real.view(n, n_heads, w).cpu(), parts)  # type: ignore[arg-type]


class WeightSink:
    """The pass-engine sink of :func:`gradient_rank`: a weight's inputs and VJPs at every real position."""

    def __init__(self, io: object, matrix: str):
        self.io, self.matrix = io, matrix
        self.saved: dict[str, Tensor] = {}
        self.inputs: list[Tensor] = []
        self.vjps: list[Tensor] = []

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        def keep_input(x: Tensor, hook: object) -> None:
            self.saved["input"] = x.detach()

        def keep_grad(grad: Tensor, hook: object) -> None:
            self.saved["grad"] = grad.detach()

        return [(self.io.input_hook, keep_input)], [(self.io.grad_hook, keep_grad)]  # type: ignore[attr-defined]

    def merge(self, chunk: Chunk) -> None:
        if "grad" not in self.saved:
            raise TypeError(f"the backward hook on {self.io.grad_hook} never fired: this model cannot carry {self.matrix}")  # type: ignore[attr-defined]
        x = self.saved.pop("input").double()
        affine = self.io.input_norm  # type: ignore[attr-defined]
        if affine is not None:
            x = x * affine.gain.to(x)
            x = x + affine.bias.to(x) if affine.bias is not None else x
        x = x.flatten(2)  # W_O: [batch, pos, head, d_head] -> [batch, pos, head * d_head]
        g = self.saved.pop("grad").double().flatten(2)
        w = chunk.batch.tokens.shape[1]
        real = torch.arange(w)[None, :] < chunk.batch.lengths[:, None]
        self.inputs.append(x[real.to(x.device)].cpu())
        self.vjps.append(g[real.to(g.device)].cpu())

    def finish(self) -> tuple[Tensor, Tensor]:
        return torch.cat(self.inputs), torch.cat(self.vjps)
