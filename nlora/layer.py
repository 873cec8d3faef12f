"""``NLoRALinear``: a frozen ``nn.Linear`` (or HF ``Conv1D``) plus named three-matrix adapters, one forward, merge."""

from __future__ import annotations

import functools
import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import sharded
from .config import AdapterConfig
from .factors import check_layer, compute_factors, module_generator
from .inits import Factors

Term = tuple  # (x or None, A, N or None, B, scale, head): one low-rank product added to a layer's output; head: A, B
#              are the weight's first r rows and columns (then x Aᵀ and g B come with the base's own products)
_OLD_COMPILE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 12)
SAMPLE_SIZE = 16  # entries of the base weight recorded with each adapter (load_adapter checks them)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # mm(..., out_dtype=): fp32 output of bf16/fp16 GEMMs (CUDA)


def is_conv1d(module: nn.Module) -> bool:
    """HF ``Conv1D`` (GPT-2 family), by duck typing: a 2-D weight stored ``(in, out)`` and an ``nf`` attribute."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def is_adaptable(module: nn.Module) -> bool:
    """Whether nlora can wrap this module: an ``nn.Linear`` or an HF ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_4bit(base: nn.Module) -> bool:
    """A 4-bit base (torchao ``NF4Tensor`` or bitsandbytes ``Params4bit`` weight): read dequantised, never written."""
    return type(getattr(base, "weight", None)).__name__ in ("NF4Tensor", "Params4bit")


def dense_weight(base: nn.Module) -> Tensor:
    """The base weight as a plain ``(out, in)`` tensor: dequantised (a new tensor) for a 4-bit base."""
    w = base.weight
    if type(w).__name__ == "NF4Tensor":
        return w.get_original_weight()
    if type(w).__name__ == "Params4bit":
        from bitsandbytes.functional import dequantize_4bit  # only reached with bitsandbytes installed
        return dequantize_4bit(w.data, w.quant_state).to(w.quant_state.dtype)
    return weight_view(base)


def weight_view(base: nn.Module) -> Tensor:
    """The base weight as an ``(out, in)`` tensor (a transposed view for ``Conv1D``); writes reach the real weight."""
    return base.weight.T if is_conv1d(base) else base.weight


def weight_sample(weight: Tensor) -> Tensor | None:
    """``SAMPLE_SIZE`` entries of an ``(out, in)`` weight at positions fixed by its shape (spread over the matrix),
    on its own device and dtype; ``None`` for a weight without local data (meta, sharded)."""
    if weight.is_meta or sharded.is_dtensor(weight):
        return None
    return torch.take(weight.detach(), sample_positions(weight.numel(), weight.device))


@functools.cache
def sample_positions(numel: int, device: torch.device) -> Tensor:
    """One flat position in each of ``SAMPLE_SIZE`` equal blocks of the weight, at a scrambled offset; made once per
    size and device (a host-to-device copy per layer would wait for the device each time)."""
    block = max(1, numel // SAMPLE_SIZE)
    return torch.tensor([min(i * block + i * 2654435761 % block, numel - 1) for i in range(SAMPLE_SIZE)], device=device)


class Adapter(nn.Module):
    """One named adapter ``s · B N A dropout(x)`` with ``s = alpha / rank``; its options are ``self.config``.

    Parameters ``lora_A (r, in)``, ``lora_N (r, r)`` (``None`` for plain LoRA), ``lora_B (out, r)``, in
    ``config.adapter_dtype``: copies of ``factors``, never aliases of the base weight. An adapter with
    ``config.reads_base`` (IntTune on a Nyström init that left the base weight alone) stores only ``lora_N``: its A and
    B are the base weight's sampled rows and columns, read at each forward, until the base weight is written (merge,
    another adapter's residual); then it keeps a copy.
    Non-persistent buffers: ``rows``/``cols`` (Nyström index sets) and, when the init rewrote the base weight
    (``preserve_output``), the initial factors ``init_A``/``init_N``/``init_B``: ``W0 = W + s B0 N0 A0``.
    """

    def __init__(self, config: AdapterConfig, factors: Factors) -> None:
        super().__init__()
        self.config = config
        self.scaling = config.scaling
        self.pending = factors.A.is_meta  # injected on the meta device: no values until initialize_adapters
        self.reads_base = config.reads_base
        self.from_weight = True  # its initial factors came from the weight it sits on (compact saves rely on it)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        for name, t in (("lora_A", factors.A), ("lora_N", factors.N), ("lora_B", factors.B)):
            keep = t is not None and not (self.reads_base and name != "lora_N")
            trains = config.train == "all" or name == "lora_N"
            self.register_parameter(name, nn.Parameter(_copy(t, config.adapter_dtype), trains) if keep else None)
        self._set_buffers(factors, share=True)

    def fill(self, factors: Factors) -> None:
        """Give a pending (meta-injected) adapter its values, in place: FSDP2 may have sharded its parameters."""
        with torch.no_grad():
            for name, p in self.named_parameters():  # lora_A, lora_N, lora_B: the factors it keeps
                t = getattr(factors, name.removeprefix("lora_"))
                sharded.local_view(p).copy_(sharded.local_part(t.to(p.dtype), p))
        self._set_buffers(factors, share=False)
        self.pending = False

    def _set_buffers(self, factors: Factors, share: bool) -> None:
        """The index sets, and the initial factors of an init that rewrote the base weight (non-persistent)."""
        device = sharded.local_view(self.lora_N if self.lora_A is None else self.lora_A).device
        for name, t in (("init_A", factors.A), ("init_N", factors.N), ("init_B", factors.B)):
            own = getattr(self, "lora" + name[4:])
            if not self.config.preserve_output or t is None:
                value = None
            elif share and own is not None and not own.requires_grad:  # a frozen factor is its own initial value
                value = own.detach()
            else:
                value = _copy(sharded.full(t), self.config.adapter_dtype).to(device)
            self.register_buffer(name, value, persistent=False)
        for name, t in (("rows", factors.rows), ("cols", factors.cols)):
            self.register_buffer(name, None if t is None else t.to(device), persistent=False)

    def factors(self, weight: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """The current ``(A, N, B)``; an adapter that reads the base takes A and B from ``weight`` (out, in)."""
        if not self.reads_base:
            return self.lora_A, self.lora_N, self.lora_B
        if self.config.options.get("index", "first") == "first":  # views: no copy
            r = self.config.rank
            return weight[:r], self.lora_N, weight[:, :r]
        return weight.index_select(0, self.rows), self.lora_N, weight.index_select(1, self.cols)

    def own_factors(self, weight: Tensor) -> None:
        """Stop reading A and B from ``weight`` (about to be written): keep a frozen copy of them instead."""
        if self.reads_base and not self.pending:
            a, _, b = self.factors(sharded.full(weight).detach())
            self.register_parameter("lora_A", nn.Parameter(_copy(a, a.dtype), False))
            self.register_parameter("lora_B", nn.Parameter(_copy(b, b.dtype), False))
            self.reads_base = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters this adapter trains: A, N, B for ``train="all"``, only N for ``"middle"`` (IntTune)."""
        return [p for name, p in self.named_parameters() if self.config.train == "all" or name == "lora_N"]

    def forward(self, x: Tensor | None, weight: Tensor, sign: float = 1.0, initial: bool = False,
                on_w0: bool = False) -> Term:
        """This adapter's term ``(dropout(x), A, N, B, sign · s, head)`` of the layer's forward (``initial``: the
        init's factors); ``x`` is ``None`` for the layer's own input (no dropout). ``head``: A and B are the first r
        rows and columns of the weight the base multiplies by (IntTune on the paper's index, or, ``on_w0``: a base
        still holding the original weight, the initial factors of a Nyström init). Called as a module so that hooks on
        it run (FSDP2 unshards a ``fully_shard``-ed adapter's parameters in its pre-forward hook). A pending
        (meta-injected) adapter refuses."""
        if self.pending:
            raise RuntimeError(f"adapter (init={self.config.init!r}) was injected on the meta device and has no values "
                               f"yet; materialise the model (to_empty), load the base weights, then call "
                               f"nlora.initialize_adapters(model)")
        a, n, b = (self.init_A, self.init_N, self.init_B) if initial else self.factors(weight)
        nystrom_w0 = on_w0 and self.from_weight and self.config.init.startswith("nystrom")
        head = (nystrom_w0 if initial else self.reads_base) and self.config.options.get("index", "first") == "first"
        return None if x is None or self.dropout is None else self.dropout(x), a, n, b, sign * self.scaling, head

    def extra_repr(self) -> str:
        return (f"rank={self.config.rank}, alpha={self.config.alpha}, init={self.config.init!r}, "
                f"train={self.config.train!r}")


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    """Two tensors of the same shape, dtype and device with equal values."""
    return (a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and bool(torch.equal(a, b)))


def _copy(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy in ``dtype``: Nyström slices of a Conv1D weight are transposed views, and a factor's memory
    layout changes matmul rounding."""
    return t.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _down(dtype: torch.dtype, x: Tensor, a: Tensor, n: Tensor | None, b: Tensor,
          h1: Tensor | None = None) -> tuple[Tensor, ...]:
    """``(x, A, N, B, h1, h2)`` in ``dtype`` for 2-D ``x``: ``h1 = x Aᵀ`` (given, if known), ``h2 = h1 Nᵀ``."""
    x, a, n, b = (_cast(t, dtype) for t in (x, a, n, b))
    h1 = F.linear(x, a) if h1 is None else h1
    return x, a, n, b, h1, h1 if n is None else F.linear(h1, n)


def _accumulate(acc: Tensor, lefts: list[Tensor], rights: list[Tensor], scales: list[float]) -> None:
    """``acc += Σ s_k L_k R_k`` in place: one ``addmm_`` over the concatenated factors (one pass over ``acc``) where
    every ``|s_k|`` is the same (the signs go into ``L_k``, exactly), else one per term."""
    if len(lefts) > 1 and all(abs(t) == abs(scales[0]) for t in scales):
        lefts, scales = [torch.cat([m if t > 0 else -m for m, t in zip(lefts, scales)], 1)], [abs(scales[0])]
        rights = [torch.cat(rights)]
    for m, r, t in zip(lefts, rights, scales):
        acc.addmm_(m, r, alpha=t)


def _term_forward(needs: list[tuple[bool, ...]], y: Tensor, x: Tensor, xk: Tensor | None, a: Tensor,
                  n: Tensor | None, b: Tensor, h1: Tensor | None) -> tuple[list[Tensor | None], Tensor, Tensor]:
    """One term ``s B N A x_k`` of the node for 2-D ``y`` (``x_k``: ``x`` where ``None``; ``h1``: ``x Aᵀ`` if known), up
    to its last matmul. Appends to ``needs`` whether ``x_k, A, N, B`` want gradients, whether ``x_k`` is ``x``, and the
    factors' own (master) dtype; returns what the backward needs of ``(x_k, A, N, B, h1, h2)`` (``None`` for the
    rest), then ``h2`` and ``Bᵀ``."""
    tied = xk is None
    xk = x if tied else xk
    need_x, need_a, need_n, need_b = [t is not None and t.requires_grad for t in (xk, a, n, b)]
    needs.append((need_x, need_a, need_n, need_b, tied, (a if n is None else n).dtype))  # N (LoRA: A): a parameter
    xk, a, n, b, h1, h2 = _down(y.dtype, xk.reshape(-1, xk.shape[-1]), a, n, b, h1 if tied else None)
    back = need_x or need_a or need_n
    return [xk if need_a else None, a if need_x else None, n if back else None, b if back else None,
            h1 if need_n else None, h2 if need_b else None], h2, b.t()


def _term_backward(g: Tensor, into: list[list[Tensor]], s: float, needs: tuple[bool, ...], gb: Tensor | None,
                   shape: torch.Size, xk: Tensor | None, a: Tensor | None, n: Tensor | None, b: Tensor | None,
                   h1: Tensor | None, h2: Tensor | None) -> list[Tensor | None]:
    """The gradients of one term's ``(x_k, A, N, B)`` from the 2-D output gradient ``g`` (``gb``: ``g B`` if known)
    and what its forward saved of ``(x_k, A, N, B, h1, h2)``; a term on the layer's own input appends its input
    gradient's factors ``(dL/dh1, A)`` to ``into`` instead (the node adds them all to ``g W`` at once)."""
    need_x, need_a, need_n, need_b, tied, master = needs
    grad_b = (_mm(g.t(), h2, master) * s if s != 1 else _mm(g.t(), h2, master)) if need_b else None
    if not (need_x or need_a or need_n):
        return [None, None, None, grad_b]
    u = torch.mm(g, b) if gb is None else gb
    u = u * s if s != 1 else u  # dL/dh2
    v = u if n is None else torch.mm(u, n)  # dL/dh1
    if need_x and tied:
        into[0].append(v)
        into[1].append(a)
    return [torch.mm(v, a).view(shape) if need_x and not tied else None, _mm(v.t(), xk, master) if need_a else None,
            _mm(u.t(), h1, master) if need_n else None, grad_b]


def _heads(t: Tensor | None, spec: tuple[tuple[float, int], ...], usable: bool) -> list[Tensor | None]:
    """Per term, the first ``head`` columns of ``t`` (a copy: ``t`` is written next) where it is a head term and ``t``
    is ``usable``, else ``None``: ``x Aᵀ`` from the base output, ``g B`` from the base's input gradient."""
    top = max(head for _, head in spec)
    t = t[:, :top].clone() if top and usable else None
    return [t[:, :head] if head and t is not None else None for _, head in spec]


def _mm(a: Tensor, b: Tensor, master: torch.dtype) -> Tensor:
    """``a @ b`` for a factor's gradient: a bf16/fp16 product for fp32 masters comes out in fp32 where the backend can
    (CUDA's ``mm`` with ``out_dtype``: fp32 accumulation kept, no cast kernel), else in ``a``'s dtype."""
    if _MM_OUT_DTYPE and a.is_cuda and master == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=master)
    return torch.mm(a, b)


class _AdaptedLinear(torch.autograd.Function):
    """``y = base(x) + Σ_k s_k B_k N_k A_k x_k`` for a linear ``base`` with ``(out, in)`` weight ``w``, as one node.

    The base runs inside (its hooks too) and every term accumulates into its output in place. ``x_k`` is ``None``
    where it is ``x`` itself (no dropout): the backward adds that term's input gradient into the base's ``g W`` in
    place. Matmuls run in ``dtype`` (default: the base output's); each term saves only what its backward needs.
    ``spec[k] = (s_k, head_k)``: ``head_k = r`` where ``A = W[:r]`` and ``B = W[:, :r]`` (IntTune on the paper's
    init), so ``x Aᵀ`` is the first r columns of ``x Wᵀ`` (read when the base has no bias and runs in ``dtype``) and
    ``g B`` those of ``g W``. Double backward is refused.
    """

    @staticmethod
    def forward(ctx, x: Tensor, base: nn.Module, w: Tensor, bias: Tensor | None, dtype: torch.dtype | None,
                spec: tuple[tuple[float, int], ...], *flat: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # the base gets 2-D rows: a fresh output (N-D F.linear with a bias is a view)
        y = base(x2)
        ctx.out_dtype, ctx.dt, ctx.spec, ctx.shape = y.dtype, dtype or y.dtype, spec, x.shape
        ctx.four_bit = base if is_4bit(base) else None  # its input gradient needs the weight dequantised
        # ``_base`` is torch's documented test for a view: HF Conv1D returns one, which a custom Function may not
        # return for in-place use, so it is copied (as is an output cast to compute_dtype, or a hook's strided one)
        if y._base is not None or ctx.dt != y.dtype or not y.is_contiguous():
            y = y.to(ctx.dt, memory_format=torch.contiguous_format, copy=True)
        # what wants a gradient, read from the inputs (torch.compile traces this as it runs; ctx.needs_input_grad
        # was not always right inside a compiled forward)
        ctx.base_needs = (x.requires_grad, w.requires_grad, bias is not None and bias.requires_grad)
        ctx.needs, saved, lefts, rights = [], [], [], []
        for k, h1 in enumerate(_heads(y, spec, bias is None and ctx.dt == w.dtype)):  # x Aᵀ of head terms
            kept, h2, bt = _term_forward(ctx.needs, y, x, *flat[4 * k: 4 * k + 4], h1)
            saved, lefts, rights = saved + kept, lefts + [h2], rights + [bt]
        _accumulate(y, lefts, rights, [s for s, _ in spec])
        ctx.save_for_backward(x2 if ctx.base_needs[1] else None, w if ctx.base_needs[0] else None, *saved)
        return _cast(y, ctx.out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, w, *saved = ctx.saved_tensors
        (base_x, base_w, base_bias), g = ctx.base_needs, _cast(g.reshape(-1, g.shape[-1]), ctx.dt)
        gx = torch.mm(g, _cast(w if ctx.four_bit is None else dense_weight(ctx.four_bit), g.dtype)) if base_x else None
        gw = torch.mm(g.t(), _cast(x, g.dtype)) if base_w else None  # only if the user unfroze the base weight
        grads, into = [], [[], []]
        for k, ((s, _), needs, gb) in enumerate(zip(ctx.spec, ctx.needs, _heads(gx, ctx.spec, gx is not None))):
            grads += _term_backward(g, into, s, needs, gb, ctx.shape, *saved[6 * k: 6 * k + 6])  # gb: g B of head terms
        if into[0]:
            _accumulate(gx, *into, [1.0] * len(into[0]))
        return gx.view(ctx.shape) if base_x else None, None, gw, g.sum(0) if base_bias else None, None, None, *grads


def build_adapter(base: nn.Module, config: AdapterConfig, label: str,
                  generator: torch.Generator | None = None) -> Adapter:
    """The ``Adapter`` for one layer (checked and initialised; ``base`` is not changed)."""
    w = check_layer(weight_view(base), config, label)
    generator = generator if generator is not None else module_generator(config.seed, label, w.device)
    return Adapter(config, compute_factors({label: w}, {label: config}, {label: generator})[label])


class NLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (or HF ``Conv1D``) with named adapters:
    ``y = base(x) + Σ_active s · B(N(A(dropout(x))))``, ``s = alpha / rank``.

    ``lora_A (r, in)``, ``lora_N (r, r)`` (``None`` for plain LoRA) and ``lora_B (out, r)`` are the active adapter's
    factors; ``adapters[name]`` holds each ``Adapter``. The ``(out, in)`` delta is formed only by ``merge``.
    The keyword arguments are ``AdapterConfig``'s fields and the init's options. With ``init="nystrom"`` (the
    paper's NLoRA) the base weight is not touched, so the output changes at init; ``preserve_output=True`` subtracts
    the initial delta from the base weight instead. The wrapped layer's forward hooks run, but its gradient is that of
    ``x Wᵀ + b``: a hook that changes its output is not differentiated (hook the ``NLoRALinear`` instead), and IntTune
    on the paper's init reads ``x Aᵀ = (x Wᵀ)[:, :r]`` from that output.
    """

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float | None = None, init: str = "nystrom", *,
                 adapter: str = "default", name: str = "", generator: torch.Generator | None = None,
                 **kwargs) -> None:
        if not is_adaptable(base):
            raise TypeError(f"{name or type(base).__name__}: NLoRALinear wraps nn.Linear or HF Conv1D, "
                            f"got {type(base).__name__}; target its Linear sub-modules instead")
        module = build_adapter(base, AdapterConfig.build(rank=rank, alpha=alpha, init=init, **kwargs),
                               name or type(base).__name__, generator)
        self._wrap(base, name)
        self.add(adapter, module)
        self.active_adapters = (adapter,)

    def _wrap(self, base: nn.Module, name: str) -> "NLoRALinear":
        nn.Module.__init__(self)
        self.base = base.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        self.disabled = False
        self.routing = None  # set by nlora.route: each batch row through its own adapter
        self.preserving: tuple[str, ...] = ()  # adapters whose init rewrote the weight (a forward gives them back)
        self.module_name = name
        self.training = base.training  # a wrapper (and its adapters) starts in the mode of the layer it wraps
        return self

    @classmethod
    def wrapping(cls, base: nn.Module, name: str = "") -> "NLoRALinear":
        """An ``NLoRALinear`` around ``base`` that holds no adapter yet."""
        return cls.__new__(cls)._wrap(base, name)

    @property
    def weight(self) -> Tensor:
        """The base weight as ``(out, in)``."""
        return weight_view(self.base)

    # a 4-bit weight is never written: preserve_output residuals run in the forward, merges are refused
    four_bit = property(lambda self: is_4bit(self.base))
    in_features = property(lambda self: self.base.in_features if self.four_bit else self.weight.shape[1])
    out_features = property(lambda self: self.base.out_features if self.four_bit else self.weight.shape[0])

    def active(self) -> Adapter:
        """The only active adapter (the single-adapter accessors ``lora_A`` ... read it); refuses none or several."""
        if len(self.active_adapters) != 1:
            raise RuntimeError(f"{self.module_name}: {len(self.active_adapters)} adapters are active "
                               f"({self.active_adapters}); use .adapters[name] to pick one")
        return self.adapters[self.active_adapters[0]]

    # the only active adapter's live factors (A and B may be the base weight's rows and columns) and scale
    lora_A = property(lambda self: self.active().factors(self.weight)[0])
    lora_N = property(lambda self: self.active().lora_N)
    lora_B = property(lambda self: self.active().factors(self.weight)[2])
    scaling = property(lambda self: self.active().scaling)

    # -- adapters ------------------------------------------------------------------------------------------------
    def add(self, adapter_name: str, adapter: Adapter) -> None:
        """Register ``adapter`` (in this layer's train/eval mode) and settle it on the weight (see ``settle``); on a
        4-bit base an adapter that would read A and B from the weight keeps dequantised copies instead."""
        adapter.train(self.training)
        if self.four_bit:
            adapter.own_factors(dense_weight(self.base))
        self.settle(adapter)
        self.adapters[adapter_name] = adapter
        self.preserving += (adapter_name,) if adapter.config.preserve_output else ()

    def settle(self, adapter: Adapter) -> None:
        """Record a sample of the weight ``adapter`` sits on (``load_adapter`` checks it), then, for an initialised
        adapter whose init preserves the output, subtract its initial delta from that weight."""
        adapter.base_sample = weight_sample(dense_weight(self.base))
        last = next(reversed(self.adapters.values()), None)
        for name in ("base_sample", "rows", "cols") if last is not None and not adapter.pending else ():
            mine, theirs = getattr(adapter, name), getattr(last, name, None)  # share equal small tensors: K IntTune
            if _same(mine, theirs):  # adapters of a layer then cost K r² numbers and nothing else
                setattr(adapter, name, theirs)
        if adapter.config.preserve_output and not adapter.pending and not self.four_bit:
            self.add_to_weight([adapter(None, self.weight, -1.0, initial=True)])

    def set_active(self, names: Iterable[str]) -> None:
        """Choose which of this layer's adapters run in forward (names it does not hold are ignored)."""
        self.active_adapters = tuple(n for n in names if n in self.adapters)

    def remove(self, adapter_name: str) -> None:
        """Delete an adapter; an init that moved the base weight gives its initial delta back first."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"{self.module_name}: adapter {adapter_name!r} is merged; unmerge it before deleting it")
        adapter = self.adapters.pop(adapter_name)
        if adapter.config.preserve_output and not adapter.pending and not self.four_bit:
            self.add_to_weight([adapter(None, self.weight, initial=True)])
        self.preserving = tuple(n for n in self.preserving if n != adapter_name)
        self.set_active(self.active_adapters)

    # -- merging ---------------------------------------------------------------------------------------------------
    def weight_plus(self, terms: list[Term]) -> Tensor:
        """This rank's block of ``W + Σ s B N A`` in fp32 (fp64 for an fp64 weight), not yet written anywhere."""
        w = self.weight
        acc = sharded.local_view(dense_weight(self.base)).to(torch.promote_types(w.dtype, torch.float32), copy=True)
        if sharded.is_dtensor(w):  # each rank adds its block of the full delta
            return acc.add_(sharded.local_part(_add_terms(acc.new_zeros(w.shape), terms), w))
        return _add_terms(acc, terms)

    def add_to_weight(self, terms: list[Term], safe: bool = False) -> None:
        """``W += Σ s B N A``, rounded once into the weight's dtype; ``safe`` refuses a non-finite result."""
        if self.four_bit:
            raise ValueError(f"{self.module_name}: the base weight is 4-bit ({type(self.base.weight).__name__}), which "
                             f"nlora never writes (that would requantise it); use nlora.merge_and_unload(model) for "
                             f"a dequantised merged model")
        w = self.weight
        with torch.no_grad():
            if (safe or len(terms) > 1 or any(a.reads_base for a in self.adapters.values()) or sharded.is_dtensor(w)
                    or w.dtype.itemsize < 4):
                new = self.weight_plus(terms)
                if safe and not sharded.all_ranks_true(bool(new.isfinite().all()), w):
                    raise ValueError(f"{self.module_name}: merging would put NaN/Inf into the weight; "
                                     f"nothing was changed")
                for adapter in self.adapters.values():  # they read A, B from the weight: copy them before it changes
                    adapter.own_factors(w)
                sharded.local_view(w).copy_(new)
            else:  # one term on an fp32/fp64 weight no factor reads: the same sum in place (no copy of W), all or none
                _add_terms(w, terms)

    def unmerged_active(self) -> list[str]:
        """The names of the active adapters not yet merged into the weight: what ``merge`` would fold in."""
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def merge_terms(self) -> list[Term]:
        """The terms ``merge`` adds to the weight: every active, unmerged adapter's ``s · B N A``."""
        return [self.adapters[n](None, self.weight) for n in self.unmerged_active()]

    def merge(self, safe: bool = False) -> None:
        """Fold every active, unmerged adapter into the base weight (warns if there is none)."""
        if not (todo := self.unmerged_active()):
            warnings.warn(f"{self.module_name}: all active adapters are already merged; nothing to do", stacklevel=2)
            return
        self.add_to_weight(self.merge_terms(), safe=safe)
        self.merged_adapters += tuple(todo)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight (warns if none is merged)."""
        if not self.merged_adapters:
            warnings.warn(f"{self.module_name}: no adapter is merged; nothing to unmerge", stacklevel=2)
            return
        self.add_to_weight([self.adapters[n](None, self.weight, -1.0) for n in self.merged_adapters])
        self.merged_adapters = ()

    def original_terms(self) -> list[Term]:
        """What turns the stored weight back into the original pretrained one: merges undone, residuals given back."""
        w = self.weight
        return ([self.adapters[n](None, w, -1.0) for n in self.merged_adapters]
                + [self.adapters[n](None, w, initial=True) for n in self.preserving if not self.four_bit])

    def restore_base(self) -> nn.Module:
        """The base module holding the original pretrained weight again (merges and residuals undone)."""
        if terms := self.original_terms():
            self.add_to_weight(terms)
        self.merged_adapters = ()
        return self.base

    def dequantise(self) -> None:
        """Replace a 4-bit base by a plain ``nn.Linear`` holding its dequantised weight, minus the output-preserving
        adapters' initial deltas (as a plain base stores them); merges then work."""
        base, dense = self.base, dense_weight(self.base)
        plain = nn.Linear(dense.shape[1], dense.shape[0], bias=base.bias is not None, device=dense.device,
                          dtype=dense.dtype).requires_grad_(False)
        plain.load_state_dict({"weight": dense} if base.bias is None else {"weight": dense, "bias": base.bias})
        self.base = plain
        if terms := [self.adapters[n](None, self.weight, -1.0, initial=True) for n in self.preserving]:
            self.add_to_weight(terms)

    def delta_weight(self, adapter_name: str | None = None, initial: bool = False) -> Tensor:
        """An adapter's ``s · B N A`` (``initial``: its init's ``s · B0 N0 A0``) as an fp32 ``(out, in)`` tensor."""
        adapter = self.active() if adapter_name is None else self.adapters[adapter_name]
        w = sharded.local_view(dense_weight(self.base))
        delta = w.new_zeros((self.out_features, self.in_features), dtype=torch.promote_types(w.dtype, torch.float32))
        return _add_terms(delta, [adapter(None, self.weight, initial=initial)])

    # -- forward ---------------------------------------------------------------------------------------------------
    def terms(self, x: Tensor, w: Tensor) -> list[Term]:
        """The low-rank products this forward adds to the base output (``w``: ``self.weight``)."""
        if self.disabled:
            return self.original_terms()
        active = [self.adapters[n] for n in self.unmerged_active()]
        if self.four_bit:  # W is W0: an active output-preserving adapter's initial delta is subtracted here
            return [a(x, w) for a in active] + [a(None, w, -1.0, initial=True, on_w0=True) for a in active
                                                 if a.config.preserve_output]
        return [a(x, w) for a in active] + self.given_back(w)  # each relative to W0

    def given_back(self, w: Tensor) -> list[Term]:
        """The initial deltas of the inactive output-preserving adapters (``w``: ``self.weight``): added to the stored
        weight, they undo the residuals of adapters that do not run."""
        return [self.adapters[n](None, w, initial=True) for n in self.preserving if n not in self.active_adapters]

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The adapters' matmul dtype (``config.compute_dtype``; ``None``: the base output's)."""
        return next(iter(self.adapters.values())).config.compute_dtype

    def forward(self, x: Tensor) -> Tensor:
        if self.routing is not None:
            return self.routing(self, x)
        base, w = self.base, self.weight
        terms = self.terms(x, w)
        if not terms:
            return base(x)
        if _OLD_COMPILE and torch.is_grad_enabled() and torch.compiler.is_compiling():
            raise RuntimeError("torch.compile before torch 2.12 gives nlora's adapters zero gradients (measured on "
                               "2.11); train eagerly, or upgrade torch (compiled inference is fine)")
        spec = tuple((s, a.shape[0] if head else 0) for _, a, _, _, s, head in terms)
        flat = [t for term in terms for t in term[:4]]
        y = _AdaptedLinear.apply(x, base, w, base.bias, self.compute_dtype, spec, *flat)
        return y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        kind = "Conv1D" if is_conv1d(self.base) else "Linear"
        return (f"{kind} in={self.in_features}, out={self.out_features}, active={list(self.active_adapters)}, "
                f"merged={list(self.merged_adapters)}")


def _add_terms(acc: Tensor, terms: list[Term]) -> Tensor:
    """``acc += Σ s B N A`` in place, in ``acc``'s dtype, one ``addmm_`` per term (sharded factors gathered)."""
    for _, a, n, b, s, _ in terms:
        a, b = sharded.full(a).to(acc.dtype), sharded.full(b).to(acc.dtype)
        acc.addmm_(b, a if n is None else sharded.full(n).to(acc.dtype) @ a, alpha=s)
    return acc
