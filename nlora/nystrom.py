"""Nyström maths in torch layout: index selection, regularised cores and the C U⁺ R reconstruction.

For a weight ``W`` of shape ``(out, in)``, rows ``I`` and columns ``J`` give ``C = W[:, J]``,
``U = W[I, J]`` and ``R = W[I, :]``; the Nyström approximation is ``W ≈ C U⁺ R`` (paper Eq. 6).
Everything here is a pure function: tensors in, tensors out, nothing modified.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor

from . import sharded

INDEX_METHODS = ("first", "random", "norm")


def select_indices(
    weight: Tensor, rank: int, method: str = "first", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Pick ``rank`` row and ``rank`` column indices of ``weight`` (sorted, on ``weight``'s device).

    ``"first"`` takes ``0..rank-1`` (the paper's code); ``"random"`` samples uniformly without
    replacement; ``"norm"`` samples without replacement with probability proportional to the squared
    row / column norms (length-squared sampling, the classic Nyström/CUR choice).
    """
    if method == "first":
        return torch.arange(rank, device=weight.device), torch.arange(rank, device=weight.device)
    gen_device = generator.device if generator is not None else weight.device
    if method == "random":
        picks = [torch.randperm(size, generator=generator, device=gen_device)[:rank] for size in weight.shape]
    elif method == "norm":  # rows (dim 0), then columns (dim 1)
        norms = [sharded.sq_norms(weight, dim).to(gen_device) for dim in (0, 1)]
        # a small floor keeps zero-norm rows drawable, so rank distinct indices always exist
        picks = [torch.multinomial(p + p.max().clamp_min(1e-30) * 1e-12, rank, replacement=False, generator=generator)
                 for p in norms]
    else:
        raise ValueError(f"index={method!r}: choose one of {INDEX_METHODS}")
    return tuple(p.sort().values.to(weight.device) for p in picks)


def regularised_pinv(core: Tensor, rcond: float | None = None) -> Tensor:
    """``torch.linalg.pinv``: drops singular values below ``rcond * σ_max`` (``None``: torch's default cutoff) by an
    SVD. The reference for ``truncated_pinv``."""
    return torch.linalg.pinv(core, rtol=rcond)


_STACK = 32  # optimal_cores stacks at most this many layers' slices in fp64 at once


def default_rtol(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> float:
    """torch.linalg.pinv's default relative cutoff for a ``rows x cols`` matrix: ``eps(dtype) * max(rows, cols)``."""
    return torch.finfo(dtype).eps * max(rows, cols)


def check_rcond(rcond: float | None) -> None:
    """Refuse an ``rcond`` that is not ``None`` or a finite number >= 0 (bools refused), naming the fix."""
    if rcond is not None and (isinstance(rcond, bool) or not isinstance(rcond, (int, float))
                              or not math.isfinite(rcond) or rcond < 0):
        raise ValueError(f"rcond={rcond!r} must be a finite number >= 0 (relative to σ_max), or None for torch's "
                         f"default cutoff")


def _cutoff(rows: int, cols: int, rcond: float | None, dtype: torch.dtype) -> float:
    """The relative cutoff on the Gram eigenvalues ``σ²`` of a ``rows x cols`` matrix: ``rtol²`` (``rtol = rcond``,
    ``None``: ``default_rtol`` for ``dtype``), at least ``4 (rows + cols) eps64``, the rounding of an fp64 Gram: below
    it a Gram eigenvalue is noise (never binds for fp32 defaults; binds for tiny rcond or fp64 defaults)."""
    rtol = default_rtol(rows, cols, dtype) if rcond is None else float(rcond)
    return max(rtol * rtol, 4 * (rows + cols) * torch.finfo(torch.float64).eps)


_SQUARINGS = 8  # λ_max bound tr(G^256)^(1/256): never below λ_max, at most k^(1/256) above it (< 2% at k = 128)


def _lambda_max_bound(g: Tensor) -> Tensor:
    """An upper bound of the largest eigenvalue of each PSD ``g`` (batch, trace 1) from GEMMs only: ``tr(g^p)^(1/p)``,
    ``p = 2^_SQUARINGS``, each power renormalised to trace 1 so that nothing underflows."""
    log_trace = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(_SQUARINGS):
        g = g @ g
        trace = g.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(g.dtype).tiny)
        g = g / trace[:, None, None]
        log_trace = 2 * log_trace + trace.log()
    return (log_trace / 2**_SQUARINGS).exp()


def _gram_pinv(gram: Tensor, cuts: Sequence[tuple[int, float]]) -> Tensor:
    """Pseudo-inverse of a batch ``(b, k, k)`` of fp64 PSD Grams that drops eigenvalues ``λ <= cut λ_max`` and inverts
    the rest exactly, from GEMMs and one batched Cholesky (no eigh, no host synchronisation).

    The projector onto the kept eigenvalues is ``P = (I + sign(G - τI)) / 2``, the sign by Newton-Schulz
    (``X <- 1.5 X - 0.5 X³``); then ``G⁺ = P (P G P + I - P)⁻¹ P``, whose middle matrix is positive definite.
    ``cuts``: runs
    ``(count, cut)`` along the batch, Python floats (no host values copied to the device).
    """
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    g = gram / trace.clamp_min(torch.finfo(gram.dtype).tiny)[:, None, None]  # eigenvalues in [0, 1]
    top = _lambda_max_bound(g).split([count for count, _ in cuts])
    tau = torch.cat([t * cut for t, (_, cut) in zip(top, cuts)])[:, None, None]
    x = (g - tau * eye) / torch.maximum(torch.cat(top)[:, None, None], tau)  # eigenvalues in [-1, 1]
    # Newton-Schulz grows |x| by 1.5 a step while it is small: enough steps that every eigenvalue more than 2.5% of
    # the cutoff away from it (a zero one included) is classified, then six more to converge to machine precision
    for _ in range(math.ceil(math.log(20 / min(cut for _, cut in cuts)) / math.log(1.5)) + 6):
        x = 1.5 * x - 0.5 * (x @ x @ x)
    p = (eye + (x + x.mT) / 2) / 2  # (I + X) / 2, symmetrised
    m = p @ g @ p + eye - p
    chol, _ = torch.linalg.cholesky_ex((m + m.mT) / 2)
    inv = p @ torch.cholesky_solve(p, chol) / trace.clamp_min(torch.finfo(gram.dtype).tiny)[:, None, None]
    return torch.where((trace > 0)[:, None, None], inv, 0.0)  # a zero Gram has a zero pseudo-inverse


def truncated_pinv(mat: Tensor, rcond: float | None = None) -> Tensor:
    """Pseudo-inverse of ``mat`` ``(..., m, n)`` dropping singular values ``σ <= rtol σ_max``, without an SVD.

    With ``M = U Σ Vᵀ``, the fp64 Gram of the smaller side, ``G = MᵀM = V Σ² Vᵀ`` (tall) or ``MMᵀ = U Σ² Uᵀ`` (wide),
    goes through ``_gram_pinv``; eigenvalues ``σ² <= rtol² λ_max`` get ``1/λ = 0``, the rest are inverted, so
    ``G⁺Mᵀ`` (tall) or ``MᵀG⁺`` (wide) is ``V Σ_kept⁻¹ Uᵀ``: torch.linalg.pinv(M, rtol=rtol) as long as
    ``rtol² >= 4 (m + n) eps64`` (smaller cutoffs are raised to that, the Gram's own rounding).
    ``rtol = rcond``, ``None``: ``default_rtol(m, n, out dtype)``. Result in ``promote(mat.dtype, float32)``; a zero
    matrix gives zeros. No SVD, no eigh, no host synchronisation.
    """
    check_rcond(rcond)
    m, n = mat.shape[-2:]
    out_dtype = torch.promote_types(mat.dtype, torch.float32)
    x = mat.double()
    tall = m >= n
    gram = x.mT @ x if tall else x @ x.mT
    flat = gram.reshape(math.prod(gram.shape[:-2]), *gram.shape[-2:])
    g_pinv = _gram_pinv(flat, [(flat.shape[0], _cutoff(m, n, rcond, out_dtype))]).reshape(gram.shape)
    return (g_pinv @ x.mT if tall else x.mT @ g_pinv).to(out_dtype)


@functools.cache
def mm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` (aten::mm.dtype: CUDA, torch >= 2.8) runs here for
    ``dtype``."""
    try:
        z = torch.zeros(2, 2, dtype=dtype, device=device)
        return torch.mm(z, z, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def left_multiply(m: Tensor, weight: Tensor, chunk: int = 4096) -> Tensor:
    """``m @ weight`` in ``m``'s dtype, upcasting ``weight`` a column block at a time.

    Avoids ever holding a full ``(out, in)`` upcast copy of a low-precision weight. A sharded (DTensor)
    weight is multiplied shard by shard and only the ``(k, in)`` result is communicated.
    """
    if sharded.is_dtensor(weight):
        return sharded.left_matmul(m, weight)
    if weight.dtype == m.dtype:
        return m @ weight
    return torch.cat([m @ weight[:, j : j + chunk].to(m.dtype) for j in range(0, weight.shape[1], chunk)], dim=1)


def _ct_w(c: Tensor, weight: Tensor) -> Tensor:
    """``Cᵀ W`` in fp32 for ``C`` = (fp32 copies of) columns of ``W``. Those are exact in ``W``'s own dtype, so a
    bf16/fp16 ``W`` multiplies in that dtype with fp32 accumulation and output where the backend can (CUDA,
    ``aten::mm.dtype``): the same products, on tensor cores, with no fp32 copy of ``W``; else ``left_multiply``."""
    if (weight.dtype in (torch.bfloat16, torch.float16) and not sharded.is_dtensor(weight)
            and mm_out_dtype_works(weight.device, weight.dtype)):
        return torch.mm(c.mT.to(weight.dtype), weight, out_dtype=torch.float32)
    return left_multiply(c.mT, weight)


def optimal_core(weight: Tensor, rows: Tensor, cols: Tensor, rcond: float | None = None) -> Tensor:
    """The Frobenius-optimal core ``C⁺ W R⁺`` for ``C = W[:, cols]`` and ``R = W[rows, :]`` (fp32): one layer of
    ``optimal_cores``. The pseudo-inverses drop singular values below ``rcond σ_max`` (``None``: torch's default for
    each slice's shape); a low-precision or sharded ``W`` is never upcast whole."""
    return optimal_cores([weight], [sharded.take(weight, cols, 1).float()], [sharded.take(weight, rows, 0).float()],
                         rcond)[0]


def optimal_cores(weights: Sequence[Tensor], cs: Sequence[Tensor], rs: Sequence[Tensor],
                  rcond: float | None = None, scaling: float = 1.0) -> list[Tensor]:
    """``optimal_core`` of many layers (equal rank, one device) from their fp32 slices ``C (out, r)`` and
    ``R (r, in)``: ``(CᵀC)⁺ (Cᵀ W Rᵀ) (RRᵀ)⁺``, which is ``C⁺ W R⁺``. Per layer only ``Cᵀ W``; the Grams and
    ``Cᵀ W Rᵀ`` of layers of one shape are stacked (at most ``_STACK`` in fp64 at once), and the pseudo-inverses of
    all Grams come from one batched ``_gram_pinv`` (cutoff ``rtol²`` per Gram, ``rtol = rcond`` or
    torch's default for the slice's shape). Returns the fp32 cores divided by ``scaling``, in input order."""
    check_rcond(rcond)
    if not weights:
        return []
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (c, r) in enumerate(zip(cs, rs)):
        by_shape.setdefault((c.shape[0], r.shape[1]), []).append(i)
    chunks = [idx[j : j + _STACK] for idx in by_shape.values() for j in range(0, len(idx), _STACK)]
    c_grams, r_grams, ys = [], [], []
    for chunk in chunks:
        c64 = torch.stack([cs[i] for i in chunk]).double()  # (b, out, r)
        r64 = torch.stack([rs[i] for i in chunk]).double()  # (b, r, in)
        c_grams.append(c64.mT @ c64)
        r_grams.append(r64 @ r64.mT)
        ys.append(torch.stack([_ct_w(cs[i], weights[i]) for i in chunk]).double() @ r64.mT)  # Cᵀ W Rᵀ
    cuts = [(len(chunk), _cutoff(*slices[chunk[0]].shape, rcond, torch.float32))  # C's Grams, then R's
            for slices in (cs, rs) for chunk in chunks]
    c_pinvs, r_pinvs = _gram_pinv(torch.cat(c_grams + r_grams), cuts).split(len(weights))  # (CᵀC)⁺, (RRᵀ)⁺
    cores = ((c_pinvs @ torch.cat(ys) @ r_pinvs).float() / scaling).unbind(0)
    by_index = dict(zip((i for ch in chunks for i in ch), cores))
    return [by_index[i] for i in range(len(weights))]


def nystrom_reconstruct(weight: Tensor, rows: Tensor, cols: Tensor, rcond: float | None = None) -> Tensor:
    """``C U⁺ R`` in ``weight``'s dtype: the Nyström approximation of Eq. 6 (a reference, not for big weights)."""
    return weight[:, cols] @ regularised_pinv(weight[rows][:, cols], rcond) @ weight[rows, :]
