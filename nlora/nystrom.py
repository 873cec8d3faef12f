"""Nyström maths in torch layout: index selection, regularised cores and the C U⁺ R reconstruction.

For a weight ``W`` of shape ``(out, in)``, rows ``I`` and columns ``J`` give ``C = W[:, J]``,
``U = W[I, J]`` and ``R = W[I, :]``; the Nyström approximation is ``W ≈ C U⁺ R`` (paper Eq. 6).
Everything here is a pure function: tensors in, tensors out, nothing modified.
"""

from __future__ import annotations

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
    out_features, in_features = weight.shape
    if method == "first":
        rows = torch.arange(rank, device=weight.device)
        cols = torch.arange(rank, device=weight.device)
        return rows, cols
    gen_device = generator.device if generator is not None else weight.device
    if method == "random":
        rows = torch.randperm(out_features, generator=generator, device=gen_device)[:rank]
        cols = torch.randperm(in_features, generator=generator, device=gen_device)[:rank]
    elif method == "norm":
        row_p = sharded.sq_norms(weight, 0)
        col_p = sharded.sq_norms(weight, 1)
        rows = _sample_by_weight(row_p.to(gen_device), rank, generator)
        cols = _sample_by_weight(col_p.to(gen_device), rank, generator)
    else:
        raise ValueError(f"unknown index method {method!r}; choose one of {INDEX_METHODS}")
    return rows.sort().values.to(weight.device), cols.sort().values.to(weight.device)


def _sample_by_weight(p: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    # A small floor keeps zero-norm rows drawable, so k distinct indices always exist.
    p = p + p.max().clamp_min(1e-30) * 1e-12
    return torch.multinomial(p, k, replacement=False, generator=generator)


def regularised_pinv(core: Tensor, rcond: float | None = None) -> Tensor:
    """Pseudo-inverse that drops singular values below ``rcond * σ_max`` (``None``: torch's default): the exact
    SVD truncation, kept as the reference and as ``solver="svd"`` (one cuSOLVER SVD, milliseconds on a GPU)."""
    if rcond is None:
        return torch.linalg.pinv(core)
    return torch.linalg.pinv(core, rtol=rcond)


PINV_SOLVERS = ("ridge", "svd")
_STACK = 32  # optimal_cores stacks at most this many layers' slices in fp64 at once
_SQUARINGS = 5  # λ_max bound from trace(G^64)^(1/64): never below λ_max, at most r^(1/64) above it (≤ 8% at r=128)


def default_rtol(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> float:
    """torch.linalg.pinv's default relative cutoff for a ``rows x cols`` matrix: ``eps(dtype) * max(rows, cols)``."""
    return torch.finfo(dtype).eps * max(rows, cols)


def check_pinv_options(rcond: float | None, solver: str) -> None:
    """Refuse a bad ``solver`` or ``rcond`` (the Nyström inits' options) with a message that names the fix."""
    if solver not in PINV_SOLVERS:
        raise ValueError(f"solver={solver!r}: choose 'ridge' (Gram + Cholesky, no SVD) or 'svd' (exact truncation)")
    if rcond is not None and (isinstance(rcond, bool) or not isinstance(rcond, (int, float))
                              or not math.isfinite(rcond) or rcond < 0):
        raise ValueError(f"rcond={rcond!r} must be a finite number >= 0 (relative to σ_max), or None for torch's "
                         f"default cutoff")


def _lambda_max_bound(gram: Tensor) -> Tensor:
    """An upper bound of the largest eigenvalue of (a batch of) PSD ``gram`` with trace 1, from GEMMs only.

    ``(trace G^p)^(1/p)`` with ``p = 2^(k+1)`` after ``k`` squarings lies in ``[λ_max, r^(1/p) λ_max]``; with
    trace 1 every power stays above ``r^-p`` (no fp64 underflow for any realistic r), and ``λ_max >= 1/r`` is a
    floor should it underflow anyway (a zero Gram also gets ``1/r``: harmless, its pseudo-inverse is zero).
    """
    m = gram
    for _ in range(_SQUARINGS):
        m = m @ m
    bound = torch.linalg.matrix_norm(m).pow(2.0 / 2 ** (_SQUARINGS + 1))  # ||G^(p/2)||_F^(2/p) = tr(G^p)^(1/p)
    return bound.clamp_min(1.0 / gram.shape[-1])


def _ridge_factor(gram: Tensor, rtol: float | tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Cholesky factor of ``G/t + λ I`` for (a batch of) fp64 PSD ``gram`` ``G``, its trace scale ``t`` and the
    failure mask: ``λ = rtol² λ_max(G/t)`` (λ_max bounded by GEMMs, never an SVD), at least ``32 r eps64`` so that
    the factorisation of a finite Gram cannot fail, even a rank-deficient or zero one. No host synchronisation."""
    n = gram.shape[-1]
    # a zero Gram stays zero (its pseudo-inverse is 0); tiny keeps the division finite
    scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    g = gram / scale[..., None, None]
    # rtol enters as Python floats (a tensor built from host values would cost a host-to-device copy and a sync);
    # per-matrix cutoffs of a batch (optimal_core: C and R) multiply each run of equal values with one op.
    lam = _lambda_max_bound(g)
    if isinstance(rtol, (tuple, list)):
        start = 0
        for i in range(1, len(rtol) + 1):
            if i == len(rtol) or rtol[i] != rtol[start]:
                lam[start:i].mul_(float(rtol[start]) ** 2)
                start = i
    else:
        lam = lam * float(rtol) ** 2
    lam = lam.clamp_min(32 * n * torch.finfo(torch.float64).eps)
    g.diagonal(dim1=-2, dim2=-1).add_(lam[..., None])
    chol, info = torch.linalg.cholesky_ex(g)
    return chol, scale, info != 0


def _chol_solve(chol: Tensor, rhs: Tensor) -> Tensor:
    """``(L Lᵀ)⁻¹ rhs`` by two triangular solves (cuBLAS trsm on a GPU; cholesky_solve may go through MAGMA)."""
    y = torch.linalg.solve_triangular(chol, rhs, upper=False)
    return torch.linalg.solve_triangular(chol.mT, y, upper=True)


def _poison(x: Tensor, failed: Tensor) -> Tensor:
    """``x`` with NaN where a factorisation failed: per matrix if ``failed`` has ``x``'s batch shape, else everywhere
    if any failed. A deferred check (inject refuses non-finite factors) instead of a host synchronisation per layer;
    a finite input never gets here."""
    mask = failed[..., None, None] if failed.shape == x.shape[:-2] else failed.any()
    return torch.where(mask, float("nan"), x)


def ridge_pinv(mat: Tensor, rcond: float | None = None) -> Tensor:
    """Tikhonov-regularised pseudo-inverse ``(MᵀM + λI)⁻¹Mᵀ``, ``λ = (rcond σ_max)²``, from a Gram + Cholesky in fp64.

    Its singular values are ``σ / (σ² + λ)``: equal to ``1/σ`` well above the cut, ``σ/λ -> 0`` well below, half
    of ``1/σ`` at ``σ = rcond σ_max`` (the SVD truncation at ``rcond`` keeps ``1/σ`` above and 0 below). ``None``:
    torch.linalg.pinv's default cutoff ``eps * max(m, n)``. σ_max is bounded by GEMMs (≤ 8% above for r <= 128),
    so the ridge is at least as strong as asked. Costs a handful of small kernels and no host synchronisation;
    returns NaN (never finite garbage) if the Cholesky factorisation fails, which a finite input cannot make it do
    (for a batch ``(..., m, n)``: NaN for that matrix only).
    Result in ``mat``'s dtype (fp32 at least).
    """
    m, n = mat.shape[-2:]
    out_dtype = torch.promote_types(mat.dtype, torch.float32)
    rtol = default_rtol(m, n, out_dtype) if rcond is None else float(rcond)
    x = mat.double()
    tall = m >= n
    gram = x.mT @ x if tall else x @ x.mT
    chol, scale, failed = _ridge_factor(gram, rtol)
    sol = _chol_solve(chol, x.mT if tall else x) / scale[..., None, None]
    sol = sol if tall else sol.mT
    return _poison(sol, failed).to(out_dtype)


_MM_OUT_DTYPE: dict[tuple[str, torch.dtype], bool] = {}


def mm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` (aten::mm.dtype: CUDA, torch >= 2.8) runs here for
    ``dtype``."""
    key = (device.type, dtype)
    if key not in _MM_OUT_DTYPE:
        try:
            z = torch.zeros(2, 2, dtype=dtype, device=device)
            _MM_OUT_DTYPE[key] = torch.mm(z, z, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


def left_multiply(m: Tensor, weight: Tensor, chunk: int = 4096) -> Tensor:
    """``m @ weight`` in ``m``'s dtype, upcasting ``weight`` a column block at a time.

    Avoids ever holding a full ``(out, in)`` upcast copy of a low-precision weight. A sharded (DTensor)
    weight is multiplied shard by shard and only the ``(k, in)`` result is communicated.
    """
    if sharded.is_dtensor(weight):
        return sharded.left_matmul(m, weight, left_multiply)
    if weight.dtype == m.dtype:
        return m @ weight
    blocks = [m @ weight[:, j : j + chunk].to(m.dtype) for j in range(0, weight.shape[1], chunk)]
    return torch.cat(blocks, dim=1)


def optimal_core(weight: Tensor, rows: Tensor, cols: Tensor, rcond: float | None = None,
                 solver: str = "ridge") -> Tensor:
    """The Frobenius-optimal core ``C⁺ W R⁺`` for fixed ``C = W[:, cols]`` and ``R = W[rows, :]`` (fp32).

    ``solver="ridge"`` (default): ``(CᵀC + λ_C I)⁻¹ Cᵀ W Rᵀ (RRᵀ + λ_R I)⁻¹`` with both r x r Grams factorised by
    one batched fp64 Cholesky and ``λ = (rtol σ_max)²`` as in ``ridge_pinv`` (``rcond=None``: torch's pinv cutoff
    ``eps * max(rows, cols)`` of each slice), so a rank-deficient ``C`` or ``R`` still gives a finite core. The
    one big product ``Cᵀ W`` never upcasts a low-precision or sharded weight whole (``_ct_w``).
    ``solver="svd"``: the pseudo-inverses of ``C`` and ``R`` by SVD truncation at ``rcond`` (``regularised_pinv``).
    """
    check_pinv_options(rcond, solver)
    c = sharded.take(weight, cols, 1).float()
    r = sharded.take(weight, rows, 0).float()
    if solver == "svd":
        c_pinv = regularised_pinv(c, rcond)  # (rank, out)
        r_pinv = regularised_pinv(r, rcond)  # (in, rank)
        return left_multiply(c_pinv, weight) @ r_pinv
    return optimal_cores([weight], [c], [r], rcond)[0]  # one layer of the batched form: the ridge maths live there


def _ct_w(c: Tensor, weight: Tensor) -> Tensor:
    """``Cᵀ W`` in fp32 for ``C`` = (fp32 copies of) columns of ``W``. Those are exact in ``W``'s own dtype, so a
    bf16/fp16 ``W`` multiplies in that dtype with fp32 accumulation and output where the backend can (CUDA,
    ``aten::mm.dtype``): the same products, on tensor cores, with no fp32 copy of ``W``; else ``left_multiply``."""
    if (weight.dtype in (torch.bfloat16, torch.float16) and not sharded.is_dtensor(weight)
            and mm_out_dtype_works(weight.device, weight.dtype)):
        return torch.mm(c.mT.to(weight.dtype), weight, out_dtype=torch.float32)
    return left_multiply(c.mT, weight)


def optimal_cores(weights: Sequence[Tensor], cs: Sequence[Tensor], rs: Sequence[Tensor],
                  rcond: float | None = None, scaling: float = 1.0) -> list[Tensor]:
    """``optimal_core`` (``solver="ridge"``) of many layers at once, from their fp32 slices ``C = W[:, cols]`` and
    ``R = W[rows, :]`` (equal rank, one device): per layer only the products ``Cᵀ W Rᵀ`` and the two Grams, then all
    r x r work (ridge, Cholesky, solves) as one batch, so its op count does not grow with the number of layers.
    Returns the fp32 cores divided by ``scaling``, in input order; a failed factorisation makes only that layer's
    core NaN."""
    check_pinv_options(rcond, "ridge")
    n = len(weights)
    shape = lambda i: (cs[i].shape[0], rs[i].shape[1])  # noqa: E731
    # sorted by shape: per-shape cutoffs (rcond=None) form few runs, and layers of one shape are stacked, at most
    # _STACK at a time (bounds the fp64 copies), for their Grams and Cᵀ W Rᵀ; only Cᵀ W is a product per layer
    order = sorted(range(n), key=shape)
    chunks: list[list[int]] = []
    for i in order:
        if chunks and len(chunks[-1]) < _STACK and shape(i) == shape(chunks[-1][0]):
            chunks[-1].append(i)
        else:
            chunks.append([i])
    c_grams, r_grams, ys = [], [], []
    for chunk in chunks:
        c64 = torch.stack([cs[i] for i in chunk]).double()
        r64 = torch.stack([rs[i] for i in chunk]).double()
        ctw = torch.stack([_ct_w(cs[i], weights[i]) for i in chunk])
        c_grams.append(c64.mT @ c64)
        r_grams.append(r64 @ r64.mT)
        ys.append(ctw.double() @ r64.mT)  # Cᵀ W Rᵀ
    k = cs[0].shape[1]
    if rcond is None:
        rtol = ([default_rtol(cs[i].shape[0], k) for i in order] + [default_rtol(k, rs[i].shape[1]) for i in order])
    else:
        rtol = float(rcond)
    chol, scale, failed = _ridge_factor(torch.cat(c_grams + r_grams), rtol)  # CᵀC of all layers, then RRᵀ
    y = torch.cat(ys) / scale[:n, None, None] / scale[n:, None, None]
    left = _chol_solve(chol[:n], y)  # (CᵀC + λ)⁻¹ Cᵀ W Rᵀ
    core = _chol_solve(chol[n:], left.mT).mT  # ... (RRᵀ + λ)⁻¹
    cores = (_poison(core, failed[:n] | failed[n:]).float() / scaling).unbind(0)
    out: list[Tensor] = [cores[0]] * n
    for j, i in enumerate(order):  # back to input order on the host: no index tensor to copy to the device
        out[i] = cores[j]
    return out


def nystrom_reconstruct(weight: Tensor, rows: Tensor, cols: Tensor, rcond: float | None = None) -> Tensor:
    """``C U⁺ R`` in ``weight``'s dtype: the Nyström approximation of Eq. 6 (a reference, not for big weights)."""
    c = weight[:, cols]
    u = weight[rows][:, cols]
    r = weight[rows, :]
    return c @ regularised_pinv(u, rcond) @ r
