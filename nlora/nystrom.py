"""Nyström maths in torch layout: index selection, regularised cores and the C U⁺ R reconstruction.

For a weight ``W`` of shape ``(out, in)``, rows ``I`` and columns ``J`` give ``C = W[:, J]``,
``U = W[I, J]`` and ``R = W[I, :]``; the Nyström approximation is ``W ≈ C U⁺ R`` (paper Eq. 6).
Everything here is a pure function: tensors in, tensors out, nothing modified.
"""

from __future__ import annotations

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
    """Pseudo-inverse that drops singular values below ``rcond * σ_max`` (``None``: torch's default)."""
    if rcond is None:
        return torch.linalg.pinv(core)
    return torch.linalg.pinv(core, rtol=rcond)


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


def optimal_core(weight: Tensor, rows: Tensor, cols: Tensor, rcond: float | None = None) -> Tensor:
    """The Frobenius-optimal core ``C⁺ W R⁺`` for fixed ``C = W[:, cols]`` and ``R = W[rows, :]`` (fp32)."""
    c = sharded.take(weight, cols, 1).float()
    r = sharded.take(weight, rows, 0).float()
    c_pinv = regularised_pinv(c, rcond)  # (rank, out)
    r_pinv = regularised_pinv(r, rcond)  # (in, rank)
    return left_multiply(c_pinv, weight) @ r_pinv


def nystrom_reconstruct(weight: Tensor, rows: Tensor, cols: Tensor, rcond: float | None = None) -> Tensor:
    """``C U⁺ R`` in ``weight``'s dtype: the Nyström approximation of Eq. 6 (a reference, not for big weights)."""
    c = weight[:, cols]
    u = weight[rows][:, cols]
    r = weight[rows, :]
    return c @ regularised_pinv(u, rcond) @ r
