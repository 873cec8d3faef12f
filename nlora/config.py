"""``AdapterConfig``: every option of one adapter, validated once and passed everywhere as one frozen object."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .inits import get_init

@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """One adapter ``ΔW = (alpha / rank) · B N A`` in torch layout (``A (r, in)``, ``N (r, r)``, ``B (out, r)``).

    Args:
        rank: ``r``, a positive int (at most ``min(out, in)`` of each layer it goes on).
        alpha: the scale numerator; ``None`` means ``alpha = rank`` (``s = 1``, as in the paper).
        init: a registered initialiser (``nlora.INITIALIZERS``): lora, gaussian, slora, nystrom, nystrom-pinv,
            nystrom-optimal, pissa.
        train: ``"all"`` trains A, N and B; ``"middle"`` trains only N (IntTune).
        dropout: dropout on the adapter's input, in [0, 1).
        preserve_output: subtract the initial delta from the base weight so the output is unchanged at init;
            ``None`` takes the init's default (resolved here, so the field is always a bool).
        adapter_dtype: dtype of the trained factors (fp32 masters by default).
        compute_dtype: dtype of the adapter matmuls; ``None`` follows the input (or autocast).
        seed: draws of each module come from a generator seeded with ``seed`` and the module's name.
        options: the initialiser's own keyword options (e.g. ``index``, ``rcond``).
    """

    rank: int = 8
    alpha: float | None = None
    init: str = "nystrom"
    train: str = "all"
    dropout: float = 0.0
    preserve_output: bool | None = None
    adapter_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype | None = None
    seed: int | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = get_init(self.init)
        for name, types, ok, what in (  # a wrong type is a TypeError, a wrong value a ValueError
                ("rank", int, lambda v: v > 0, "a positive int"),
                ("alpha", (int, float, type(None)), lambda v: v is None or math.isfinite(v),
                 "a finite number (or None: alpha = rank)"),
                ("dropout", (int, float), lambda v: 0 <= v < 1, "a number in [0, 1)"),
                ("seed", (int, type(None)), lambda v: True, "an int or None")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, types):
                raise TypeError(f"{name}={value!r} must be {what}, got {type(value).__name__}")
            if not ok(value):
                raise ValueError(f"{name}={value!r} must be {what}")
        if self.train not in ("all", "middle"):
            raise ValueError(f"train={self.train!r}: choose 'all' (A, N, B) or 'middle' (IntTune: only N)")
        if self.train == "middle" and not spec.has_middle:
            raise ValueError(f"train='middle' trains only N, but init {self.init!r} has no middle matrix; "
                             f"use a nystrom* init or pissa")
        if self.train == "middle" and spec.zero_delta:
            raise ValueError(f"train='middle' freezes B, and init {self.init!r} sets B = 0, so N would never get a "
                             f"gradient; use a data-driven init (nystrom*, pissa) for IntTune, or train='all'")
        for name, dtype in (("adapter_dtype", self.adapter_dtype),  # compute_dtype may be None (follow the input)
                            ("compute_dtype", torch.float32 if self.compute_dtype is None else self.compute_dtype)):
            if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise TypeError(f"{name}={dtype!r} must be a floating torch.dtype, e.g. torch.float32")
        unknown = sorted(set(self.options) - set(spec.options))
        if unknown:
            raise ValueError(f"init {self.init!r} has no option(s) {unknown}; it accepts {list(spec.options)}")
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "preserve_output", self._resolve_preserve(spec))

    def _resolve_preserve(self, spec) -> bool:
        if self.preserve_output is None:
            return spec.preserve_default
        if spec.preserve_fixed and not self.preserve_output:
            raise ValueError(f"init {self.init!r} always rewrites the base weight to the residual; "
                             f"drop preserve_output=False")
        return bool(self.preserve_output) and not spec.zero_delta  # B = 0: there is nothing to subtract

    @classmethod
    def build(cls, options: dict[str, Any] | None = None, **kwargs: Any) -> "AdapterConfig":
        """A config from keyword arguments: config fields by name, every other keyword is an init option."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
        return cls(**kwargs, options={**(options or {}), **extra})

    @property
    def scaling(self) -> float:
        """``s = alpha / rank`` (``alpha = rank`` when ``alpha`` is ``None``)."""
        return float(self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def reads_base(self) -> bool:
        """IntTune on a Nyström init that leaves the base weight as it is: A and B are the base weight's sampled
        rows and columns, so they are read from it instead of stored."""
        return (self.train == "middle" and self.init.startswith("nystrom") and not self.preserve_output)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (dtypes by name) that ``from_dict`` turns back into an equal config."""
        return {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """The config ``to_dict`` gave (dtypes by name), validated again."""
        dtypes = {k: getattr(torch, str(data[k]), data[k]) for k in ("adapter_dtype", "compute_dtype") if data.get(k)}
        return cls(**{**data, **dtypes})  # __post_init__ refuses what is not a dtype

