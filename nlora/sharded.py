"""Weight access that gives the same values on plain tensors and on sharded DTensors (FSDP2, tensor parallel).

Initialisers and merges call these instead of indexing the weight directly, so that a weight sharded by
``fully_shard`` gives exactly the factors of the unsharded weight while each rank only receives what it needs:
``take`` moves the ``r`` selected rows or columns (zeros elsewhere, summed: exact), never the whole matrix.
Supported layouts: any device mesh where at most one mesh dimension shards the weight (FSDP2 ``Shard(0)``,
HSDP ``(Replicate, Shard(0))``, a column-wise ``Shard(1)``); anything else falls back to ``full_tensor()``.
On plain tensors every helper is the ordinary operation.
"""

from __future__ import annotations


import torch
from torch import Tensor

try:  # torch.distributed can be missing in some builds; then nothing is ever a DTensor
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = None


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 / tensor-parallel sharded tensor)."""
    return DTensor is not None and isinstance(t, DTensor)


def is_meta(t: Tensor) -> bool:
    """Whether ``t`` (or a DTensor's local shard) lives on the meta device: shapes only, no values."""
    return local_view(t).is_meta


def take(w: Tensor, index: Tensor, dim: int) -> Tensor:
    """``w.index_select(dim, index)`` as a plain tensor; for a DTensor only the selected slices travel."""
    if not is_dtensor(w):
        return w.index_select(dim, index)
    local = w.to_local()
    index = index.to(local.device)
    shards = [(i, p.dim) for i, p in enumerate(w.placements) if isinstance(p, Shard)]
    if len(shards) != 1 or not all(isinstance(p, (Shard, Replicate)) for p in w.placements):
        return w.full_tensor().index_select(dim, index)  # replicated (nothing travels), several sharded dims, partial
    mesh_dim, sharded_dim = shards[0]
    shape = list(w.shape)
    shape[dim] = index.numel()
    placements = [Replicate()] * w.device_mesh.ndim
    if sharded_dim != dim:  # every rank holds all selected slices, for its part of the other dim
        placements[mesh_dim] = Shard(sharded_dim)
        out = local.index_select(dim, index).contiguous()
    else:  # the selected slices in this rank's shard, zeros elsewhere
        chunk = -(-w.shape[dim] // w.device_mesh.size(mesh_dim))  # DTensor's torch.chunk layout
        start = min(w.device_mesh.get_local_rank(mesh_dim) * chunk, w.shape[dim])
        mine = ((index >= start) & (index < start + local.shape[dim])).nonzero().flatten()
        placements[mesh_dim] = Partial()  # one rank gives each entry, the others zeros: the sum is exact
        out = local.new_zeros(shape).index_copy_(dim, mine, local.index_select(dim, index[mine] - start))
    return DTensor.from_local(out, w.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=(shape[1], 1)).full_tensor()


def sq_norms(w: Tensor, dim: int) -> Tensor:
    """Squared L2 norms (fp32, fp64 for fp64 weights) of ``w``'s slices along ``dim``: ``dim=0`` per row, ``1`` per
    column, as a plain tensor; a DTensor reduces its shards itself and only the norms travel."""
    norms = torch.linalg.vector_norm(w, dim=1 - dim, dtype=torch.promote_types(w.dtype, torch.float32))
    return full(norms).square()


def left_matmul(m: Tensor, w: Tensor) -> Tensor:
    """``m @ w`` in ``m``'s dtype for a plain ``m (k, out)`` and a sharded ``w (out, in)``, as a plain ``(k, in)``:
    DTensor multiplies shard by shard, so only ``k x in`` partial results travel."""
    return (_on_mesh(m, w, Replicate()) @ w.to(m.dtype)).full_tensor()


def full(t: Tensor) -> Tensor:
    """The whole tensor as a plain tensor (``full_tensor()`` for a DTensor; ``t`` itself otherwise)."""
    return t.full_tensor() if is_dtensor(t) else t


def local_view(t: Tensor) -> Tensor:
    """What this rank stores of ``t``: the local shard of a DTensor (writes go to the tensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def local_part(value: Tensor, like: Tensor) -> Tensor:
    """This rank's piece of a full plain ``value`` laid out like ``like`` (no communication)."""
    if not is_dtensor(like):
        return value
    value = value.detach().to(like.to_local().device)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None).to_local()


def all_ranks_true(flag: bool, like: Tensor) -> bool:
    """``flag`` and-ed over every rank that holds a shard of ``like`` (just ``flag`` for plain tensors)."""
    if not is_dtensor(like):
        return flag
    t = torch.tensor([float(flag)], device=like.to_local().device)
    return bool(_on_mesh(t, like, Partial("min")).full_tensor().item())


def broadcast(t: Tensor, like: Tensor) -> Tensor:
    """Rank 0's ``t`` on every rank of ``like``'s device mesh (``t`` itself for plain tensors)."""
    if not is_dtensor(like):
        return t
    return _on_mesh(t.to(like.to_local().device).contiguous(), like, Replicate(), run_check=True).to_local()


def _on_mesh(local: Tensor, like: Tensor, placement, run_check: bool = False) -> Tensor:
    """A DTensor on ``like``'s device mesh whose piece on this rank is ``local``, ``placement`` on every mesh dim."""
    return DTensor.from_local(local, like.device_mesh, [placement] * like.device_mesh.ndim, run_check=run_check)
