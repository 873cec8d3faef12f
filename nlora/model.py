"""Module-tree operations: pick targets by name, inject adapters, switch, disable, merge and unload them."""

from __future__ import annotations

import difflib
import re
import warnings
import zlib
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from . import sharded
from .config import AdapterConfig
from .inits import Factors, get_init
from .layer import Adapter, NLoRALinear, is_adaptable, meta_factors, weight_view

Targets = str | Sequence[str]
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_TRAINABLE = "_nlora_trainable"  # marks a module trained in full (inject's ``trainable``)
MOVED_A_LOT = 0.2  # median ||s B N A|| / ||W|| above which inject warns that the init changes the model's outputs


def adapter_layers(model: nn.Module) -> dict[str, NLoRALinear]:
    """Every ``NLoRALinear`` in the model by its (original) module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NLoRALinear)}


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """All named modules except the model itself and what sits inside an ``NLoRALinear``."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, NLoRALinear):
            inside.append(name)
        found[name] = module
    return found


def _matches(name: str, pattern: Targets) -> bool:
    """PEFT's rule: a string is a regex that must fullmatch; a list entry matches ``name`` or ``*.entry``."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def output_head_names(model: nn.Module) -> set[str]:
    """The output head that ``"all-linear"`` leaves alone: ``model.get_output_embeddings()`` (HF models) and any
    module named ``lm_head``."""
    heads = {name for name, _ in model.named_modules() if name.split(".")[-1] == "lm_head"}
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return heads | {name for name, m in model.named_modules() if head is not None and m is head}


def _pattern_value(name: str, patterns: dict | None, default):
    """PEFT's rank_pattern/alpha_pattern: the first key whose regex fullmatches the name or a ``.``-suffix of it."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


def _targetable(module: nn.Module) -> bool:
    return is_adaptable(module) or isinstance(module, NLoRALinear)


def _unmatched(names: list[str], entries: Sequence[str], what: str, model: nn.Module) -> None:
    """Raise if an entry of a list matches no module name, suggesting close names."""
    missing = [e for e in entries if not any(_matches(n, [e]) for n in names)]
    if missing:
        parts = sorted({p for n in names for p in (n, n.split(".")[-1])})
        hints = {m: difflib.get_close_matches(m, parts, n=3) for m in missing}
        said = "; ".join(f"{m!r}" + (f" (did you mean {', '.join(map(repr, h))}?)" if h else "")
                         for m, h in hints.items())
        raise ValueError(f"{what} entries match no module of {type(model).__name__}: {said}; nothing was changed")


def _matching(model: nn.Module, candidates: dict[str, nn.Module], targets: Targets) -> dict[str, nn.Module]:
    """The candidates that ``targets`` names (``"all-linear"``, a regex, or a list whose every entry must match)."""
    if targets == "all-linear":
        heads = output_head_names(model)
        return {n: m for n, m in candidates.items() if _targetable(m) and n not in heads}
    if not isinstance(targets, str):
        if isinstance(targets, (bytes, dict)) or not targets or not all(isinstance(t, str) for t in targets):
            raise TypeError(f"targets must be a regex string, 'all-linear' or a non-empty list of names, got {targets!r}")
        _unmatched(list(candidates), list(targets), f"targets={list(targets)!r}:", model)
    return {n: m for n, m in candidates.items() if _matches(n, targets)}


def _kept(name: str, exclude: Targets | None, layers: Sequence[int] | int | None) -> bool:
    """Whether ``exclude`` leaves the module in and ``layers`` (block indices) includes it."""
    if exclude is not None and _matches(name, exclude):
        return False
    hit = _LAYER_INDEX.search(name)
    return layers is None or (hit is not None and int(hit.group(1)) in ({layers} if isinstance(layers, int) else layers))


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


def _generator(seed: int | None, name: str, device: torch.device) -> torch.Generator | None:
    """A per-module generator (seed mixed with the module name): a layer's draws do not depend on how many layers,
    ranks or processes there are."""
    if seed is None or device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def check_layer(base: nn.Module, config: AdapterConfig, label: str) -> Tensor:
    """The ``(out, in)`` weight of ``base`` after checking that ``config`` fits it (raises, changes nothing)."""
    w = weight_view(base)
    if not w.is_floating_point() or w.dtype.itemsize < 2:
        raise TypeError(f"{label}: weight dtype {w.dtype} is not a 16/32/64-bit float (quantised, fp8 or integer "
                        f"weights are not supported); dequantise the model first")
    out_features, in_features = w.shape
    if config.rank > min(out_features, in_features):
        raise ValueError(f"{label}: rank={config.rank} is larger than min(out, in) = {min(out_features, in_features)} "
                         f"of this ({out_features}, {in_features}) layer; lower it or use rank_pattern")
    return w


def _all_true(flags: list[Tensor]) -> list[bool]:
    """Host values of many 0-d bool tensors with one device-to-host copy (not one synchronisation per tensor)."""
    return torch.stack([f.to(flags[0].device) for f in flags]).tolist() if flags else []


def _max_abs(t: Tensor) -> Tensor:
    """``max |t|`` in one pass; NaN and Inf propagate."""
    return torch.linalg.vector_norm(t, float("inf"))


def _refuse_nonfinite(weights: dict[str, Tensor], init: str) -> None:
    plain = {n: w for n, w in weights.items() if not sharded.is_dtensor(w)}
    ok = dict(zip(plain, _all_true([_max_abs(w).isfinite() for w in plain.values()])))
    for name, w in weights.items():
        if not ok.get(name, True) or (name not in plain and not sharded.all_ranks_true(
                bool(_max_abs(w.to_local()).isfinite()), w)):
            raise ValueError(f"{name}: weight has NaN/Inf, so the data-driven init {init!r} cannot use it; fix the "
                             f"checkpoint or pick a random init (lora/slora)")


def _refuse_overflow(factors: dict[str, Factors], dtype: torch.dtype, init: str) -> None:
    """Data-driven factors must be finite in the adapter dtype (an ill-conditioned core can overflow fp16)."""
    flags = [torch.stack([_max_abs(t) for t in (f.A, f.N, f.B) if t is not None]).max().to(dtype).isfinite()
             for f in factors.values()]
    for name, ok in zip(factors, _all_true(flags)):
        if not ok:
            raise ValueError(f"{name}: init {init!r} gives factors that are not finite in {dtype} (an ill-conditioned "
                             f"Nyström core overflows); nothing was changed. Use adapter_dtype=torch.float32, "
                             f"init='nystrom-optimal', or a larger rcond")


def _initialise(weights: dict[str, Tensor], configs: dict[str, AdapterConfig],
                generators: dict[str, torch.Generator | None]) -> dict[str, Factors]:
    """The init's factors of real (not meta) weights, through its batched form where it has one."""
    if not weights:
        return {}
    spec, options = get_init(configs[next(iter(weights))].init), configs[next(iter(weights))].options
    names = list(weights)
    ranks, scalings = [configs[n].rank for n in names], [configs[n].scaling for n in names]
    gens = [generators[n] for n in names]
    made = (spec.many([weights[n] for n in names], ranks, scalings=scalings, generators=gens, **options)
            if spec.many is not None else
            [spec.fn(weights[n], k, scaling=s, generator=g, **options) for n, k, s, g in zip(names, ranks, scalings, gens)])
    out = dict(zip(names, made))
    for n in (n for n in names if sharded.is_dtensor(weights[n]) and generators[n] is None):
        out[n] = Factors(*(None if t is None else sharded.broadcast(t, weights[n]) for t in vars(out[n]).values()))
    return out  # unseeded draws on sharded weights may differ by rank: rank 0's were taken


def compute_factors(weights: dict[str, Tensor], configs: dict[str, AdapterConfig],
                    generators: dict[str, torch.Generator | None]) -> dict[str, Factors]:
    """Every layer's initial factors (all configs share one init and its options); meta weights get meta factors.
    Refuses non-finite weights (data-driven inits) and factors that overflow the adapter dtype; changes nothing."""
    config = next(iter(configs.values()))
    data_driven = get_init(config.init).data_driven
    real = {n: w for n, w in weights.items() if not sharded.is_meta(w)}
    if data_driven:
        _refuse_nonfinite(real, config.init)
    out = {n: meta_factors(w.shape, configs[n]) for n, w in weights.items() if n not in real}
    made = _initialise(real, configs, generators)
    if data_driven:
        _refuse_overflow(made, config.adapter_dtype, config.init)
    return {**out, **made}


def build_adapter(base: nn.Module, config: AdapterConfig, label: str,
                  generator: torch.Generator | None = None) -> Adapter:
    """The ``Adapter`` for one layer (checked and initialised; ``base`` is not changed)."""
    w = check_layer(base, config, label)
    generator = generator if generator is not None else _generator(config.seed, label, w.device)
    return Adapter(config, compute_factors({label: w}, {label: config}, {label: generator})[label])


def _warn_if_moved(factors: dict[str, Factors], weights: dict[str, Tensor], configs: dict[str, AdapterConfig]) -> None:
    """Warn once when an init that keeps the base weight moves the layers a lot: the median ||s B N A|| / ||W|| over
    the layers is above ``MOVED_A_LOT``. For iid entries of std σ it is about r·σ², which the message reports too."""
    ratios, rule = [], []
    names = list(factors)
    for name in names[:: max(1, len(names) // 16)]:  # a spread sample of at most ~16 layers is enough for a median
        f = factors[name]
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
    weights = {n: check_layer(getattr(m, "base", m), configs[n], n) for n, m in chosen.items()}
    taken = [n for n, m in chosen.items() if isinstance(m, NLoRALinear) and adapter in m.adapters]
    if taken:
        raise ValueError(f"{taken[0]}: already has an adapter named {adapter!r}; pass adapter='<new name>' to add "
                         f"another, or delete_adapter first")
    generators = {n: _generator(config.seed, n, sharded.local_view(w).device) for n, w in weights.items()}
    factors = compute_factors(weights, configs, generators)
    if not config.preserve_output and get_init(config.init).data_driven:
        _warn_if_moved(factors, weights, configs)
    for name, module in chosen.items():  # apply: nothing below can fail
        wrap_layer(model, name, module).add(adapter, Adapter(configs[name], factors[name]))
    for module in extra.values():
        setattr(module, _TRAINABLE, True)
    set_adapter(model, adapter)
    return model


def _layer_config(config: AdapterConfig, name: str, rank: int, alpha: float | None) -> AdapterConfig:
    """``config`` with one module's rank and alpha (from the patterns); an error names the module."""
    try:
        return config.replace(rank=rank, alpha=alpha)
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
    merged = [n for n, layer in adapter_layers(model).items() if layer.merged_adapters]
    if merged:
        raise ValueError(f"adapters are merged in {merged[:4]}; call nlora.unmerge(model) before injecting")
    chosen = select_targets(model, targets, exclude, layers)
    extra = _trainable_modules(model, trainable)
    chosen = {n: m for n, m in chosen.items() if not any(n == e or n.startswith(e + ".") for e in extra)}
    if not chosen:
        raise ValueError(f"targets={targets!r} only matched the trainable modules {sorted(extra)}; target other "
                         f"modules, or drop them from trainable")
    return chosen, extra


def _trainable_modules(model: nn.Module, trainable: Sequence[str] | None) -> dict[str, nn.Module]:
    if not trainable:
        return {}
    if isinstance(trainable, str):
        raise TypeError(f"trainable={trainable!r} must be a list of module names, e.g. [{trainable!r}]")
    candidates = _candidates(model)
    _unmatched(list(candidates), list(trainable), f"trainable={list(trainable)!r}:", model)
    return {n: m for n, m in candidates.items() if _matches(n, list(trainable))}


def _refresh_requires_grad(model: nn.Module, layers: dict[str, NLoRALinear]) -> None:
    """Freeze everything, then unfreeze the active adapters' trainable parameters and the trainable modules."""
    model.requires_grad_(False)
    for module in model.modules():
        if getattr(module, _TRAINABLE, False):
            module.requires_grad_(True)
    for layer in layers.values():
        for name in layer.active_adapters:
            for p in layer.adapters[name].trainable_parameters():
                p.requires_grad_(True)


def _require_adapters(model: nn.Module) -> dict[str, NLoRALinear]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nlora adapters; call nlora.inject first")
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name present anywhere in the model, in insertion order."""
    return list(dict.fromkeys(n for layer in adapter_layers(model).values() for n in layer.adapters))


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapter(s) everywhere (the others stay but do not run) and trainable."""
    layers = _require_adapters(model)
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"no adapter named {unknown}; the model has {known}")
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
    holders = {n: layer for n, layer in layers.items() if name in layer.adapters}
    if not holders:
        raise ValueError(f"no adapter named {name!r}; the model has {adapter_names(model)}")
    merged = [n for n, layer in holders.items() if name in layer.merged_adapters]
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
    layers = {n: layer for n, layer in _require_adapters(model).items() if layer.unmerged_active()}
    if not layers:
        warnings.warn("every active adapter is already merged; merge did nothing", stacklevel=2)
        return model
    for layer in layers.values() if safe else ():
        if not sharded.all_ranks_true(bool(layer.weight_plus(layer.merge_terms()).isfinite().all()), layer.weight):
            raise ValueError(f"{layer.module_name}: merging would put NaN/Inf into the weight; nothing was merged "
                             f"(check the adapter's parameters)")
    for layer in layers.values():
        layer.merge()
    return model


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
    if any(layer.unmerged_active() for layer in layers.values()):
        merge(model, safe=safe)
    for name, layer in layers.items():
        back = [a.term(None, layer.weight, initial=True) for n, a in layer.adapters.items()
                if a.config.preserve_output and n not in layer.active_adapters]  # as forward gives them back
        if back:
            layer.add_to_weight(back)
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
    """A table of the adapted modules grouped by their last name part (q_proj, ...): count, shapes, ranks, inits and
    trainable parameters, then the model's trainable / total parameters."""
    groups: dict[str, list] = {}
    for name, layer in adapter_layers(model).items():
        g = groups.setdefault(name.split(".")[-1], [0, set(), set(), set(), 0])
        g[0] += 1
        g[1].add(f"{layer.out_features}x{layer.in_features}")
        g[2].update(str(a.config.rank) for a in layer.adapters.values())
        g[3].update(f"{n}:{a.config.init}/{a.config.train}" for n, a in layer.adapters.items())
        g[4] += sum(p.numel() for p in layer.adapters.parameters() if p.requires_grad)
    rows = [("module", "count", "out x in", "rank", "adapter:init/train", "trainable")] + [
        (k, str(n), ",".join(sorted(sh)), ",".join(sorted(rk, key=int)), ",".join(sorted(it)), f"{tr:,}")
        for k, (n, sh, rk, it, tr) in groups.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    extra = [n for n, m in model.named_modules() if getattr(m, _TRAINABLE, False)]
    if extra:
        lines.append(f"fully trained modules: {', '.join(extra)}")
    trainable, total = count_parameters(model)
    return "\n".join(lines + [f"trainable params: {trainable:,} || all params: {total:,} || trainable%: "
                              f"{100 * trainable / max(total, 1):.4f}"])
