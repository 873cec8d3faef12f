"""Initialisers: pure functions from a weight ``(out, in)`` to adapter factors, and their registry.

Every initialiser has the signature ``fn(weight, rank, *, scaling, generator, **options) -> Factors``.
``weight`` is read, never written; factors come back in fp32 on ``weight``'s device, so that
``scaling * B @ N @ A`` is the initial delta. Whether the base weight is then corrected so that the
model output is unchanged (``preserve_output``) is the layer's business, not the initialiser's.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import sharded
from .nystrom import (INDEX_METHODS, check_pinv_options, optimal_core, optimal_cores, regularised_pinv, ridge_pinv,
                      select_indices)


@dataclass(frozen=True)
class Factors:
    """Initial adapter factors in torch layout: ``A (r, in)``, ``N (r, r)`` or ``None``, ``B (out, r)``."""

    A: Tensor
    N: Tensor | None
    B: Tensor
    rows: Tensor | None = None  # the sampled row indices, for Nyström inits
    cols: Tensor | None = None  # the sampled column indices, for Nyström inits


@dataclass(frozen=True)
class InitSpec:
    """A registered initialiser and what the rest of the library must know about it."""

    name: str
    fn: Callable[..., Factors]
    data_driven: bool  # reads the weight values (needs finite weights)
    has_middle: bool  # produces an r x r middle matrix N
    preserve_default: bool  # default for preserve_output
    preserve_fixed: bool = False  # preserve_output cannot be switched off (pissa)
    zero_delta: bool = False  # the initial delta is exactly zero (B = 0)
    fresh: bool = False  # returns new tensors nothing else holds: the layer may keep them without copying
    # optional batched form ``many(weights, ranks, *, scalings, generators, **options) -> list[Factors]``, equal to
    # ``fn`` layer by layer (to fp64 rounding) but with the r x r work of all layers in one pass (see register_many)
    many: Callable[..., list[Factors]] | None = None

    @property
    def options(self) -> tuple[str, ...]:
        return _keyword_options(self.fn)


@functools.lru_cache(maxsize=None)
def _keyword_options(fn: Callable[..., Factors]) -> tuple[str, ...]:
    """An initialiser's keyword-only options (read once per function: ``inspect.signature`` costs ~40 us a call)."""
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("scaling", "generator"))


INITIALIZERS: dict[str, InitSpec] = {}


def register_init(name: str, *, data_driven: bool, has_middle: bool, preserve_default: bool = False,
                  preserve_fixed: bool = False, zero_delta: bool = False, fresh: bool = False) -> Callable:
    """Decorator: add an initialiser to the registry under ``name`` (``fresh=True`` promises that every call returns
    new tensors that nothing else holds, so the layer keeps them without a copy; leave it off if unsure)."""

    def wrap(fn: Callable[..., Factors]) -> Callable[..., Factors]:
        INITIALIZERS[name] = InitSpec(name, fn, data_driven, has_middle, preserve_default, preserve_fixed, zero_delta,
                                      fresh=fresh)
        return fn

    return wrap


def register_many(name: str) -> Callable:
    """Decorator: attach a batched form (``InitSpec.many``) to the registered initialiser ``name``."""

    def wrap(many: Callable[..., list[Factors]]) -> Callable[..., list[Factors]]:
        INITIALIZERS[name] = replace(INITIALIZERS[name], many=many)
        return many

    return wrap


def get_init(name: str) -> InitSpec:
    """Look up an initialiser, with an error that lists the known names."""
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown init {name!r}; choose one of {sorted(INITIALIZERS)}") from None


_KAIMING_GAIN = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))  # torch.nn.init.calculate_gain("leaky_relu", √5)


def _kaiming(shape: tuple[int, int], device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``kaiming_uniform_(a=√5)`` of a new fp32 tensor (nn.Linear's and PEFT's LoRA A), bound computed as torch
    does, so the draws are bit-identical, without its per-call Python checks (inject calls it once per layer)."""
    bound = math.sqrt(3.0) * (_KAIMING_GAIN / math.sqrt(shape[1]))
    return torch.empty(shape, dtype=torch.float32, device=device).uniform_(-bound, bound, generator=generator)


def _gaussian(shape: tuple[int, int], std: float, device: torch.device, generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, dtype=torch.float32, device=device, generator=generator) * std


@register_init("lora", data_driven=False, has_middle=False, zero_delta=True, fresh=True)
def init_lora(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None) -> Factors:
    """Plain LoRA (Hu et al.): ``A`` Kaiming-uniform (a=√5, as nn.Linear), ``B = 0``, no middle matrix."""
    out_features, in_features = weight.shape
    a = _kaiming((rank, in_features), weight.device, generator)
    return Factors(a, None, torch.zeros(out_features, rank, device=weight.device))


@register_init("gaussian", data_driven=False, has_middle=False, zero_delta=True, fresh=True)
def init_gaussian(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None) -> Factors:
    """LoRA with ``A ~ N(0, std=1/r)`` (PEFT's ``"gaussian"``), ``B = 0``, no middle matrix."""
    out_features, in_features = weight.shape
    a = _gaussian((rank, in_features), 1.0 / rank, weight.device, generator)
    return Factors(a, None, torch.zeros(out_features, rank, device=weight.device))


@register_init("slora", data_driven=False, has_middle=True, zero_delta=True, fresh=True)
def init_slora(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None,
               middle: str = "kaiming") -> Factors:
    """SLoRA: ``A`` and ``N`` Kaiming-uniform (a=√5), ``B = 0``; ``middle="gaussian"`` draws ``N ~ N(0, std=1/r)``
    instead (paper appendix B; Kaiming won there)."""
    out_features, in_features = weight.shape
    a = _kaiming((rank, in_features), weight.device, generator)
    if middle == "kaiming":
        n = _kaiming((rank, rank), weight.device, generator)
    elif middle == "gaussian":
        n = _gaussian((rank, rank), 1.0 / rank, weight.device, generator)
    else:
        raise ValueError(f"slora option middle={middle!r}: choose 'kaiming' or 'gaussian'")
    return Factors(a, n, torch.zeros(out_features, rank, device=weight.device))


def nystrom_slices(weight: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """``(R, C) = (W[rows, :], W[:, cols])`` as fresh fp32 tensors, never aliases of the weight (a sharded weight
    sends only these r rows and r columns between ranks, never the whole matrix)."""
    device = sharded.local_view(weight).device
    r = sharded.take(weight, rows.to(device), 0)
    c = sharded.take(weight, cols.to(device), 1)
    return r.to(torch.float32, copy=True), c.to(torch.float32, copy=True)


def _slices(weight: Tensor, rank: int, index: str, generator: torch.Generator | None) -> tuple[Tensor, ...]:
    """``rows, cols, C = W[:, cols], R = W[rows, :]``, the slices as fresh fp32 tensors."""
    if index not in INDEX_METHODS:
        raise ValueError(f"index={index!r}: choose one of {INDEX_METHODS}")
    rows, cols = select_indices(weight, rank, index, generator)
    if index == "first" and not sharded.is_dtensor(weight):  # plain slices, as the paper's reference code
        return rows, cols, weight[:, :rank].to(torch.float32, copy=True), weight[:rank, :].to(torch.float32, copy=True)
    r, c = nystrom_slices(weight, rows, cols)
    return rows, cols, c, r


@register_init("nystrom", data_driven=True, has_middle=True, fresh=True)
def init_nystrom(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None,
                 index: str = "first") -> Factors:
    """NLoRA as the paper's code does it: ``A = W[I, :]``, ``N = W[I, J]`` (the core itself, not its
    pseudo-inverse), ``B = W[:, J]``, with ``I = J = 0..r-1`` by default.

    The base weight is left as it is, so the model output changes at init by ``scaling * B N A``
    (pass ``preserve_output=True`` to subtract it from the base weight instead).
    """
    rows, cols, c, r = _slices(weight, rank, index, generator)
    return Factors(r, r[:, cols].clone(), c, rows, cols)


@register_init("nystrom-pinv", data_driven=True, has_middle=True, preserve_default=True, fresh=True)
def init_nystrom_pinv(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None,
                      index: str = "first", rcond: float | None = 0.1, solver: str = "ridge") -> Factors:
    """Exact Nyström of Eq. 6 with a regularised core: ``s B N A = C U⁺ R``, ``N = U⁺ / s``, ``U = W[I, J]``.

    The plain pseudo-inverse of a core sampled from a full-rank weight has condition numbers up to 1e4 and gives
    reconstruction errors of 10-60x ||W||, so ``U⁺`` is regularised at ``rcond * σ_max(U)`` (default 0.1;
    ``None``: torch's pinv cutoff). ``solver="ridge"`` (default): the Tikhonov inverse ``(UᵀU + λI)⁻¹Uᵀ``,
    ``λ = (rcond σ_max)²``, singular values ``σ/(σ² + λ)``, from an fp64 Gram + Cholesky (``ridge_pinv``: no SVD,
    no host sync). ``solver="svd"``: the exact truncation, dropping singular values below ``rcond * σ_max``
    (one SVD per layer, milliseconds each on a GPU).
    """
    check_pinv_options(rcond, solver)
    rows, cols, c, r = _slices(weight, rank, index, generator)
    u = r[:, cols]
    core = ridge_pinv(u, rcond) if solver == "ridge" else regularised_pinv(u, rcond)
    return Factors(r, core / scaling, c, rows, cols)


@register_init("nystrom-optimal", data_driven=True, has_middle=True, preserve_default=True, fresh=True)
def init_nystrom_optimal(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None,
                         index: str = "first", rcond: float | None = None, solver: str = "ridge") -> Factors:
    """Nyström with the optimal core for the sampled rows and columns: ``s B N A = C (C⁺ W R⁺) R``.

    The best Frobenius approximation that uses exactly these ``C`` and ``R``; costs one ``(r, out) @ (out, in)``
    product per layer, still far cheaper than an SVD. ``solver="ridge"`` (default) forms ``C⁺`` and ``R⁺`` from
    their fp64 Grams by one batched Cholesky with a ridge ``(rcond σ_max)²`` (``None``: torch's pinv cutoff
    ``eps * max`` of each slice's shape), so rank-deficient slices still give a finite core; ``solver="svd"``
    truncates their SVDs at ``rcond`` instead (see ``optimal_core``).
    """
    check_pinv_options(rcond, solver)
    rows, cols, c, r = _slices(weight, rank, index, generator)
    core = optimal_core(weight, rows, cols, rcond, solver)
    return Factors(r, core / scaling, c, rows, cols)


def _batched(fn: Callable[..., Factors], weights: Sequence[Tensor], ranks: Sequence[int], scalings: Sequence[float],
             generators: Sequence[torch.Generator | None], index: str, rcond: float | None, solver: str,
             cores: Callable[[list[int], list[tuple[Tensor, ...]], float], list[Tensor]]) -> list[Factors]:
    """The shared loop of the batched Nyström inits: each layer's indices and slices in layer order (the same draws
    as ``fn``), then ``cores`` once per group of layers with equal (rank, device, scaling); ``solver="svd"`` and
    sharded or meta weights go through ``fn`` one by one."""
    check_pinv_options(rcond, solver)
    if not len(weights) == len(ranks) == len(scalings) == len(generators):
        raise ValueError("weights, ranks, scalings and generators must have one entry per layer")
    out: list[Factors | None] = [None] * len(weights)
    groups: dict[tuple, list[int]] = {}
    slices: dict[int, tuple[Tensor, ...]] = {}
    for i, (w, k, s, g) in enumerate(zip(weights, ranks, scalings, generators)):
        if solver != "ridge" or sharded.is_dtensor(w) or sharded.is_meta(w):
            out[i] = fn(w, k, scaling=s, generator=g, index=index, rcond=rcond, solver=solver)
        else:
            slices[i] = _slices(w, k, index, g)
            groups.setdefault((k, w.device, float(s)), []).append(i)
    for (_, _, s), members in groups.items():
        for i, core in zip(members, cores(members, [slices[i] for i in members], s)):
            rows, cols, c, r = slices[i]
            out[i] = Factors(r, core, c, rows, cols)
    return out  # type: ignore[return-value]


@register_many("nystrom-pinv")
def init_nystrom_pinv_many(weights: Sequence[Tensor], ranks: Sequence[int], *, scalings: Sequence[float],
                           generators: Sequence[torch.Generator | None], index: str = "first",
                           rcond: float | None = 0.1, solver: str = "ridge") -> list[Factors]:
    """``init_nystrom_pinv`` of many layers: the cores ``U`` of each group of equal rank stacked into one batched
    ``ridge_pinv``, so the op count of the r x r work does not grow with the number of layers."""

    def cores(members, sl, scaling):
        # U = R[:, cols]; for "first" that is a plain slice (a view, no gather kernel per layer)
        u = torch.stack([r[:, :k] if index == "first" else r[:, cols] for k, (rows, cols, c, r) in
                         zip((ranks[i] for i in members), sl)])
        return (ridge_pinv(u, rcond) / scaling).unbind(0)

    return _batched(init_nystrom_pinv, weights, ranks, scalings, generators, index, rcond, solver, cores)


@register_many("nystrom-optimal")
def init_nystrom_optimal_many(weights: Sequence[Tensor], ranks: Sequence[int], *, scalings: Sequence[float],
                              generators: Sequence[torch.Generator | None], index: str = "first",
                              rcond: float | None = None, solver: str = "ridge") -> list[Factors]:
    """``init_nystrom_optimal`` of many layers: per layer the product ``Cᵀ W Rᵀ`` and the Grams, then one batched
    ridge factorisation and solve per group of equal rank (``optimal_cores``)."""

    def cores(members, sl, scaling):
        return optimal_cores([weights[i] for i in members], [c for _, _, c, _ in sl], [r for _, _, _, r in sl],
                             rcond, scaling)

    return _batched(init_nystrom_optimal, weights, ranks, scalings, generators, index, rcond, solver, cores)


@register_init("pissa", data_driven=True, has_middle=True, preserve_default=True, preserve_fixed=True, fresh=True)
def init_pissa(weight: Tensor, rank: int, *, scaling: float, generator: torch.Generator | None = None,
               svd: str = "full", niter: int = 4) -> Factors:
    """PiSSA in three-matrix form: ``B = U_r``, ``N = diag(S_r) / s``, ``A = Vh_r`` from an fp32 SVD of ``W``.

    ``svd="full"`` is exact; ``svd="lowrank"`` uses ``torch.svd_lowrank`` with ``niter`` power iterations,
    seeded by ``generator`` when one is given. The base weight always becomes the residual.
    A sharded (DTensor) weight is gathered whole: the SVD needs all of it.
    """
    w = sharded.full(weight).float()
    if svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    elif svd == "lowrank":
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
            u, s, v = torch.svd_lowrank(w, q=rank, niter=niter)
        vh = v.T
    else:
        raise ValueError(f"pissa option svd={svd!r}: choose 'full' or 'lowrank'")
    return Factors(vh.contiguous(), torch.diag(s) / scaling, u.contiguous())
