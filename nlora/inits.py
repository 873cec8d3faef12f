"""Initialisers: pure functions from a weight ``(out, in)`` to adapter factors, and their registry.

Every initialiser has the signature ``fn(weight, rank, *, scaling, generator, **options) -> Factors``. ``weight`` is
read, never written; the factors come back on ``weight``'s device such that ``scaling * B @ N @ A`` is the initial
delta. Whether the base weight is then corrected so that the output is unchanged (``preserve_output``) is the
layer's business, not the initialiser's.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import sharded
from .nystrom import optimal_cores, select_indices, truncated_pinv


@dataclass(frozen=True)
class Factors:
    """Initial factors in torch layout: ``A (r, in)``, ``N (r, r)`` or ``None``, ``B (out, r)``, and for Nyström
    inits the sampled row and column indices."""

    A: Tensor
    N: Tensor | None
    B: Tensor
    rows: Tensor | None = None
    cols: Tensor | None = None


@dataclass(frozen=True)
class InitSpec:
    """A registered initialiser and what the rest of the library must know about it."""

    name: str
    fn: Callable[..., Factors]
    data_driven: bool  # reads the weight's values (so they must be finite)
    has_middle: bool  # produces an r x r middle matrix N
    preserve_default: bool = False  # default of preserve_output
    preserve_fixed: bool = False  # preserve_output cannot be switched off (pissa)
    zero_delta: bool = False  # B = 0: the initial delta is exactly zero
    options: tuple[str, ...] = ()  # the keyword-only options of fn
    # optional batched form ``many(weights, ranks, *, scalings, generators, **options) -> list[Factors]``
    many: Callable[..., list[Factors]] | None = None


INITIALIZERS: dict[str, InitSpec] = {}


def register_init(name: str, *, data_driven: bool, has_middle: bool, preserve_default: bool = False,
                  preserve_fixed: bool = False, zero_delta: bool = False) -> Callable:
    """Decorator: register ``fn(weight, rank, *, scaling, generator, **options) -> Factors`` as ``name``."""

    def wrap(fn: Callable[..., Factors]) -> Callable[..., Factors]:
        options = tuple(p.name for p in inspect.signature(fn).parameters.values()
                        if p.kind is p.KEYWORD_ONLY and p.name not in ("scaling", "generator"))
        INITIALIZERS[name] = InitSpec(name, fn, data_driven, has_middle, preserve_default, preserve_fixed, zero_delta,
                                      options)
        return fn

    return wrap


def register_many(name: str) -> Callable:
    """Decorator: attach a batched form to the registered initialiser ``name`` (``inject`` calls it once for all the
    layers it adapts; it must equal ``fn`` layer by layer, to rounding)."""

    def wrap(many: Callable[..., list[Factors]]) -> Callable[..., list[Factors]]:
        INITIALIZERS[name] = replace(INITIALIZERS[name], many=many)
        return many

    return wrap


def get_init(name: str) -> InitSpec:
    """Look up an initialiser, with an error that lists the known names."""
    try:
        return INITIALIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown init {name!r}; choose one of {sorted(INITIALIZERS)}") from None


def _kaiming(rows: int, cols: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``kaiming_uniform_(a=√5)``, the init of nn.Linear and of PEFT's LoRA A."""
    return nn.init.kaiming_uniform_(torch.empty(rows, cols, device=device), a=math.sqrt(5), generator=generator)


@register_init("lora", data_driven=False, has_middle=False, zero_delta=True)
def init_lora(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None) -> Factors:
    """Plain LoRA (Hu et al.): ``A`` Kaiming-uniform (a=√5, as nn.Linear), ``B = 0``, no middle matrix."""
    out_features, in_features = weight.shape
    return Factors(_kaiming(rank, in_features, weight.device, generator), None,
                   torch.zeros(out_features, rank, device=weight.device))


@register_init("gaussian", data_driven=False, has_middle=False, zero_delta=True)
def init_gaussian(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None) -> Factors:
    """LoRA with ``A ~ N(0, std=1/r)`` (PEFT's ``"gaussian"``), ``B = 0``, no middle matrix."""
    out_features, in_features = weight.shape
    return Factors(torch.randn(rank, in_features, device=weight.device, generator=generator) * (1.0 / rank), None,
                   torch.zeros(out_features, rank, device=weight.device))


@register_init("slora", data_driven=False, has_middle=True, zero_delta=True)
def init_slora(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None,
               middle: str = "kaiming") -> Factors:
    """SLoRA: ``A`` and ``N`` Kaiming-uniform (a=√5), ``B = 0``; ``middle="gaussian"`` draws ``N ~ N(0, std=1/r)``
    instead (paper, appendix B; Kaiming won there)."""
    if middle not in ("kaiming", "gaussian"):
        raise ValueError(f"slora option middle={middle!r}: choose 'kaiming' or 'gaussian'")
    out_features, in_features = weight.shape
    return Factors(_kaiming(rank, in_features, weight.device, generator),  # A is drawn first, then N
                   _kaiming(rank, rank, weight.device, generator) if middle == "kaiming"
                   else torch.randn(rank, rank, device=weight.device, generator=generator) * (1.0 / rank),
                   torch.zeros(out_features, rank, device=weight.device))


def nystrom_slices(weight: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """``(R, C) = (W[rows, :], W[:, cols])`` as new fp32 (fp64 for fp64) tensors; a sharded weight sends only these
    rows and columns between ranks."""
    dtype, device = torch.promote_types(weight.dtype, torch.float32), sharded.local_view(weight).device
    return tuple(sharded.take(weight, index.to(device), dim).to(dtype, copy=True)
                 for dim, index in ((0, rows), (1, cols)))


@register_init("nystrom", data_driven=True, has_middle=True)
def init_nystrom(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None,
                 index: str = "first") -> Factors:
    """NLoRA as the paper's code does it: ``A = W[I, :]``, ``N = W[I, J]`` (the core itself, not its
    pseudo-inverse), ``B = W[:, J]``, with ``I = J = 0..r-1`` by default (``index="random"`` / ``"norm"`` sample).

    The base weight is left as it is, so the output changes at init by ``scaling * B N A``
    (``preserve_output=True`` subtracts that from the base weight instead).
    """
    rows, cols = select_indices(weight, rank, index, generator)
    r, c = nystrom_slices(weight, rows, cols)
    return Factors(r, r[:, cols], c, rows, cols)


@register_init("nystrom-pinv", data_driven=True, has_middle=True, preserve_default=True)
def init_nystrom_pinv(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None,
                      index: str = "first", rcond: float | None = 0.1) -> Factors:
    """Exact Nyström of Eq. 6: ``s B N A = C U⁺ R`` with ``N = U⁺ / s``, ``U = W[I, J]``.

    ``U⁺`` drops the singular values below ``rcond * σ_max(U)`` (``None``: torch.linalg.pinv's cutoff) and inverts the
    rest exactly, so a weight of rank r with a well-conditioned core is reproduced to rounding. The cutoff matters on
    full-rank weights, whose sampled cores have condition numbers up to 1e4.
    """
    return init_nystrom_pinv_many([weight], [rank], scalings=[scaling], generators=[generator], index=index,
                                  rcond=rcond)[0]


@register_init("nystrom-optimal", data_driven=True, has_middle=True, preserve_default=True)
def init_nystrom_optimal(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None,
                         index: str = "first", rcond: float | None = None) -> Factors:
    """Nyström with the best core for the sampled rows and columns: ``s B N A = C (C⁺ W R⁺) R``.

    The Frobenius-optimal approximation that uses exactly these ``C`` and ``R``, for one ``(r, out) @ (out, in)``
    product per layer; ``C⁺`` and ``R⁺`` drop singular values below ``rcond * σ_max`` (``None``: torch's cutoff).
    """
    return init_nystrom_optimal_many([weight], [rank], scalings=[scaling], generators=[generator], index=index,
                                     rcond=rcond)[0]


def _batched(weights: Sequence[Tensor], ranks: Sequence[int], scalings: Sequence[float],
             generators: Sequence[torch.Generator | None], index: str,
             cores: Callable[[list[int], list[Factors]], list[Tensor]]) -> list[Factors]:
    """The batched Nyström inits: each layer's ``init_nystrom`` factors ``(R, U, C)`` in layer order (the same draws
    as one by one), then ``cores`` once per group of layers of equal rank and device, each core divided by its layer's
    scaling."""
    out = [init_nystrom(w, k, scaling=s, generator=g, index=index)
           for w, k, s, g in zip(weights, ranks, scalings, generators)]
    groups: dict[tuple, list[int]] = {}
    for i, (w, k) in enumerate(zip(weights, ranks)):
        groups.setdefault((k, sharded.local_view(w).device), []).append(i)
    for members in groups.values():
        for i, core in zip(members, cores(members, [out[i] for i in members])):
            out[i] = replace(out[i], N=core / scalings[i])
    return out


@register_many("nystrom-pinv")
def init_nystrom_pinv_many(weights: Sequence[Tensor], ranks: Sequence[int], *, scalings: Sequence[float],
                           generators: Sequence[torch.Generator | None], index: str = "first",
                           rcond: float | None = 0.1) -> list[Factors]:
    """``init_nystrom_pinv`` of many layers: the r x r cores of each group of equal rank in one batched pinv."""
    return _batched(weights, ranks, scalings, generators, index,
                    lambda members, sl: truncated_pinv(torch.stack([f.N for f in sl]), rcond).unbind(0))


@register_many("nystrom-optimal")
def init_nystrom_optimal_many(weights: Sequence[Tensor], ranks: Sequence[int], *, scalings: Sequence[float],
                              generators: Sequence[torch.Generator | None], index: str = "first",
                              rcond: float | None = None) -> list[Factors]:
    """``init_nystrom_optimal`` of many layers: per layer the product ``Cᵀ W``, then the r x r work as one batch."""
    return _batched(weights, ranks, scalings, generators, index,
                    lambda members, sl: optimal_cores([weights[i] for i in members], [f.B for f in sl],
                                                      [f.A for f in sl], rcond))


@register_init("pissa", data_driven=True, has_middle=True, preserve_default=True, preserve_fixed=True)
def init_pissa(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None,
               svd: str = "full", niter: int = 4) -> Factors:
    """PiSSA in three-matrix form: ``B = U_r``, ``N = diag(S_r) / s``, ``A = Vh_r`` from an fp32 SVD of ``W``.

    ``svd="full"`` is exact; ``svd="lowrank"`` runs ``torch.svd_lowrank`` with ``niter`` power iterations, seeded from
    ``generator`` when one is given. The base weight always becomes the residual. A sharded weight is gathered whole.
    """
    if svd not in ("full", "lowrank"):
        raise ValueError(f"pissa option svd={svd!r}: choose 'full' or 'lowrank'")
    w = sharded.full(weight).float()
    if svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # cut to rank r below (svd_lowrank's already are)
    else:
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
            u, s, v = torch.svd_lowrank(w, q=rank, niter=niter)
        vh = v.T
    return Factors(vh[:rank].contiguous(), torch.diag(s[:rank]) / scaling, u[:, :rank].contiguous())
