"""``NLoRALinear``: a frozen linear layer plus one or more named three-matrix adapters ``ΔW = s B N A``."""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import sharded
from .inits import Factors, get_init
from .fingerprint import weight_sample
from .nystrom import mm_out_dtype_works

TRAIN_MODES = ("all", "middle")

FUSED_FUNCTION = True
"""Run the eager adapter branch as one autograd node (``_AdapterBranch``); ``False`` restores the op-by-op path of
commit e638000 (for the same-process before/after benchmarks, and for double backward through adapters with a
frozen A, which the one-node branch refuses because it does not keep the layer input)."""


def is_conv1d(module: nn.Module) -> bool:
    """HF ``Conv1D`` (GPT-2 family) by duck typing: a 2-D weight stored ``(in, out)`` and an ``nf`` attribute."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def is_adaptable(module: nn.Module) -> bool:
    """Whether nlora can wrap this module: an ``nn.Linear`` or an HF ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_view(base: nn.Module) -> Tensor:
    """The base weight as an ``(out, in)`` view (a transpose for ``Conv1D``); writes go to the real weight."""
    return base.weight.data.T if is_conv1d(base) else base.weight.data


class Adapter(nn.Module):
    """One named adapter: ``scaling * B(N(A(dropout(x))))`` with fp32 master factors by default.

    Compute runs in the input's dtype unless ``compute_dtype`` says otherwise: a bf16 model gets bf16
    adapter matmuls (as cheap as the base allows) while the parameters and their gradients stay fp32.
    Factors on the meta device make a *pending* adapter (shapes only): it refuses to run until
    ``nlora.initialize_adapters`` gives it values (to restore trained adapters, initialise, then load them).
    """

    def __init__(self, factors: Factors, *, alpha: float, init: str, train: str, dropout: float,
                 preserve_output: bool, options: dict, dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype | None = None, seed: int | None = None, fresh: bool = False) -> None:
        super().__init__()
        _set_plain(self, rank=factors.A.shape[0], alpha=alpha, scaling=alpha / factors.A.shape[0], init=init,
                   train_mode=train, preserve_output=preserve_output, options=dict(options),
                   compute_dtype=compute_dtype,
                   init_seed=seed,  # the inject seed, so a deferred init draws what an immediate one would
                   pending_init=factors.A.is_meta,
                   _cast_cache={})  # never in the state_dict
        trains = (False, True, False) if train == "middle" else (True, True, True)
        kept: set[int] = set()
        for name, t, grad in zip(("lora_A", "lora_N", "lora_B"), (factors.A, factors.N, factors.B), trains):
            if t is not None:  # a fresh init's own tensor where it already is what the parameter needs, else a copy
                t = t if fresh and _keepable(t, dtype, kept) else _owned(t, dtype)
            self.register_parameter(name, None if t is None else nn.Parameter(t, requires_grad=grad))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.keep_initial(factors)

    def keep_initial(self, factors: Factors) -> None:
        """Record what the init produced, as non-persistent buffers: the Nyström index sets, and for an adapter
        whose init moved the base weight the initial factors, which give back the original pretrained weight
        (``W0 = W_residual + s B0 N0 A0``) for disable_adapter, unload and export."""
        device, dtype = sharded.local_view(self.lora_A).device, self.lora_A.dtype
        for name in ("A", "N", "B"):
            t = getattr(factors, name)
            keep = self.preserve_output and t is not None
            self.register_buffer(f"init_{name}", _owned(t, dtype, device) if keep else None, persistent=False)
        for name in ("rows", "cols"):
            t = getattr(factors, name)
            self.register_buffer(name, None if t is None else t.to(device), persistent=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters this adapter trains: A, N, B for ``train="all"``, only N for ``"middle"`` (IntTune)."""
        if self.train_mode == "middle":
            return [self.lora_N]
        return [p for p in (self.lora_A, self.lora_N, self.lora_B) if p is not None]

    def _check_ready(self) -> None:
        if self.pending_init:
            raise RuntimeError(f"adapter (init={self.init!r}) was injected on the meta device and has no values yet; "
                               f"materialise the model (to_empty), load the base weights, then call "
                               f"nlora.initialize_adapters(model)")

    def forward(self, x: Tensor, dropout: bool = True, out: Tensor | None = None,
                base: nn.Linear | None = None) -> Tensor:
        """``s B N A dropout(x)``; ``dropout=False`` gives the exact delta of a merged adapter (no dropout mask).

        With ``out`` (a fresh 2-D base output for 2-D ``x``) it returns ``out + s B N A dropout(x)``, accumulating in
        place when ``out`` has the compute dtype (one GEMM with beta=1, alpha=s, no output-sized add), as one autograd
        node (``_AdapterBranch``). With ``base`` instead (a frozen ``nn.Linear``, see ``NLoRALinear._folds_base``) that
        node also computes the base output and its input gradient. Going through ``__call__`` either way keeps
        module hooks (FSDP2's unshard) working.
        """
        self._check_ready()
        x = self.dropout(x) if dropout else x
        a, n, b = self.lora_A, self.lora_N, self.lora_B
        if out is None and base is None:
            return _low_rank(x, a, n, b, self.scaling, self.compute_dtype)
        dtype = _compute_dtype(x, self.compute_dtype)
        # An in-place update of a view (e.g. HF Conv1D's output) would cost autograd a gradient copy.
        if base is None and (out.dtype != dtype or out._is_view()):
            delta = _low_rank(x, a, n, b, self.scaling, self.compute_dtype)
            return out + delta.to(out.dtype)
        if base is not None or (FUSED_FUNCTION and not sharded.is_dtensor(a)):
            if not torch.is_grad_enabled():  # inference: no autograd node, every factor's cast made once
                _branch_into(out, x, a, n, b, self.scaling, self._cached_casts(dtype, trainable=True))
                return out
            frozen = not (a.requires_grad and b.requires_grad and (n is None or n.requires_grad))
            casts = self._cached_casts(dtype, trainable=False) if frozen else _NO_CASTS
            w, bias = (None, None) if base is None else (base.weight, base.bias)
            return _AdapterBranch.apply(out, x, a, n, b, w, bias, self.scaling, casts)
        h = _down(x, a, n, dtype)
        return out.addmm_(h, b.to(dtype).t(), alpha=self.scaling)

    def _cached_casts(self, dtype: torch.dtype, trainable: bool) -> tuple[Tensor | None, ...]:
        """``dtype`` copies of the factors, made once and reused across calls: the frozen ones (IntTune's A and B)
        in training, every one without autograd (inference, decoding); ``None`` where the branch casts itself or the
        factor is already ``dtype``. A copy is keyed on the factor's version counter, storage, dtype, device and shape,
        so in-place edits (``load_state_dict``, ``merge``, an optimizer, ``p.copy_``) are never served stale; writes
        through ``p.data`` bypass version counting and are not seen. Copies are ordinary tensors even when made under
        ``inference_mode`` (a later training step may use them). Not used under FSDP2, which refills parameter
        storage with the version counter preserved."""
        if getattr(self, "_is_fsdp_managed_module", False):
            return (None, None, None)
        cache = self.__dict__.setdefault("_cast_cache", {})  # adapters unpickled from older versions lack it
        casts = []
        for name in ("lora_A", "lora_N", "lora_B"):
            p = getattr(self, name)
            if p is None or (p.requires_grad and not trainable) or p.dtype == dtype:
                casts.append(None)
                continue
            key = (p._version, p.data_ptr(), p.dtype, p.device, p.shape, dtype)
            hit = cache.get(name)
            if hit is None or hit[0] != key:
                with torch.inference_mode(False), torch.no_grad():
                    hit = cache[name] = (key, p.to(dtype))
            casts.append(hit[1])
        return tuple(casts)

    def initial_output(self, x: Tensor) -> Tensor:
        """``s B0 N0 A0 x``: what this adapter's init subtracted from the base weight (no dropout)."""
        return _low_rank(x, self.init_A, self.init_N, self.init_B, self.scaling, self.compute_dtype)

    def delta_weight(self, initial: bool = False, dtype: torch.dtype | None = None) -> Tensor:
        """``s B N A`` as an ``(out, in)`` tensor in fp32, or fp64 when the adapter or ``dtype`` (the base weight's)
        is fp64 (``initial=True``: the init's ``s B0 N0 A0``)."""
        self._check_ready()
        a, n, b = (self.init_A, self.init_N, self.init_B) if initial else (self.lora_A, self.lora_N, self.lora_B)
        a, n, b = sharded.full(a), None if n is None else sharded.full(n), sharded.full(b)  # FSDP2: factors only
        dt = torch.promote_types(torch.promote_types(a.dtype, torch.float32), dtype or torch.float32)
        a = a.to(dt) if n is None else n.to(dt) @ a.to(dt)
        return (b.to(dt) * self.scaling) @ a

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, init={self.init!r}, train={self.train_mode!r}"


def _owned(t: Tensor, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """A contiguous copy in ``dtype`` (on ``device``): Nyström slices of a Conv1D weight are transposed views, and a
    factor's memory layout changes matmul rounding (a saved-and-loaded adapter's outputs would differ in the last
    bit)."""
    return t.to(device, dtype, memory_format=torch.contiguous_format, copy=True)


def _keepable(t: Tensor, dtype: torch.dtype, kept: set[int]) -> bool:
    """Whether an initialiser's factor can become a parameter as it is: a plain contiguous ``dtype`` tensor that is
    not a view (a view would pin its base's memory) and shares no storage with a factor kept before (``kept``)."""
    if not (type(t) is Tensor and t._base is None and t.dtype == dtype and t.is_contiguous()) or t.is_meta:
        return False
    ptr = t.untyped_storage().data_ptr()
    if ptr in kept:
        return False
    kept.add(ptr)
    return True


def _set_plain(module: nn.Module, **attrs) -> None:
    """Set plain (non-tensor, non-module) attributes straight into ``__dict__``, where ``nn.Module.__setattr__`` would
    put them after ~1 us of checks each: an adapter has a dozen, and inject builds one per layer."""
    module.__dict__.update(attrs)


def _compute_dtype(x: Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The adapter's matmul dtype: ``compute_dtype`` if set, else the autocast dtype, else the input's."""
    if compute_dtype is not None:
        return compute_dtype
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _down(x: Tensor, a: Tensor, n: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``N(A x)`` in ``dtype`` (the fp32 master factors are cast on the fly; a no-op when already ``dtype``)."""
    h = F.linear(x.to(dtype), a.to(dtype))
    return h if n is None else F.linear(h, n.to(dtype))


def _mm_to(a: Tensor, b: Tensor, dtype: torch.dtype, scaling: float = 1.0) -> Tensor:
    """``scaling * a @ b`` in ``dtype``: an fp32 gradient straight from the bf16/fp16 GEMM where the backend can (no
    cast kernel), else a GEMM in ``a``'s dtype, scaled, then cast (no cast when the dtypes agree)."""
    if (dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16)
            and mm_out_dtype_works(a.device, a.dtype)):
        c = torch.mm(a, b, out_dtype=dtype)
    else:
        c = torch.mm(a, b)
    return (c if scaling == 1 else c.mul_(scaling)).to(dtype)


_NO_CASTS = (None, None, None)


def _branch_into(y: Tensor, x: Tensor, a: Tensor, n: Tensor | None, b: Tensor, scaling: float,
                 casts: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """``y += s B N A x`` in ``y``'s dtype, in place, ``x`` (contiguous, any leading dims) flattened to its tokens;
    factors come from ``casts`` where given, else are cast here. Returns the compute-dtype factors and intermediates
    ``(A, N, B, x2, x2 in y's dtype, A x2, N A x2)`` for backward. Not differentiable itself: the body of
    ``_AdapterBranch.forward`` and the whole inference path."""
    dtype = y.dtype
    ac = casts[0] if casts[0] is not None else a.to(dtype)
    nc = None if n is None else casts[1] if casts[1] is not None else n.to(dtype)
    bc = casts[2] if casts[2] is not None else b.to(dtype)
    x2 = x.view(-1, x.shape[-1])
    xc = x2 if x.dtype == dtype else x2.to(dtype)
    h1 = F.linear(xc, ac)
    h2 = h1 if nc is None else F.linear(h1, nc)
    y.view(-1, y.shape[-1]).addmm_(h2, bc.t(), alpha=scaling)
    return ac, nc, bc, x2, xc, h1, h2


class _AdapterBranch(torch.autograd.Function):
    """``y += s B N A x`` in place (``N`` optional) as one autograd node: the fp32 masters are cast to ``y``'s dtype
    inside, and backward computes only the gradients that are needed (IntTune: dN and dx), the parameter gradients
    coming back in the parameters' dtype. ``y`` is the fresh base output, ``x`` the contiguous input (any number of
    leading dims: they are flattened inside the node, so autograd sees no reshape or view nodes); ``casts`` holds
    cached compute-dtype copies of frozen factors (or ``None``). With ``y=None`` and the frozen base ``w``, ``bias``
    of an ``nn.Linear`` the node computes ``y = x W^T + bias`` itself and the base's input gradient with the
    branch's, ``dx = g W + s (g B N) A`` (one GEMM accumulating into the other): the base gets no autograd node and
    ``x`` no gradient sum."""

    @staticmethod
    def forward(ctx, y: Tensor | None, x: Tensor, a: Tensor, n: Tensor | None, b: Tensor, w: Tensor | None,
                bias: Tensor | None, scaling: float, casts: tuple[Tensor | None, ...]) -> Tensor:
        need_x, need_a, need_n, need_b = ctx.needs_input_grad[1:5]
        if y is None:  # the base output, written into a fresh tensor: F.linear's N-D result is a view, and a view
            y = x.new_empty(*x.shape[:-1], w.shape[0])  # returned from a custom Function cannot be updated in place
            x2, y2 = x.view(-1, x.shape[-1]), y.view(-1, w.shape[0])
            torch.mm(x2, w.t(), out=y2) if bias is None else torch.addmm(bias, x2, w.t(), out=y2)
        else:
            ctx.mark_dirty(y)
        ac, nc, bc, x2, xc, h1, h2 = _branch_into(y, x, a, n, b, scaling, casts)
        ctx.scaling, ctx.x_dtype, ctx.x_shape = scaling, x.dtype, x.shape
        down = need_x or need_a  # the gradient has to go back through N and A
        # x only where dA needs it (IntTune keeps no layer input alive, like plain autograd); a, n, b, w cost nothing
        ctx.save_for_backward(x if need_a else None, a, n, b, w if need_x else None,
                              xc if need_a and xc is not x2 else None,
                              ac if need_x else None, nc if down else None, bc if down or need_n else None,
                              h1 if need_n else None, h2 if need_b else None)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, a, n, b, w, xc, ac, nc, bc, h1, h2 = ctx.saved_tensors
        need_y, need_x, need_a, need_n, need_b = ctx.needs_input_grad[:5]
        s = ctx.scaling
        gy = g if need_y else None
        g = g.reshape(-1, g.shape[-1])
        x = None if x is None else x.view(-1, x.shape[-1])  # saved unflattened: double backward must reach the input
        xc = x if xc is None else xc
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain composite so higher orders work
            if x is None:
                raise RuntimeError("double backward through an nlora adapter with a frozen A (e.g. IntTune) needs the "
                                   "layer input, which the one-node branch does not keep; set "
                                   "nlora.layer.FUSED_FUNCTION = False for such runs")
            gx, ga, gn, gb = _composite_grads(g, x, a, n, b, w, s, ctx.needs_input_grad[1:5])
            return gy, None if gx is None else gx.view(ctx.x_shape), ga, gn, gb, None, None, None, None
        gx = ga = gn = gb = None
        if need_b:
            gb = _mm_to(g.t(), h2, b.dtype, s)
        if need_x or need_a or need_n:
            u = torch.mm(g, bc)  # dL/dh2 = s g B
            u = u if s == 1 else u.mul_(s)
            if need_n:
                gn = _mm_to(u.t(), h1, n.dtype)
            v = u if nc is None else torch.mm(u, nc)  # dL/dh1
            if need_a:
                ga = _mm_to(v.t(), xc, a.dtype)
            if need_x:
                gx = torch.mm(v, ac) if w is None else torch.mm(g, w).addmm_(v, ac)
                gx = gx.to(ctx.x_dtype).view(ctx.x_shape)
        return gy, gx, ga, gn, gb, None, None, None, None


def _composite_grads(g: Tensor, x: Tensor, a: Tensor, n: Tensor | None, b: Tensor, w: Tensor | None, s: float,
                     needs: tuple[bool, ...]) -> list[Tensor | None]:
    """Gradients of ``s B N A x`` (plus ``W x`` with ``w``) w.r.t. the needed ones of ``x, A, N, B`` through ordinary
    differentiable ops."""
    with torch.enable_grad():
        out = _low_rank(x, a, n, b, s, g.dtype)
        out = out if w is None else out + F.linear(x.to(g.dtype), w.to(g.dtype))
        wrt = [t for t, need in zip((x, a, n, b), needs) if need]
        got = iter(torch.autograd.grad(out, wrt, g, create_graph=True, allow_unused=True))
    return [next(got) if need else None for need in needs]


def _low_rank(x: Tensor, a: Tensor, n: Tensor | None, b: Tensor, scaling: float,
              compute_dtype: torch.dtype | None) -> Tensor:
    dtype = _compute_dtype(x, compute_dtype)
    h = _down(x, a, n, dtype)
    b = b.to(dtype)
    return F.linear(h, b if scaling == 1 else b * scaling)


class NLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (or HF ``Conv1D``) with named adapters: ``y = base(x) + Σ s B(N(A(dropout(x))))``.

    ``lora_A (r, in)``, ``lora_N (r, r)`` (``None`` for plain LoRA) and ``lora_B (out, r)`` are the active
    adapter's parameters; ``adapters[name]`` holds each one. The delta is never materialised in forward.
    With ``init="nystrom"`` (the paper's NLoRA) the base weight is not touched, so the output changes at
    init; ``preserve_output=True`` subtracts the initial delta from the base weight instead.
    """

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float | None = None, init: str = "nystrom", *,
                 train: str = "all", dropout: float = 0.0, preserve_output: bool | None = None,
                 adapter: str = "default", adapter_dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                 name: str = "", **init_options) -> None:
        if not is_adaptable(base):
            raise TypeError(f"{name or type(base).__name__}: NLoRALinear wraps nn.Linear or HF Conv1D, "
                            f"got {type(base).__name__}; target its Linear sub-modules instead")
        super().__init__()
        self._setup(base, name)
        factors, options = build_factors(base, rank, alpha, init, train=train, adapter=adapter, name=name,
                                         generator=generator, existing=(), **init_options)
        self.attach(adapter, factors, rank=rank, alpha=alpha, init=init, train=train, dropout=dropout,
                    preserve_output=preserve_output, adapter_dtype=adapter_dtype, compute_dtype=compute_dtype,
                    options=options)
        self.set_active([adapter])

    def _setup(self, base: nn.Module, name: str) -> None:
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        _set_plain(self, disabled=False, module_name=name)
        for p in base.parameters():
            p.requires_grad_(False)

    @classmethod
    def wrapping(cls, base: nn.Module, name: str = "") -> "NLoRALinear":
        """An ``NLoRALinear`` around ``base`` that holds no adapter yet (``inject`` attaches them)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(base, name)
        return layer

    # -- shapes -------------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return weight_view(self.base).shape[1]

    @property
    def out_features(self) -> int:
        return weight_view(self.base).shape[0]

    # -- the active adapter's parameters (the single-adapter API) -------------------------------------
    def _only_active(self) -> Adapter:
        if len(self.active_adapters) != 1:
            raise RuntimeError(f"{self.module_name}: {len(self.active_adapters)} adapters are active "
                               f"({self.active_adapters}); use .adapters[name] to pick one")
        return self.adapters[self.active_adapters[0]]

    @property
    def lora_A(self) -> nn.Parameter:
        return self._only_active().lora_A

    @property
    def lora_N(self) -> nn.Parameter | None:
        return self._only_active().lora_N

    @property
    def lora_B(self) -> nn.Parameter:
        return self._only_active().lora_B

    @property
    def scaling(self) -> float:
        return self._only_active().scaling

    # -- adapter management ---------------------------------------------------------------------------
    def attach(self, adapter: str, factors: Factors, *, rank: int, alpha: float | None, init: str, train: str,
               dropout: float, preserve_output: bool | None, adapter_dtype: torch.dtype,
               compute_dtype: torch.dtype | None, options: dict, seed: int | None = None,
               sample: Tensor | None = ...) -> Adapter:
        """Add an adapter from precomputed factors; applies the residual update if the output is preserved.
        ``sample``: the base weight's ``weight_sample`` if the caller already took it (inject batches them)."""
        module = make_adapter(self.base, factors, rank=rank, alpha=alpha, init=init, train=train, dropout=dropout,
                              preserve_output=preserve_output, adapter_dtype=adapter_dtype,
                              compute_dtype=compute_dtype, options=options, seed=seed)
        return self.add_adapter(adapter, module, sample)

    def add_adapter(self, adapter: str, module: Adapter, sample: Tensor | None = ...) -> Adapter:
        """Register an adapter built by ``make_adapter`` on this layer's base, applying its residual update if it
        preserves the output (the step of ``attach`` that changes the model)."""
        if sample is ...:  # a few entries of the weight it sits on (load_adapter checks)
            sample = weight_sample(weight_view(self.base))
        if module.preserve_output and not module.pending_init:
            self._subtract_initial(module)
        self.adapters[adapter] = module
        _set_plain(module, base_sample=sample)
        return module

    def set_active(self, names: Iterable[str]) -> None:
        """Choose which of this layer's adapters run in forward (names it does not hold are ignored)."""
        self.active_adapters = tuple(n for n in names if n in self.adapters)

    def remove(self, adapter: str) -> None:
        """Delete an adapter; an init that moved the base weight gives its initial delta back first."""
        if adapter in self.merged_adapters:
            raise ValueError(f"{self.module_name}: adapter {adapter!r} is merged; unmerge it before deleting it")
        module = self.adapters[adapter]
        if module.preserve_output and not module.pending_init:
            self._add_to_weight(self._delta(module, initial=True))
        del self.adapters[adapter]
        self.set_active(self.active_adapters)

    # -- merging --------------------------------------------------------------------------------------
    def _delta(self, adapter: Adapter, initial: bool = False) -> Tensor:
        """An adapter's delta in the precision its merge into this base weight needs (fp32, fp64 for fp64)."""
        return adapter.delta_weight(initial, dtype=weight_view(self.base).dtype)

    def _weight_plus(self, delta: Tensor) -> Tensor:
        """``W + delta`` formed in ``delta``'s precision (fp32, fp64 for fp64 weights), this rank's block only.

        ``delta`` (a fresh tensor from ``_delta``) is consumed as the buffer for the sum: no other (out, in) temporary.
        """
        w = weight_view(self.base)
        return sharded.local_part(delta, w).add_(sharded.local_view(w))

    def _subtract_initial(self, adapter: Adapter) -> None:
        """``W -= s B0 N0 A0`` for an init that preserves the output, by one GEMM accumulating into the weight in the
        delta's precision (``addmm_``, rounded once, no (out, in) delta temporary): in place for an fp32/fp64
        weight (two passes over it instead of five), through one fp32 copy for a bf16/fp16 one (rounded once on the
        way back); sharded weights take the general path."""
        w = weight_view(self.base)
        dt = torch.promote_types(torch.promote_types(adapter.init_A.dtype, torch.float32), w.dtype)
        if sharded.is_dtensor(w) or sharded.is_dtensor(adapter.init_A):
            self._add_to_weight(-self._delta(adapter, initial=True))
            return
        a, b = adapter.init_A.to(dt), adapter.init_B.to(dt)
        a = a if adapter.init_N is None else adapter.init_N.to(dt) @ a
        with torch.no_grad():
            if w.dtype == dt:
                w.addmm_(b, a, alpha=-adapter.scaling)
            else:
                w.copy_(w.to(dt).addmm_(b, a, alpha=-adapter.scaling))

    def _finite(self, t: Tensor) -> bool:
        """Whether ``t`` (this rank's block of a new weight) is finite on every rank."""
        return sharded.all_ranks_true(bool(torch.isfinite(t).all()), weight_view(self.base))

    def _add_to_weight(self, delta: Tensor, safe: bool = False) -> None:
        """``W += delta``, the sum rounded once into the weight's dtype (a DTensor weight updates its own shard)."""
        new = self._weight_plus(delta)
        if safe and not self._finite(new):
            raise ValueError(f"{self.module_name}: merging would put NaN/Inf into the weight; nothing was changed")
        with torch.no_grad():
            sharded.local_view(weight_view(self.base)).copy_(new)

    def unmerged_active(self) -> list[str]:
        """The active adapters not yet folded into the base weight (what ``merge`` would fold)."""
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def inactive_preserving(self) -> list[Adapter]:
        """Inactive adapters whose init moved the base weight: they give that residual back, in forward and on
        unload, so that each adapter computes ``W0 + its own delta`` whichever is active."""
        return [a for n, a in self.adapters.items() if a.preserve_output and n not in self.active_adapters]

    def merge_stays_finite(self) -> bool:
        """Whether merging the unmerged active adapters would leave the weight finite (checked, nothing changed)."""
        todo = self.unmerged_active()
        return not todo or self._finite(self._weight_plus(sum(self._delta(self.adapters[n]) for n in todo)))

    def merge(self, safe: bool = False) -> None:
        """Fold every active, unmerged adapter into the base weight."""
        todo = self.unmerged_active()
        if not todo:
            warnings.warn(f"{self.module_name}: all active adapters are already merged; nothing to do", stacklevel=3)
            return
        delta = sum(self._delta(self.adapters[n]) for n in todo)
        self._add_to_weight(delta, safe=safe)
        self.merged_adapters = self.merged_adapters + tuple(todo)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight."""
        if not self.merged_adapters:
            warnings.warn(f"{self.module_name}: no adapter is merged; nothing to unmerge", stacklevel=3)
            return
        self._add_to_weight(-sum(self._delta(self.adapters[n]) for n in self.merged_adapters))
        self.merged_adapters = ()

    def restore_base(self) -> nn.Module:
        """Return the base module holding the original pretrained weight (merges and residuals undone)."""
        delta = [-self._delta(self.adapters[n]) for n in self.merged_adapters]
        delta += [self._delta(a, initial=True) for a in self.adapters.values()
                  if a.preserve_output and not a.pending_init]
        if delta:
            self._add_to_weight(sum(delta))
        self.merged_adapters = ()
        return self.base

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            return self._original_forward(x)
        todo = [self.adapters[n] for n in self.unmerged_active()]
        restore = self.inactive_preserving()
        # Eager only: under torch.compile the in-place update is functionalised and measured slower (H200:
        # 10.9 vs 9.1 ms/step, benchmarks/results/train_7b_cuda_compiled.json); inductor fuses the add itself.
        if todo and not restore and x.dim() >= 2 and x.is_contiguous() and not torch.compiler.is_compiling():
            return self._fused_forward(x, todo)
        y = self.base(x)
        for adapter in todo:
            y = y + adapter(x).to(y.dtype)
        for adapter in restore:
            y = y + adapter.initial_output(x).to(y.dtype)
        return y

    def _original_forward(self, x: Tensor) -> Tensor:
        """The original pretrained layer (inside ``disable_adapter``): merges and init residuals undone on the fly."""
        y = self.base(x)
        for name in self.merged_adapters:
            y = y - self.adapters[name](x, dropout=False).to(y.dtype)
        for adapter in self.adapters.values():
            if adapter.preserve_output:
                adapter._check_ready()
                y = y + adapter.initial_output(x).to(y.dtype)
        return y

    def _fused_forward(self, x: Tensor, adapters: list[Adapter]) -> Tensor:
        """The same sum with each adapter's last matmul accumulating into the base output in place
        (``addmm_``: beta=1, alpha=scaling), instead of a separate output-sized add and scaling pass.

        Where the first adapter's node also runs the base (``_folds_base``), ``x`` goes in with its leading dims and
        is flattened inside the node: no reshape or view nodes. Otherwise the base runs on the flattened
        ``(tokens, in)`` input, so that its output is a fresh 2-D tensor (an N-D ``F.linear`` output is a view, and
        an in-place update of a view would make autograd copy the gradient, CopySlices, in backward).
        """
        first = adapters[0]
        if self._folds_base(x, first):
            y = first(x, base=self.base)
            for adapter in adapters[1:]:
                y = adapter(x, out=y)
            return y
        x2 = x.reshape(-1, x.shape[-1])
        y = first(x2, out=self.base(x2))
        for adapter in adapters[1:]:
            y = adapter(x2, out=y)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _folds_base(self, x: Tensor, adapter: Adapter) -> bool:
        """Whether the first adapter's ``_AdapterBranch`` can also run the base and give its input gradient (one
        autograd node and no gradient sum for ``x`` instead of two nodes and an add). Not where the base must keep its
        own node: a custom Linear subclass or hooks (the output may differ from ``F.linear``), a trainable or sharded
        weight or bias, autocast or any dtype change, dropout, or no gradient wanted."""
        base = self.base
        if not (FUSED_FUNCTION and type(base) is nn.Linear and x.requires_grad and torch.is_grad_enabled()
                and not base._forward_hooks and not base._forward_pre_hooks):
            return False
        w, bias = base.weight, base.bias
        return (not w.requires_grad and (bias is None or not bias.requires_grad) and w.dtype == x.dtype
                and adapter.compute_dtype in (None, x.dtype) and isinstance(adapter.dropout, nn.Identity)
                and not torch.is_autocast_enabled(x.device.type)
                and not sharded.is_dtensor(w) and not sharded.is_dtensor(adapter.lora_A))

    def extra_repr(self) -> str:
        kind = "Conv1D" if is_conv1d(self.base) else "Linear"
        return (f"{kind} in={self.in_features}, out={self.out_features}, active={list(self.active_adapters)}, "
                f"merged={list(self.merged_adapters)}")


def make_adapter(base: nn.Module, factors: Factors, *, rank: int, alpha: float | None, init: str, train: str,
                 dropout: float, preserve_output: bool | None, adapter_dtype: torch.dtype,
                 compute_dtype: torch.dtype | None, options: dict, seed: int | None = None) -> Adapter:
    """The ``Adapter`` module for ``factors`` on ``base``'s device, without touching ``base`` (``add_adapter`` does
    that): inject builds every layer's adapter while the device is still computing the factors it then checks."""
    spec = get_init(init)
    preserve = resolve_preserve(spec, preserve_output)
    module = Adapter(factors, alpha=float(rank if alpha is None else alpha), init=init, train=train,
                     dropout=dropout, preserve_output=preserve and not spec.zero_delta, options=options,
                     dtype=adapter_dtype, compute_dtype=compute_dtype, seed=seed, fresh=spec.fresh)
    device = weight_view(base).device
    if any(t.device != device for t in module.parameters()):  # factors from an init that returned them elsewhere
        module.to(device)
    return module


def resolve_preserve(spec, preserve_output: bool | None) -> bool:
    """The effective ``preserve_output`` for an init: its default when ``None``; PiSSA cannot turn it off."""
    if preserve_output is None:
        return spec.preserve_default
    if spec.preserve_fixed and not preserve_output:
        raise ValueError(f"init {spec.name!r} always rewrites the base weight to the residual; "
                         f"drop preserve_output=False")
    return bool(preserve_output)


def nonfinite_weight_error(label: str, init: str) -> ValueError:
    """The error for a data-driven init on a weight with NaN/Inf (one wording for build_factors and inject)."""
    return ValueError(f"{label}: weight has NaN/Inf, so the data-driven init {init!r} cannot use it; "
                      f"fix the checkpoint or pick a random init (lora/slora)")


def weights_finite(weights: list[Tensor]) -> list[bool]:
    """Whether each plain (non-sharded, non-meta) weight is finite, with one host synchronisation per (device, dtype):
    each weight's fp32 (fp64) ``sum |w|`` from one multi-tensor ``_foreach_norm`` (NaN/Inf make it non-finite; only
    a weight whose sum overflows is re-checked element-wise)."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault((w.device, w.dtype), []).append(i)
    ok = [True] * len(weights)
    for (_, dtype), idx in groups.items():
        norms = torch._foreach_norm([weights[i] for i in idx], 1, dtype=torch.promote_types(dtype, torch.float32))
        flags = torch.isfinite(torch.stack(norms)).tolist()  # the one sync per group
        for i, f in zip(idx, flags):
            ok[i] = f or bool(torch.isfinite(weights[i]).all())
    return ok


def build_factors(base: nn.Module, rank: int, alpha: float | None, init: str, *, train: str, adapter: str,
                  name: str, generator: torch.Generator | None, existing: Iterable[str],
                  weight_checked: bool = False, **init_options) -> tuple[Factors, dict]:
    """Validate one layer's request and run the initialiser; raises before anything is modified.
    ``weight_checked``: the caller has already found the weight finite (inject checks all layers with one sync)."""
    spec = get_init(init)
    w, scaling = check_request(base, rank, alpha, init, train=train, adapter=adapter, name=name, existing=existing,
                               weight_checked=weight_checked, **init_options)
    if sharded.is_meta(w):  # shapes only: the adapter stays pending until nlora.initialize_adapters
        return spec.fn(w, rank, scaling=scaling, generator=None, **init_options), dict(init_options)
    factors = spec.fn(w, rank, scaling=scaling, generator=generator, **init_options)
    if sharded.is_dtensor(w) and generator is None:  # unseeded random draws may differ by rank: take rank 0's
        factors = Factors(*(None if t is None else sharded.broadcast(t, w) for t in
                            (factors.A, factors.N, factors.B, factors.rows, factors.cols)))
    return factors, dict(init_options)


def check_request(base: nn.Module, rank: int, alpha: float | None, init: str, *, train: str, adapter: str,
                  name: str, existing: Iterable[str], weight_checked: bool = False,
                  **init_options) -> tuple[Tensor, float]:
    """``build_factors``' checks of one layer's request without running the initialiser: raises as it would, else
    returns the ``(out, in)`` weight view and the scaling (inject runs batched inits on many checked layers)."""
    label = name or type(base).__name__
    spec = get_init(init)
    unknown = set(init_options) - set(spec.options)
    if unknown:
        raise ValueError(f"init {init!r} has no option(s) {sorted(unknown)}; it accepts {list(spec.options)}")
    if train not in TRAIN_MODES:
        raise ValueError(f"train={train!r}: choose 'all' (A, N, B) or 'middle' (IntTune: only N)")
    if train == "middle" and not spec.has_middle:
        raise ValueError(f"train='middle' trains only N, but init {init!r} has no middle matrix; "
                         f"use a nystrom* init or pissa")
    if train == "middle" and spec.zero_delta:
        raise ValueError(f"train='middle' freezes B, and init {init!r} sets B = 0, so N would never get a gradient; "
                         f"use a data-driven init (nystrom*, pissa) for IntTune, or train='all'")
    if adapter in existing:
        raise ValueError(f"{label}: already has an adapter named {adapter!r}; pass adapter='<new name>' to add "
                         f"another, or delete_adapter first")
    w = weight_view(base)
    out_features, in_features = w.shape
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= min(out_features, in_features):
        raise ValueError(f"{label}: rank={rank!r} must be an int in 1..min(out, in) = 1..{min(out_features, in_features)}"
                         f" for this ({out_features}, {in_features}) layer; lower it or use rank_pattern")
    if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise ValueError(f"{label}: alpha={alpha!r} must be a finite number (or None for alpha = rank)")
    if not w.is_floating_point() or w.dtype.itemsize < 2:
        raise TypeError(f"{label}: weight dtype {w.dtype} is not a 16/32/64-bit float (quantised, fp8 or integer "
                        f"weights are not supported); dequantise the model first")
    scaling = float(rank if alpha is None else alpha) / rank
    if spec.data_driven and not sharded.is_meta(w):
        # One fp32 reduction instead of a full boolean mask: any NaN/Inf makes the sum non-finite; a finite
        # weight whose sum overflows is re-checked element-wise.
        local = sharded.local_view(w)
        finite = weight_checked or bool(torch.isfinite(local.sum(dtype=torch.float32))) or \
            bool(torch.isfinite(local).all())
        if not sharded.all_ranks_true(finite, w):
            raise nonfinite_weight_error(label, init)
    return w, scaling
