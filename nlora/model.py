"""Module-tree operations: inject adapters by name pattern, merge/unmerge/unload, switch and disable adapters."""

from __future__ import annotations

import re
import warnings
import zlib
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from . import sharded
from .fingerprint import weight_samples
from .inits import Factors, get_init
from .layer import (NLoRALinear, build_factors, check_request, is_adaptable, make_adapter, nonfinite_weight_error,
                    resolve_preserve, weight_view, weights_finite)

Targets = str | Sequence[str]
HEAD_NAMES = ("lm_head",)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_EXTRA_TRAINABLE = "_nlora_trainable"


def adapter_layers(model: nn.Module) -> dict[str, NLoRALinear]:
    """Every ``NLoRALinear`` in the model by its (original) module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NLoRALinear)}


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """All modules by name, except those inside an ``NLoRALinear`` (its frozen base is not a target)."""
    inside = set()
    found = {}
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside) or not name:
            continue
        if isinstance(module, NLoRALinear):
            inside.add(name)
        found[name] = module
    return found


def _matches(name: str, pattern: Targets) -> bool:
    """PEFT semantics: a string is a regex that must fullmatch; a list entry matches ``name`` or ``*.entry``."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def output_head_names(model: nn.Module) -> set[str]:
    """The output head that ``"all-linear"`` leaves alone: ``model.get_output_embeddings()`` if the model has it
    (HF models), and any module whose last name part is ``lm_head``."""
    heads = {name for name, _ in model.named_modules() if name.split(".")[-1] in HEAD_NAMES}
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Module):
        heads |= {name for name, m in model.named_modules() if m is head}
    return heads


def _pattern_value(name: str, patterns: dict[str, float] | None, default):
    """PEFT's rank_pattern/alpha_pattern: the first key whose regex fullmatches the name or a ``.``-suffix of it wins
    (the key is grouped, so an alternation like ``q_proj|v_proj`` stays anchored on both sides)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


def _targetable(module: nn.Module) -> bool:
    """A Linear/Conv1D to wrap, or an existing wrapper to give another adapter."""
    return is_adaptable(module) or isinstance(module, NLoRALinear)


def select_targets(model: nn.Module, targets: Targets, exclude: Targets | None = None,
                   layers: Sequence[int] | int | None = None) -> dict[str, nn.Module]:
    """The modules ``inject`` would adapt, by name; raises if the pattern matches nothing or a non-linear module."""
    candidates = _candidates(model)
    if targets == "all-linear":
        heads = output_head_names(model)
        chosen = {n: m for n, m in candidates.items() if _targetable(m) and n not in heads}
    else:
        if not isinstance(targets, str) and (not targets or not all(isinstance(t, str) for t in targets)):
            raise TypeError(f"targets must be a regex string, 'all-linear' or a non-empty list of names, got {targets!r}")
        chosen = {n: m for n, m in candidates.items() if _matches(n, targets)}
    if exclude is not None:
        chosen = {n: m for n, m in chosen.items() if not _matches(n, exclude)}
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        chosen = {n: m for n, m in chosen.items()
                  if (hit := _LAYER_INDEX.search(n)) is not None and int(hit.group(1)) in wanted}
    if not chosen:
        linear = [n for n, m in candidates.items() if _targetable(m)]
        shown = ", ".join(linear[:8]) + (", ..." if len(linear) > 8 else "")
        raise ValueError(f"targets={targets!r} (exclude={exclude!r}, layers={layers!r}) matched no module of "
                         f"{type(model).__name__}; its linear modules include: {shown or 'none'}")
    wrong = [f"{n} ({type(m).__name__})" for n, m in chosen.items() if not _targetable(m)]
    if wrong:
        raise TypeError(f"targets={targets!r} matched modules nlora cannot adapt: {', '.join(wrong[:8])}; "
                        f"only nn.Linear and HF Conv1D are supported: name their Linear sub-modules instead "
                        f"(dequantise quantised layers first)")
    return chosen


def _generator(seed: int | None, name: str, device: torch.device) -> torch.Generator | None:
    """A per-module generator (seed mixed with the module name), so a layer's init never depends on how
    many layers, ranks or processes there are."""
    if seed is None or device.type == "meta":  # meta: nothing is drawn until initialize_adapters
        return None
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model: nn.Module, targets: Targets, rank: int = 8, alpha: float | None = None, init: str = "nystrom", *,
           exclude: Targets | None = None, train: str = "all", dropout: float = 0.0,
           preserve_output: bool | None = None, adapter: str = "default",
           rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
           layers: Sequence[int] | int | None = None, trainable: Sequence[str] | None = None,
           adapter_dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None,
           seed: int | None = None, **init_options) -> nn.Module:
    """Wrap every matching Linear in ``model`` with an adapter, in place, and return ``model``.

    ``targets``: a list of names (a module matches an entry equal to its name or to its ``.``-suffix), a regex
    that must fullmatch the whole name, or ``"all-linear"`` (every Linear/Conv1D except the output head, see
    ``output_head_names``). ``train="middle"`` is IntTune. The new adapter becomes the only active one and
    everything else is frozen, except the adapters' trainable parameters and the ``trainable`` modules (trained in
    full and never wrapped, even where ``targets`` match them).
    All checks and inits run before the model is touched: an error leaves it exactly as it was.
    """
    spec = get_init(init)
    resolve_preserve(spec, preserve_output)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
    merged = [n for n, l in adapter_layers(model).items() if l.merged_adapters]
    if merged:
        raise ValueError(f"adapters are merged in {merged[:4]}; call nlora.unmerge(model) before injecting")
    chosen = select_targets(model, targets, exclude, layers)
    extra = {}
    if trainable:
        if isinstance(trainable, str):
            raise TypeError(f"trainable={trainable!r} must be a list of module names, e.g. [{trainable!r}]")
        extra = {n: m for n, m in _candidates(model).items() if _matches(n, list(trainable))}
        missing = [t for t in trainable if not any(_matches(n, [t]) for n in extra)]
        if missing:
            raise ValueError(f"trainable={list(trainable)!r}: {missing} matched no module of {type(model).__name__}")
        # A fully trained module is not also adapted (PEFT's modules_to_save wins over target_modules too).
        chosen = {n: m for n, m in chosen.items() if not any(n == e or n.startswith(e + ".") for e in extra)}
        if not chosen:
            raise ValueError(f"targets={targets!r} only matched the trainable modules {sorted(extra)}; target "
                             f"other modules, or drop them from trainable")
    # Phase 1: validate and compute every factor; nothing is modified. The finiteness checks of all weights (before
    # the inits) and of all factors (after) are each resolved with one host synchronisation, not one per layer, so
    # that a GPU runs the layers' init kernels while the host is still launching the next ones.
    bases = {n: (m.base if isinstance(m, NLoRALinear) else m) for n, m in chosen.items()}
    plain = {n: weight_view(b) for n, b in bases.items() if _plain_float(weight_view(b))}
    checked = set()
    if spec.data_driven:
        for (n, w), ok in zip(plain.items(), weights_finite(list(plain.values()))):
            if not ok:
                raise nonfinite_weight_error(n, init)
        checked = set(plain)
    # Plain weights of an init with a batched form (InitSpec.many) are checked one by one here and initialised
    # together below, so that the r x r work of all layers runs as one batch (few ops, whatever the layer count).
    plans, batch = [], {}
    for name, module in chosen.items():
        base = bases[name]
        existing = tuple(module.adapters) if isinstance(module, NLoRALinear) else ()
        r = _pattern_value(name, rank_pattern, rank)
        a = _pattern_value(name, alpha_pattern, alpha)
        generator = _generator(seed, name, weight_view(base).device)
        if spec.many is not None and name in plain:
            w, scaling = check_request(base, r, a, init, train=train, adapter=adapter, name=name, existing=existing,
                                       weight_checked=name in checked, **init_options)
            batch[len(plans)] = (w, r, scaling, generator)
            factors, options = None, dict(init_options)
        else:
            factors, options = build_factors(base, r, a, init, train=train, adapter=adapter, name=name,
                                             generator=generator, existing=existing, weight_checked=name in checked,
                                             **init_options)
        plans.append([name, module, base, r, a, factors, options])
    if batch:
        ws, ranks, scalings, gens = zip(*batch.values())
        for i, factors in zip(batch, spec.many(list(ws), list(ranks), scalings=list(scalings),
                                               generators=list(gens), **init_options)):
            plans[i][5] = factors
    # The adapter modules are built (nothing in the model changes) while the device is still computing the factors;
    # the finiteness check of those factors then waits for it, once.
    kwargs = dict(init=init, train=train, dropout=dropout, preserve_output=preserve_output,
                  adapter_dtype=adapter_dtype, compute_dtype=compute_dtype, seed=seed)
    built = [make_adapter(base, factors, rank=r, alpha=a, options=options, **kwargs)
             for name, module, base, r, a, factors, options in plans]
    if spec.data_driven:  # a random init's draws are bounded: only data-driven factors can be NaN/Inf or overflow
        _refuse_nonfinite_factors({p[0]: p[5] for p in plans if not p[5].A.is_meta}, init, adapter_dtype)
    samples = dict(zip(plain, weight_samples(list(plain.values()))))  # one device-to-host copy for all layers
    for (name, module, base, *_), new in zip(plans, built):  # phase 2: apply
        if isinstance(module, NLoRALinear):
            layer = module
        else:
            layer = NLoRALinear.wrapping(base, name)
            _set_module(model, name, layer)
        layer.add_adapter(adapter, new, samples.get(name, ...))
    for module in extra.values():
        setattr(module, _EXTRA_TRAINABLE, True)
    set_adapter(model, adapter)
    return model


def _plain_float(w: torch.Tensor) -> bool:
    """A weight inject can check and sample in one batch: a plain (not sharded, not meta) 16/32/64-bit float."""
    return (not sharded.is_dtensor(w) and not w.is_meta and w.dim() == 2 and w.is_floating_point()
            and w.dtype.itemsize >= 2)


def _refuse_nonfinite_factors(factors: dict[str, Factors], init: str, adapter_dtype: torch.dtype) -> None:
    """Raise for the first layer whose factors are not finite in ``adapter_dtype``.

    All layers are checked together, a few ops and one host synchronisation per (device, dtype) whatever the layer
    count: each factor's ``sum |x|`` finite means it has no NaN/Inf, its ``max |x|`` finite in ``adapter_dtype``
    (rounding is monotonic) means no value overflows there. Only if that fails (or a finite sum overflowed) are the
    layers checked one by one, to name the first bad one."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for f in factors.values():
        for t in (f.A, f.N, f.B):
            if t is not None:
                groups.setdefault((t.device, t.dtype), []).append(t)
    if all(bool(torch.isfinite(torch.stack(torch._foreach_norm(ts, 1))).all()
                & torch.isfinite(torch.stack(torch._foreach_norm(ts, float("inf"))).to(adapter_dtype)).all())
           for ts in groups.values()):
        return
    for name, f in factors.items():
        bad = [k for k in ("A", "N", "B")
               if getattr(f, k) is not None and not bool(torch.isfinite(getattr(f, k).to(adapter_dtype)).all())]
        if bad:
            raise ValueError(f"{name}: init {init!r} gives lora_{'/'.join(bad)} values that are not finite in "
                             f"{adapter_dtype} (an ill-conditioned Nyström core overflows); nothing was changed. Use "
                             f"adapter_dtype=torch.float32, init='nystrom-optimal', or a larger rcond")


def _refresh_requires_grad(model: nn.Module, layers: dict[str, NLoRALinear] | None = None) -> None:
    """Freeze everything, then unfreeze the active adapters' trainable parameters and the extra trainable modules
    (``layers``: the model's ``adapter_layers``, if the caller has them already)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if getattr(module, _EXTRA_TRAINABLE, False):
            for p in module.parameters():
                p.requires_grad_(True)
    for layer in (adapter_layers(model) if layers is None else layers).values():
        for name in layer.active_adapters:
            for p in layer.adapters[name].trainable_parameters():
                p.requires_grad_(True)


def _require_adapters(model: nn.Module) -> dict[str, NLoRALinear]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nlora adapters; call nlora.inject first")
    return layers


def _names_in(layers: dict[str, NLoRALinear]) -> list[str]:
    names: dict[str, None] = {}
    for layer in layers.values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name present anywhere in the model, in insertion order."""
    return _names_in(adapter_layers(model))


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapter(s) everywhere (the others stay but do not run) and trainable."""
    layers = _require_adapters(model)
    names = [names] if isinstance(names, str) else list(names)
    known = _names_in(layers)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"no adapter named {unknown}; the model has {known}")
    for layer in layers.values():
        if layer.merged_adapters and set(layer.merged_adapters) - set(names):
            raise ValueError(f"{layer.module_name}: adapters {list(layer.merged_adapters)} are merged; unmerge "
                             f"before switching adapters")
    for layer in layers.values():
        layer.set_active(names)
    _refresh_requires_grad(model, layers)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; layers left with no adapter go back to their plain base module."""
    layers = _require_adapters(model)
    holders = {n: l for n, l in layers.items() if name in l.adapters}
    if not holders:
        raise ValueError(f"no adapter named {name!r}; the model has {adapter_names(model)}")
    merged = [n for n, l in holders.items() if name in l.merged_adapters]
    if merged:
        raise ValueError(f"adapter {name!r} is merged in {merged[:4]}; call nlora.unmerge(model) before deleting it")
    for module_name, layer in holders.items():
        layer.remove(name)
        if not layer.adapters:
            _set_module(model, module_name, layer.base)
            del layers[module_name]
    _refresh_requires_grad(model, layers)


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold the active adapters into the base weights (delta in fp32, rounded once). ``safe=True`` checks every
    merged weight for NaN/Inf first and raises without changing anything."""
    layers = _require_adapters(model)
    work = {name: layer.unmerged_active() for name, layer in layers.items()}
    if not any(work.values()):
        warnings.warn("every active adapter is already merged; merge did nothing", stacklevel=2)
        return model
    if safe:
        for layer in layers.values():
            if not layer.merge_stays_finite():
                raise ValueError(f"{layer.module_name}: merging would put NaN/Inf into the weight; nothing "
                                 f"was merged (check the adapter's parameters)")
    for name, layer in layers.items():
        if work[name]:
            layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights (exact in fp32 up to rounding; see README for bf16)."""
    for layer in _require_adapters(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge the active adapters and replace every wrapper by its base module: a plain model, no nlora inside."""
    layers = _require_adapters(model)
    if any(layer.unmerged_active() for layer in layers.values()):
        merge(model, safe=safe)
    for name, layer in layers.items():
        back = [layer._delta(a, initial=True) for a in layer.inactive_preserving()]  # as forward does
        if back:
            layer._add_to_weight(sum(back))
        _set_module(model, name, layer.base)
    _clear_extra_trainable(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter and give back the original model: merges undone, init residuals added back."""
    for name, layer in _require_adapters(model).items():
        _set_module(model, name, layer.restore_base())
    _clear_extra_trainable(model)
    return model


def _clear_extra_trainable(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, _EXTRA_TRAINABLE):
            delattr(module, _EXTRA_TRAINABLE)


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes the original pretrained outputs (merged adapters and init residuals
    are undone on the fly); on exit the adapters are back."""
    layers = _require_adapters(model)
    before = {name: layer.disabled for name, layer in layers.items()}  # nested blocks restore the outer state
    for layer in layers.values():
        layer.disabled = True
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.disabled = before[name]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each tensor counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_summary(model: nn.Module) -> str:
    """A table of adapted modules grouped by their last name part (q_proj, ...): count, shapes, ranks, inits,
    trainable parameters, then the model's trainable / total and the percentage."""
    groups: dict[str, dict] = {}
    for name, layer in adapter_layers(model).items():
        g = groups.setdefault(name.split(".")[-1], {"n": 0, "shape": set(), "rank": set(), "init": set(), "train": 0})
        g["n"] += 1
        g["shape"].add(f"{layer.out_features}x{layer.in_features}")
        for adapter_name, a in layer.adapters.items():
            g["rank"].add(str(a.rank))
            g["init"].add(f"{adapter_name}:{a.init}/{a.train_mode}")
            g["train"] += sum(p.numel() for p in a.parameters() if p.requires_grad)
    rows = [("module", "count", "out x in", "rank", "adapter:init/train", "trainable")]
    rows += [(k, str(g["n"]), ",".join(sorted(g["shape"])), ",".join(sorted(g["rank"], key=int)),
              ",".join(sorted(g["init"])), f"{g['train']:,}") for k, g in groups.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    extra = [n for n, m in model.named_modules() if getattr(m, _EXTRA_TRAINABLE, False)]
    if extra:
        n_extra = sum(p.numel() for n in extra for p in model.get_submodule(n).parameters() if p.requires_grad)
        lines.append(f"fully trained modules: {', '.join(extra)} ({n_extra:,} params)")
    trainable, total = count_parameters(model)
    lines.append(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: "
                 f"{100 * trainable / max(total, 1):.4f}")
    return "\n".join(lines)
