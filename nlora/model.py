"""Module-tree operations: pick targets by name, inject adapters, switch, disable, merge and unload them."""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

from torch import nn

from . import sharded
from .config import AdapterConfig
from .factors import check_factors, check_layer, compute_factors, module_generator, warn_if_moved
from .inits import get_init
from .layer import Adapter, NLoRALinear, dense_weight, is_4bit, is_adaptable, weight_view

Targets = str | Sequence[str]
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_TRAINABLE = "_nlora_trainable"  # marks a module trained in full (inject's ``trainable``)


def _walk(module: nn.Module, name: str = "", seen: set[int] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` without what sits inside an ``NLoRALinear`` (its base and adapters): same order, each
    module once, and a cost that does not grow with the number of adapters."""
    seen = set() if seen is None else seen
    if id(module) not in seen:
        seen.add(id(module))
        yield name, module
        for n, child in () if isinstance(module, NLoRALinear) else module.named_children():
            yield from _walk(child, f"{name}.{n}" if name else n, seen)


def adapter_layers(model: nn.Module) -> dict[str, NLoRALinear]:
    """Every ``NLoRALinear`` in the model by its (original) module name."""
    return {name: m for name, m in _walk(model) if isinstance(m, NLoRALinear)}


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """All named modules except the model itself and what sits inside an ``NLoRALinear``."""
    return {name: m for name, m in _walk(model) if name}


def unwrap(module: nn.Module) -> nn.Module:
    """The wrapped base of an ``NLoRALinear``; any other module itself."""
    return module.base if isinstance(module, NLoRALinear) else module


def trainable_module_names(model: nn.Module) -> list[str]:
    """The names of the modules trained in full (``inject(trainable=...)``), sorted."""
    return sorted(n for n, m in model.named_modules() if getattr(m, _TRAINABLE, False))


def _matches(name: str, pattern: Targets) -> bool:
    """PEFT's rule: a string is a regex that must fullmatch; a list entry matches ``name`` or ``*.entry``."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def _pattern_value(name: str, patterns: dict | None, default):
    """PEFT's rank_pattern/alpha_pattern: the first key whose regex fullmatches the name or a ``.``-suffix of it."""
    return next((value for key, value in (patterns or {}).items() if re.fullmatch(rf"(?:.*\.)?(?:{key})", name)),
                default)


def _targetable(module: nn.Module) -> bool:
    return is_adaptable(module) or isinstance(module, NLoRALinear)


def _listed(model: nn.Module, candidates: dict[str, nn.Module], entries: Sequence[str],
            what: str) -> dict[str, nn.Module]:
    """The candidates that a list of names picks (see ``_matches``); raise if an entry matches none of them,
    suggesting close names."""
    missing = [e for e in entries if not any(_matches(n, [e]) for n in candidates)]
    if missing:
        parts = sorted({p for n in candidates for p in (n, n.split(".")[-1])})
        hints = {m: difflib.get_close_matches(m, parts, n=3) for m in missing}
        said = "; ".join(f"{m!r}" + (f" (did you mean {', '.join(map(repr, h))}?)" if h else "")
                         for m, h in hints.items())
        raise ValueError(f"{what}={list(entries)!r}: entries match no module of {type(model).__name__}: {said}; "
                         f"nothing was changed")
    return {n: m for n, m in candidates.items() if _matches(n, entries)}


def _matching(model: nn.Module, candidates: dict[str, nn.Module], targets: Targets) -> dict[str, nn.Module]:
    """The candidates that ``targets`` names (``"all-linear"``, a regex, or a list whose every entry must match).
    ``"all-linear"`` leaves the output heads alone, as PEFT does: ``model.get_output_embeddings()`` (HF models), any
    module named ``lm_head``, and the ``classifier`` / ``score`` of ``*For{Sequence,Token}Classification`` models
    (train those with ``inject(trainable=[...])``)."""
    if targets == "all-linear":
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        classifier = type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification"))
        heads = ("lm_head", "classifier", "score") if classifier else ("lm_head",)
        return {n: m for n, m in candidates.items()
                if _targetable(m) and m is not head and n.split(".")[-1] not in heads}
    if isinstance(targets, str):
        return {n: m for n, m in candidates.items() if _matches(n, targets)}
    if isinstance(targets, (bytes, dict)) or not targets or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"targets must be a regex string, 'all-linear' or a non-empty list of names, got {targets!r}")
    return _listed(model, candidates, targets, "targets")


def _kept(name: str, exclude: Targets | None, layers: Sequence[int] | int | None) -> bool:
    """Whether ``exclude`` leaves the module in and ``layers`` (block indices) includes it."""
    if exclude is not None and _matches(name, exclude):
        return False
    hit = _LAYER_INDEX.search(name)
    return layers is None or (hit is not None and int(hit.group(1)) in (
        {layers} if isinstance(layers, int) else layers))


def select_targets(model: nn.Module, targets: Targets, exclude: Targets | None = None,
                   layers: Sequence[int] | int | None = None) -> dict[str, nn.Module]:
    """The modules ``inject`` would adapt, by name. Every entry of a target list must match some module."""
    candidates = _candidates(model)
    chosen = {n: m for n, m in _matching(model, candidates, targets).items() if _kept(n, exclude, layers)}
    if not chosen:
        linear = [n for n, m in candidates.items() if _targetable(m)]
        raise ValueError(f"targets={targets!r} (exclude={exclude!r}, layers={layers!r}) matched no module of "
                         f"{type(model).__name__}; its linear modules include: "
                         f"{', '.join(linear[:8]) + (', ...' if len(linear) > 8 else '') or 'none'}")
    wrong = [f"{n} ({type(m).__name__})" for n, m in chosen.items() if not _targetable(m)]
    if wrong:
        raise TypeError(f"targets={targets!r} matched modules nlora cannot adapt: {', '.join(wrong[:8])}; only "
                        f"nn.Linear and HF Conv1D are supported: name their Linear sub-modules instead "
                        f"(dequantise quantised layers first)")
    return chosen


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)  # get_submodule("") is the model


def inject(model: nn.Module, targets: Targets, rank: int = 8, alpha: float | None = None, init: str = "nystrom", *,
           exclude: Targets | None = None, layers: Sequence[int] | int | None = None, adapter: str = "default",
           rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
           trainable: Sequence[str] | None = None, **kwargs) -> nn.Module:
    """Wrap every matching Linear / HF Conv1D of ``model`` with an adapter named ``adapter``, in place; returns it.

    ``targets``: a list of names (an entry matches a module whose name equals it or ends with ``.entry``; every entry
    must match), a regex that must fullmatch the whole name, or ``"all-linear"`` (every Linear/Conv1D except the
    output head). Every other keyword is an ``AdapterConfig`` field (``train``, ``dropout``, ``preserve_output``,
    ``adapter_dtype``, ``compute_dtype``, ``seed``) or an option of the init. The new adapter becomes the only active
    one; everything else is frozen, except the adapters' trainable parameters and the ``trainable`` modules (trained
    in full and never wrapped). All checks and inits run before the model is touched: an error changes nothing.
    """
    config = AdapterConfig.build(rank=rank, alpha=alpha, init=init, **kwargs)
    chosen, extra = _chosen_and_trainable(model, targets, exclude, layers, trainable)
    configs = {n: _layer_config(config, n, _pattern_value(n, rank_pattern, rank),
                                _pattern_value(n, alpha_pattern, alpha)) for n in chosen}
    four_bit = [n for n, m in chosen.items() if is_4bit(unwrap(m))]  # dequantised one at a time, below
    weights = {n: check_layer(weight_view(unwrap(m)), configs[n], n) for n, m in chosen.items() if n not in four_bit}
    _refuse_modules([n for n, m in chosen.items() if isinstance(m, NLoRALinear) and adapter in m.adapters],
                    "{names[0]}: already has an adapter named {adapter!r}; pass adapter='<new name>' to add another, "
                    "or delete_adapter first", adapter=adapter)
    generators = {n: module_generator(config.seed, n, sharded.local_view(w).device) for n, w in weights.items()}
    factors = compute_factors(weights, configs, generators, check=False)
    adapters = {n: Adapter(configs[n], f) for n, f in factors.items()}  # host work while the device computes
    check_factors(factors, config)
    if not config.preserve_output and get_init(config.init).data_driven:
        warn_if_moved(factors, weights, configs)
    for n in four_bit:
        w = check_layer(dense_weight(unwrap(chosen[n])), configs[n], n)
        f = compute_factors({n: w}, configs, {n: module_generator(config.seed, n, w.device)})[n]
        adapters[n] = Adapter(configs[n], f)
    for name, module in chosen.items():  # apply: nothing below can fail
        wrap_layer(model, name, module).add(adapter, adapters[name])
    for module in extra.values():
        setattr(module, _TRAINABLE, True)
    set_adapter(model, adapter)
    return model


def _layer_config(config: AdapterConfig, name: str, rank: int, alpha: float | None) -> AdapterConfig:
    """``config`` with one module's rank and alpha (from the patterns); an error names the module."""
    try:
        return dataclasses.replace(config, rank=rank, alpha=alpha)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err} (from rank_pattern/alpha_pattern)") from None


def wrap_layer(model: nn.Module, name: str, module: nn.Module) -> NLoRALinear:
    """The ``NLoRALinear`` at ``name``: ``module`` itself, or a new wrapper put in its place."""
    if isinstance(module, NLoRALinear):
        return module
    layer = NLoRALinear.wrapping(module, name)
    _set_module(model, name, layer)
    return layer


def _chosen_and_trainable(model: nn.Module, targets: Targets, exclude: Targets | None, layers,
                          trainable: Sequence[str] | None) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """The modules to adapt and the modules to train in full (never also adapted), checked."""
    _refuse_modules([n for n, layer in adapter_layers(model).items() if layer.merged_adapters],
                    "adapters are merged in {names}; call nlora.unmerge(model) before injecting")
    chosen = select_targets(model, targets, exclude, layers)
    if trainable and isinstance(trainable, str):
        raise TypeError(f"trainable={trainable!r} must be a list of module names, e.g. [{trainable!r}]")
    extra = _listed(model, _candidates(model), trainable, "trainable") if trainable else {}
    chosen = {n: m for n, m in chosen.items() if not any(n == e or n.startswith(e + ".") for e in extra)}
    if not chosen:
        raise ValueError(f"targets={targets!r} only matched the trainable modules {sorted(extra)}; target other "
                         f"modules, or drop them from trainable")
    return chosen, extra


def _refresh_requires_grad(model: nn.Module, layers: dict[str, NLoRALinear]) -> None:
    """Freeze everything, then unfreeze the active adapters' trainable parameters and the trainable modules."""
    model.requires_grad_(False)
    params = [p for m in model.modules() if getattr(m, _TRAINABLE, False) for p in m.parameters()]
    params += [p for layer in layers.values() for name in layer.active_adapters
               for p in layer.adapters[name].trainable_parameters()]
    for p in params:
        p.requires_grad_(True)


def _refuse_modules(names: list[str], message: str, **fields) -> None:
    """Raise ``ValueError(message)`` if ``names`` (module names) is not empty: ``{names}`` in the message shows the
    first four of them, the other fields come from ``fields`` (filled in by ``str.format``)."""
    if names:
        raise ValueError(message.format(names=names[:4], **fields))


def _require_adapters(model: nn.Module) -> dict[str, NLoRALinear]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nlora adapters; call nlora.inject first")
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name present anywhere in the model, in insertion order."""
    return list(dict.fromkeys(n for layer in adapter_layers(model).values() for n in layer.adapters))


def _refuse_unknown(model: nn.Module, names: object, prefix: str = "", one: bool = False) -> None:
    """Refuse adapter names that the model does not hold, listing the ones it does: ``names`` by its sorted unknown
    entries (``None`` aside), or, ``one``, as one name quoted as given (a tuple, list or ``None`` is no adapter's
    name)."""
    known = adapter_names(model)
    unknown = ([] if names in known else [names]) if one else sorted(set(names) - set(known) - {None}, key=str)
    if unknown:
        raise ValueError(f"{prefix}no adapter named {names if one else unknown!r}; the model has {known}")


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapter(s) everywhere (the others stay but do not run) and trainable."""
    layers = _require_adapters(model)
    names = [names] if isinstance(names, str) else list(names)
    _refuse_unknown(model, names)
    for layer in layers.values():
        if set(layer.merged_adapters) - set(names):
            raise ValueError(f"{layer.module_name}: adapters {list(layer.merged_adapters)} are merged; unmerge "
                             f"before switching adapters")
    for layer in layers.values():
        layer.set_active(names)
    _refresh_requires_grad(model, layers)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; layers left with no adapter go back to their plain base module."""
    layers = _require_adapters(model)
    _refuse_unknown(model, name, one=True)
    holders = {n: layer for n, layer in layers.items() if name in layer.adapters}
    _refuse_modules([n for n, layer in holders.items() if name in layer.merged_adapters],
                    "adapter {name!r} is merged in {names}; call nlora.unmerge(model) before deleting it", name=name)
    for module_name, layer in holders.items():
        layer.remove(name)
        if not layer.adapters:
            _set_module(model, module_name, layer.base)
    _refresh_requires_grad(model, layers)


def pending_adapters(model: nn.Module) -> list[tuple[str, str]]:
    """``(module name, adapter name)`` of every adapter still waiting for ``initialize_adapters``."""
    return [(name, a) for name, layer in adapter_layers(model).items()
            for a, adapter in layer.adapters.items() if adapter.pending]


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold the active adapters into the base weights (delta in fp32, rounded once). ``safe=True`` checks every
    merged weight for NaN/Inf first and raises without changing anything."""
    layers = {n: layer for n, layer in _require_adapters(model).items() if layer.unmerged_active()}
    _refuse_modules([n for n, layer in layers.items() if layer.four_bit],
                    "{names}: 4-bit base weights are never written (merging would requantise them); use "
                    "nlora.merge_and_unload(model) for a dequantised merged model; nothing was merged")
    if not layers:
        warnings.warn("every active adapter is already merged; merge did nothing", stacklevel=2)
    if safe:
        _refuse_nonfinite_merge(layers.values())
    for layer in layers.values():
        layer.merge()
    return model


def _refuse_nonfinite_merge(layers: Iterable[NLoRALinear]) -> None:
    """Refuse (before anything is written) when merging a layer's active adapters would give NaN/Inf weights."""
    for layer in layers:
        if not sharded.all_ranks_true(bool(layer.weight_plus(layer.merge_terms()).isfinite().all()), layer.weight):
            raise ValueError(f"{layer.module_name}: merging would put NaN/Inf into the weight; nothing was merged "
                             f"(check the adapter's parameters)")


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights (exact in fp32 up to rounding)."""
    layers = [layer for layer in _require_adapters(model).values() if layer.merged_adapters]
    if not layers:
        warnings.warn("no adapter is merged; unmerge did nothing", stacklevel=2)
    for layer in layers:
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge the active adapters and replace every wrapper by its base module: a plain model, no nlora inside."""
    layers = _require_adapters(model)
    _refuse_modules(list(dict.fromkeys(n for n, _ in pending_adapters(model))),
                    "adapters of {names} were injected on the meta device and have no values yet; call "
                    "nlora.initialize_adapters(model) before merge_and_unload; nothing was changed")
    if safe:  # checked before a 4-bit base is dequantised
        _refuse_nonfinite_merge(layer for layer in layers.values() if layer.unmerged_active())
    for name, layer in layers.items():
        if layer.four_bit:  # a plain Linear of the dequantised weight (bf16, its dtype), merged like any other
            layer.dequantise()
        if terms := layer.merge_terms() + layer.given_back(layer.weight):  # as forward gives them back
            layer.add_to_weight(terms)
        _set_module(model, name, layer.base)
    _clear_trainable(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter and give back the original model: merges undone, init residuals added back."""
    for name, layer in _require_adapters(model).items():
        _set_module(model, name, layer.restore_base())
    _clear_trainable(model)
    return model


def _clear_trainable(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, _TRAINABLE):
            delattr(module, _TRAINABLE)


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes the original pretrained outputs (merged adapters and init residuals are
    undone on the fly); on exit the adapters are back."""
    before = {layer: layer.disabled for layer in _require_adapters(model).values()}
    for layer in before:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, disabled in before.items():  # nested blocks restore the outer state
            layer.disabled = disabled


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each tensor counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_summary(model: nn.Module) -> str:
    """A table of the adapted modules grouped by their last name part (q_proj, ...): count, shapes, ranks, inits and
    trainable parameters, then the model's trainable / total parameters."""
    groups: dict[str, list[NLoRALinear]] = {}
    for name, layer in adapter_layers(model).items():
        groups.setdefault(name.split(".")[-1], []).append(layer)
    rows = [("module", "count", "out x in", "rank", "adapter:init/train", "trainable")]
    for key, layers in groups.items():
        adapters = [(n, a) for layer in layers for n, a in layer.adapters.items()]
        rows.append((key, str(len(layers)), ",".join(sorted({f"{m.out_features}x{m.in_features}" for m in layers})),
                     ",".join(sorted({str(a.config.rank) for _, a in adapters}, key=int)),
                     ",".join(sorted({f"{n}:{a.config.init}/{a.config.train}" for n, a in adapters})),
                     f"{sum(p.numel() for m in layers for p in m.adapters.parameters() if p.requires_grad):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    extra = trainable_module_names(model)
    if extra:
        lines.append(f"fully trained modules: {', '.join(extra)}")
    trainable, total = count_parameters(model)
    return "\n".join(lines + [f"trainable params: {trainable:,} || all params: {total:,} || trainable%: "
                              f"{100 * trainable / max(total, 1):.4f}"])
