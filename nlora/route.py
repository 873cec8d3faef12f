"""Per-row adapter routing: one batch, each row through its own adapter (or the base model), for inference."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer import Adapter, NLoRALinear, _accumulate, _down
from .model import _require_adapters, _refuse_unknown


class _LayerRoute:
    """One layer's routing for a batch. Row ``i`` gets ``W0 x + s B N A x`` of its adapter (``W0``: the original
    weight, so every output-preserving adapter's initial delta is given back on the rows it does not serve), or
    ``W0 x`` for ``None``. Adapters that read A and B from the base weight with the same rank and index sets (IntTune
    on the paper's init) share A and B: they run as one ``x Aᵀ``, a batched product with each row's own ``s N`` and
    one ``B``. Every other adapter runs on its own rows.

    ``names``: ``None``, then the route's distinct adapter names; ``rows(device, j)``: the batch rows routed to
    ``names[j]`` (``j = 0``: every row, by its name's position), made once per route and device."""

    def __init__(self, layer: NLoRALinear, names: list[str | None], rows) -> None:
        adapters, device = layer.adapters, layer.weight.device
        self.size = len(rows(torch.device("cpu"), 0))
        self.preserving = [] if layer.four_bit else [adapters[n] for n in layer.preserving]
        family = [n for n in names if n in adapters and adapters[n].reads_base]
        shared = {n: adapters[n].scaling for n in family if _shares_base(adapters[n], adapters[family[0]])}  # name: s
        self.shared = None
        if shared:  # each row's s N in the compute dtype, indexed by its name's position (zero: not in the family)
            first = adapters[family[0]]
            zero = torch.zeros_like(first.lora_N)
            bank = torch.stack([adapters[n].lora_N if n in shared else zero for n in names]).detach()
            scales = torch.tensor([shared.get(n, 0.0) for n in names], device=device)
            bank = bank * scales.to(bank.dtype)[:, None, None]
            self.shared = (first, bank.to(layer.compute_dtype or layer.weight.dtype), rows(device, 0))
        self.groups = [(adapters[n], rows(device, j)) for j, n in enumerate(names) if n in adapters and n not in shared]

    def __call__(self, layer: NLoRALinear, x: Tensor) -> Tensor:
        if x.shape[0] != self.size:
            raise ValueError(f"{layer.module_name}: the route has {self.size} entries but the batch has {x.shape[0]} "
                             f"rows; pass one adapter name (or None) per row")
        if torch.is_grad_enabled():
            raise RuntimeError(f"{layer.module_name}: nlora.route is for inference; run the routed model under "
                               f"torch.no_grad() or torch.inference_mode() (to train one adapter, use set_adapter)")
        if layer.disabled or layer.merged_adapters:
            raise RuntimeError(f"{layer.module_name}: routing needs every adapter unmerged and enabled; leave "
                               f"disable_adapter / call nlora.unmerge(model) first")
        w, y = layer.weight, layer.base(x)
        dt = layer.compute_dtype or y.dtype
        x3, out = x.reshape(self.size, -1, x.shape[-1]), y.reshape(self.size, -1, y.shape[-1]).to(dt)
        flat = out.view(-1, out.shape[-1])
        _add(flat, [a(None, w, initial=True) for a in self.preserving], x3.view(-1, x3.shape[-1]))  # W0 on every row
        if self.shared is not None:
            first, bank, ids = self.shared
            a, _, b = first.factors(w)
            h = torch.bmm(F.linear(x3.to(dt), a.to(dt)), bank.to(dt)[ids].transpose(1, 2))
            flat.addmm_(h.view(-1, h.shape[-1]), b.to(dt).t())
        for adapter, rows in self.groups:
            xs = x3.index_select(0, rows)
            part = torch.zeros(xs.shape[0] * xs.shape[1], flat.shape[-1], dtype=dt, device=flat.device)
            # its own initial delta (if its init preserves the output) is in the weight already
            own = [adapter(None, w, -1.0, initial=True)] if adapter.config.preserve_output else []
            _add(part, [adapter(xs, w)] + own, xs.reshape(-1, xs.shape[-1]))
            out.index_add_(0, rows, part.view(xs.shape[0], xs.shape[1], -1))
        return out.to(y.dtype).view(*x.shape[:-1], out.shape[-1])


def _add(out: Tensor, terms: list[tuple], x: Tensor) -> None:
    """``out += Σ s B N A x`` over ``terms`` (each on its own input if it has one, e.g. after dropout), in ``out``'s
    dtype."""
    products = [_down(out.dtype, x if xk is None else xk.reshape(x.shape), a, n, b) for xk, a, n, b, _, _ in terms]
    _accumulate(out, [p[5] for p in products], [p[3].t() for p in products], [t[4] for t in terms])


def _shares_base(adapter: Adapter, first: Adapter) -> bool:
    """Whether ``adapter`` reads the same A and B from the base weight as ``first`` (same rank and index sets)."""
    return (adapter.config.rank == first.config.rank
            and (adapter.rows is first.rows or torch.equal(adapter.rows, first.rows))
            and (adapter.cols is first.cols or torch.equal(adapter.cols, first.cols))
            and (adapter.dropout is None or not adapter.training))


@contextmanager
def route(model: nn.Module, adapters: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row ``i`` of every batch runs through adapter ``adapters[i]`` (``None``: the original base
    model, as under ``disable_adapter``): one adapter name, or ``None``, per batch row. For inference (refused while
    autograd records); every forward inside, ``generate()`` with a KV cache included, is routed. IntTune adapters on
    the paper's init share A and B, so a batch mixing K of them costs about one adapter."""
    layers = _require_adapters(model)
    names = list(adapters)
    _refuse_unknown(model, names, "route: ")
    for layer in layers.values():
        if getattr(layer, "routing", None) is not None or layer.disabled or layer.merged_adapters:
            raise RuntimeError(f"{layer.module_name}: cannot route while adapters are merged, disabled "
                               f"(disable_adapter) or already routed; unmerge / leave that block first")
    position = {n: j for j, n in enumerate(dict.fromkeys([None, *names]))}  # None (the base model) first: 0
    ids = torch.tensor([position[n] for n in names])

    @functools.cache  # once per device and j
    def rows(device: torch.device, j: int) -> Tensor:
        return (ids if j == 0 else (ids == j).nonzero().squeeze(1)).to(device)

    routes = {name: _LayerRoute(layer, list(position), rows) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.routing = routes[name]
    try:
        yield model
    finally:
        for layer in layers.values():
            layer.routing = None
