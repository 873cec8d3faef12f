"""A small, exact fingerprint of a weight matrix: a few entries at positions fixed by its shape.

``NLoRALinear.attach`` records it for the weight an adapter was attached to (before any residual update),
so that ``load_adapter`` can tell whether it is putting the adapter back on the same base weights.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

SAMPLE_SIZE = 16


def sample_positions(shape: tuple[int, int], k: int = SAMPLE_SIZE) -> tuple[Tensor, Tensor]:
    """``k`` (row, col) positions drawn from a generator seeded by the shape alone: the same on every machine."""
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"nlora-sample:{out_features}x{in_features}".encode()))
    flat = torch.randint(0, out_features * in_features, (k,), generator=gen)
    return flat // in_features, flat % in_features


def weight_sample(weight: Tensor, k: int = SAMPLE_SIZE) -> Tensor | None:
    """The entries of an ``(out, in)`` weight at ``sample_positions``, on the CPU in the weight's own dtype
    (``None`` for a weight without data, e.g. on the meta device, or a sharded DTensor)."""
    if weight.is_meta or weight.dim() != 2 or weight.numel() == 0 or type(weight).__name__ == "DTensor":
        return None  # no data here, or sharded (gathering it would cost a collective per layer)
    rows, cols = sample_positions(tuple(weight.shape), k)
    with torch.no_grad():
        return weight[rows.to(weight.device), cols.to(weight.device)].detach().to("cpu", copy=True)


def weight_samples(weights: list[Tensor], k: int = SAMPLE_SIZE) -> list[Tensor | None]:
    """``weight_sample`` of many weights with one device-to-host copy per (device, dtype) instead of one per weight
    (each copy is a host synchronisation; ``inject`` takes every layer's sample this way)."""
    out: list[Tensor | None] = [None] * len(weights)
    groups: dict[tuple, list[tuple[int, Tensor]]] = {}
    positions: dict[tuple, Tensor] = {}  # one host-to-device copy per (shape, device): a model has few shapes
    for i, w in enumerate(weights):
        if w.is_meta or w.dim() != 2 or w.numel() == 0 or type(w).__name__ == "DTensor":
            continue
        key = (tuple(w.shape), w.device)
        if key not in positions:
            rows, cols = sample_positions(key[0], k)
            flat = rows * key[0][1] + cols
            if w.device.type == "cuda":  # from pinned memory the copy is truly asynchronous (pageable may sync)
                flat = flat.pin_memory()
            positions[key] = flat.to(w.device, non_blocking=True)
        with torch.no_grad():  # take() indexes the logical row-major layout: a transposed (Conv1D) view is not copied
            groups.setdefault((w.device, w.dtype), []).append((i, torch.take(w, positions[key])))
    for parts in groups.values():
        host = torch.cat([t for _, t in parts]).to("cpu")
        for (i, _), piece in zip(parts, host.split(k)):
            out[i] = piece.clone()
    return out


def same_sample(saved: Tensor, current: Tensor) -> bool:
    """Whether two samples agree exactly once both are rounded to the less precise of their two dtypes
    (an fp32 checkpoint cast to bf16 matches the bf16 model it became; any other change does not)."""
    if saved.shape != current.shape:
        return False
    low = saved.dtype if torch.finfo(saved.dtype).eps >= torch.finfo(current.dtype).eps else current.dtype
    a, b = saved.to(low), current.to(low)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())
