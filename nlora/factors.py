"""Building adapter factors for many layers at once: check each layer, run the init (batched where it can be),
check the results; nothing here changes a model."""

from __future__ import annotations

import warnings
import zlib

import torch
from torch import Tensor

from . import sharded
from .config import AdapterConfig
from .inits import Factors, get_init

MOVED_A_LOT = 0.2  # median ||s B N A|| / ||W|| above which inject warns that the init changes the model's outputs


def module_generator(seed: int | None, name: str, device: torch.device) -> torch.Generator | None:
    """A per-module generator (seed mixed with the module name): a layer's draws do not depend on how many layers,
    ranks or processes there are."""
    if seed is None or device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def meta_factors(shape: torch.Size, config: AdapterConfig) -> Factors:
    """Factors of the right shapes on the meta device: an adapter that waits for ``nlora.initialize_adapters``."""
    (out_features, in_features), r = shape, config.rank
    return Factors(torch.empty(r, in_features, device="meta"),
                   torch.empty(r, r, device="meta") if get_init(config.init).has_middle else None,
                   torch.empty(out_features, r, device="meta"))


def check_layer(w: Tensor, config: AdapterConfig, label: str) -> Tensor:
    """``w``, the ``(out, in)`` weight of a layer, after checking that ``config`` fits it (raises, changes nothing)."""
    if type(w) not in (Tensor, torch.nn.Parameter) and not sharded.is_dtensor(w):  # before anything reads its shape
        raise TypeError(f"{label}: the weight is a {type(w).__name__} (a quantised or wrapped tensor), not a "
                        f"plain float tensor; dequantise the layer first")
    if not w.is_floating_point() or w.dtype.itemsize < 2:
        raise TypeError(f"{label}: weight dtype {w.dtype} is not a 16/32/64-bit float (quantised, fp8 or integer "
                        f"weights are not supported); dequantise the model first")
    out_features, in_features = w.shape
    if config.rank > min(out_features, in_features):
        raise ValueError(f"{label}: rank={config.rank} is larger than min(out, in) = {min(out_features, in_features)} "
                         f"of this ({out_features}, {in_features}) layer; lower it or use rank_pattern")
    return w


def _refuse_nonfinite(tensors: dict[str, tuple[Tensor | None, ...]], message: str, dtype: torch.dtype | None = None,
                      weights: dict[str, Tensor] | None = None) -> None:
    """Raise ``ValueError("<name>: <message>")`` for the first name with a NaN/Inf among its tensors (``None``
    skipped), or a value beyond the range of ``dtype`` where given; for a sharded ``weights[name]``: on any rank (one
    collective per sharded name). One pass over each tensor (``max |t|``, which NaN and Inf propagate to), then one
    stack, cast and check of all of them and one device-to-host copy, not one synchronisation each."""
    named = [(name, t) for name, ts in tensors.items() for t in ts if t is not None]
    maxes = [torch.linalg.vector_norm(t, float("inf")).to(named[0][1].device) for _, t in named]
    finite = torch.stack(maxes).to(dtype=dtype).isfinite().tolist() if maxes else []  # dtype None: the tensors' own
    bad = {name for (name, _), ok in zip(named, finite) if not ok}
    for name in tensors:
        if not (name not in bad if weights is None else sharded.all_ranks_true(name not in bad, weights[name])):
            raise ValueError(f"{name}: {message}")


def _rank0(f: Factors, w: Tensor, generator: torch.Generator | None) -> Factors:
    """``f``; for a sharded ``w`` drawn without a generator (the draws may differ by rank), rank 0's ``f``
    (``sharded.broadcast`` gives a plain ``w``'s tensors back as they are)."""
    return f if generator is not None else Factors(*(None if t is None else sharded.broadcast(t, w)
                                                     for t in vars(f).values()))


def compute_factors(weights: dict[str, Tensor], configs: dict[str, AdapterConfig],
                    generators: dict[str, torch.Generator | None], check: bool = True) -> dict[str, Factors]:
    """Every layer's initial factors (all configs share one init and its options): real weights through the init's
    batched form where it has one, meta weights get meta factors. Refuses non-finite weights (data-driven inits) and,
    with ``check``, factors that overflow the adapter dtype (else call ``check_factors``); changes nothing."""
    config = next(iter(configs.values()))
    spec = get_init(config.init)
    real = {n: w for n, w in weights.items() if not sharded.is_meta(w)}
    if spec.data_driven:
        _refuse_nonfinite({n: (sharded.local_view(w),) for n, w in real.items()},
                          f"weight has NaN/Inf, so the data-driven init {config.init!r} cannot use it; fix the "
                          f"checkpoint or pick a random init (lora/slora)", weights=real)
    made = (spec.many(list(real.values()), [configs[n].rank for n in real],
                      scalings=[configs[n].scaling for n in real], generators=[generators[n] for n in real],
                      **config.options)
            if spec.many is not None else
            [spec.fn(w, configs[n].rank, scaling=configs[n].scaling, generator=generators[n], **config.options)
             for n, w in real.items()])
    out = {n: _rank0(f, real[n], generators[n]) for n, f in zip(real, made)}
    if check:
        check_factors(out, config)
    meta = {n: meta_factors(w.shape, configs[n]) for n, w in weights.items() if n not in real}
    return {**meta, **out}


def check_factors(factors: dict[str, Factors], config: AdapterConfig) -> None:
    """Refuse a data-driven init's factors that are not finite in ``config.adapter_dtype`` (meta factors skipped).
    One synchronisation with the device: ``inject`` builds the adapters first, so that their host work overlaps the
    device's work on the factors."""
    if get_init(config.init).data_driven:
        _refuse_nonfinite({n: (f.A, f.N, f.B) for n, f in factors.items() if not f.A.is_meta},
                          f"init {config.init!r} gives factors that are not finite in {config.adapter_dtype} (an "
                          f"ill-conditioned Nyström core overflows); nothing was changed. Use "
                          f"adapter_dtype=torch.float32, init='nystrom-optimal', or a larger rcond",
                          config.adapter_dtype)


def warn_if_moved(factors: dict[str, Factors], weights: dict[str, Tensor], configs: dict[str, AdapterConfig]) -> None:
    """Warn once when an init that keeps the base weight moves the layers a lot: the median ||s B N A|| / ||W|| over
    the layers is above ``MOVED_A_LOT``. For iid entries of std σ it is about r·σ², which the message reports too."""
    ratios, rule = [], []
    for name, f in list(factors.items())[:: max(1, len(factors) // 16)]:  # ~16 spread layers are enough for a median
        w = weights[name]
        if f.N is None or f.A.is_meta or sharded.is_dtensor(w):
            continue
        na = f.N.double() @ f.A.double()
        delta = ((f.B.double().T @ f.B.double()) * (na @ na.T)).sum().sqrt()  # ||B N A||_F from r x r products
        norm = torch.linalg.vector_norm(w, dtype=torch.float64)
        ratios.append(configs[name].scaling * delta / norm)
        rule.append(configs[name].rank * norm.square() / w.numel())  # r·σ², σ² = mean of the squared entries
    if ratios and (median := torch.stack(ratios).median().item()) > MOVED_A_LOT:
        warnings.warn(f"init {next(iter(configs.values())).init!r} keeps the base weights, so at init it changes the "
                      f"adapted layers by a median ||s*B N A|| / ||W|| = {median:.2f} (r*sigma^2 = "
                      f"{torch.stack(rule).median().item():.2f}, sigma = the weights' entry std): the model's outputs "
                      f"move a lot before training. Pass preserve_output=True to keep them", stacklevel=3)


