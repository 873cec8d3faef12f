"""HF PEFT LoRA files: export an nlora adapter that ``PeftModel.from_pretrained(original_base, path)`` loads, and
import a PEFT LoRA adapter as nlora ``lora`` adapters."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

import safetensors.torch

from .checkpoint import CONFIG_NAME, TENSOR_NAME, _Problems, _resolve, trainable_params, write_files
from .config import AdapterConfig
from .inits import Factors
from .layer import Adapter, dense_weight, is_adaptable, is_conv1d
from .model import (_TRAINABLE, _candidates, _pattern_value, adapter_layers, set_adapter, trainable_module_names,
                    unwrap, wrap_layer)

_PEFT_PREFIX = "base_model.model."  # PEFT's tensor names: this + the module name + ".lora_A.weight" and so on


def _patterns(values: dict[str, float], default: float, what: str) -> dict[str, float]:
    """A PEFT rank/alpha pattern that gives every module its value under PEFT's first-match-wins lookup (PEFT >= 0.14:
    the first key that ``_pattern_value`` would pick, else the entry of the exact name, else the default)."""
    pattern = {n: v for n, v in values.items() if v != default}
    for _ in range(len(values) + 1):  # keys: longest, then fewest wildcards, first
        ordered = {k: pattern[k] for k in sorted(pattern, key=lambda k: (-len(k), k.count(".")))}
        wrong = [n for n, v in values.items() if _pattern_value(n, ordered, ordered.get(n, default)) != v]
        if not wrong:
            return ordered
        pattern.update({n: values[n] for n in wrong})
    raise ValueError(f"module names {sorted(values)[:6]} cannot be given their own {what} under PEFT's pattern "
                     f"matching; rename the modules or use one {what} for all of them")


def _target_modules(model: nn.Module, targets: list[str]) -> list[str] | str:
    """PEFT ``target_modules``: the list of names when that matches exactly them, else a fullmatch regex."""
    hit = {n for n in _candidates(model) for t in targets if n == t or n.endswith("." + t)}
    return sorted(targets) if hit == set(targets) else "(" + "|".join(re.escape(t) for t in sorted(targets)) + ")"


def peft_factors(adapter: Adapter, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(A', B')`` with ``s B' A' = s (B N A - B0 N0 A0)``: the delta from the ORIGINAL weight (the second block only
    for inits that rewrote the base weight), ``N`` folded into ``B``."""
    blocks = [adapter.factors(weight)]  # (A, N, B)
    if adapter.config.preserve_output:
        blocks.append((adapter.init_A, adapter.init_N, -adapter.init_B))
    a = torch.cat([x.double() for x, _, _ in blocks], dim=0)
    b = torch.cat([y.double() if n is None else y.double() @ n.double() for _, n, y in blocks], dim=1)
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def _check_trainable(model: nn.Module, modules: list[str], adapted: list[str], saved: dict) -> None:
    """Refuse trainable modules that PEFT's ``modules_to_save`` cannot express: ones that hold adapted modules, ones
    whose name other modules also end with, and ones whose weights are tied to weights outside them."""
    clash = [m for m in modules for t in adapted if (t + ".").startswith(m + ".")]  # t is m or inside m
    if clash:
        raise ValueError(f"trainable modules {clash[:4]} are also (or contain) adapted modules; PEFT cannot express "
                         f"that: drop them from trainable, or export without them")
    names = list(_candidates(model))
    suffix = [m for m in modules if any(n.endswith(m) and not (n + ".").startswith(m + ".") for n in names)]
    if suffix:
        raise ValueError(f"trainable module {suffix[0]!r}: PEFT's modules_to_save matching (suffix) would also pick "
                         f"other modules; rename it or leave it out")
    ids = {id(p) for p in saved.values()}
    tied = sorted({n.replace(".base.", ".") for n, p in model.named_parameters(remove_duplicate=False)
                   if id(p) in ids and not any(n.startswith(m + ".") for m in modules)})
    if tied:
        raise ValueError(f"trainable modules {modules[:4]} share weights with {tied[:4]} (tied weights, e.g. an output "
                         f"head tied to the input embedding); PEFT's modules_to_save trains a copy of the named module "
                         f"only, which unties them: export with include_trainable=False and ship the tied weights "
                         f"separately (or untie them before training)")


def export_peft(model: nn.Module, path: str | os.PathLike, adapter: str | None = None, *,
                dtype: torch.dtype = torch.float32, base_model_name_or_path: str | None = None,
                include_trainable: bool = True) -> Path:
    """Write adapter ``adapter`` as a plain HF PEFT LoRA (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``PeftModel.from_pretrained(original_base_model, path)`` loads with the same outputs; returns the path.

    ``N`` is folded into ``B' = B N``. An adapter whose init rewrote the base weight (``preserve_output``, pissa) is
    exported relative to the ORIGINAL weights as the rank-2r LoRA ``A' = [A; A0]``, ``B' = [B N, -B0 N0]`` with r and
    alpha doubled. Per-module ranks and alphas go to ``rank_pattern``/``alpha_pattern``; Conv1D layers set
    ``fan_in_fan_out``; modules trained in full go to ``modules_to_save``. Tensors are written in ``dtype``.
    """
    name, layers = _resolve(model, adapter, "export")
    others = sorted({n for layer in adapter_layers(model).values() for n, a in layer.adapters.items()
                     if n != name and a.config.preserve_output})
    if others:
        raise ValueError(f"adapters {others} also rewrote base weights (preserve_output): a PEFT file of {name!r} "
                         f"alone cannot reproduce this model; delete_adapter them (or export from a model holding "
                         f"only {name!r})")
    tensors, ranks, alphas = {}, {}, {}
    for module_name, layer in layers.items():
        ad = layer.adapters[name]
        a, b = peft_factors(ad, layer.weight, dtype)
        ranks[module_name], alphas[module_name] = a.shape[0], ad.config.scaling * a.shape[0]  # PEFT: s = alpha / r
        tensors.update({f"{_PEFT_PREFIX}{module_name}.lora_A.weight": a,
                        f"{_PEFT_PREFIX}{module_name}.lora_B.weight": b})
    saved = trainable_params(model) if include_trainable else {}
    modules = trainable_module_names(model) if saved else []
    _check_trainable(model, modules, list(layers), saved)
    tensors.update({_PEFT_PREFIX + n: p.detach().to(dtype if p.is_floating_point() else p.dtype)
                    for n, p in saved.items()})
    # the most common rank and alpha; patterns for the rest
    r, alpha = (Counter(values.values()).most_common(1)[0][0] for values in (ranks, alphas))
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True, "revision": None, "r": r, "lora_alpha": alpha,
        "target_modules": _target_modules(model, list(layers)),
        "lora_dropout": Counter(layer.adapters[name].config.dropout for layer in layers.values()).most_common(1)[0][0],
        "fan_in_fan_out": all(is_conv1d(layer.base) for layer in layers.values()),
        "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": modules or None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": _patterns(ranks, r, "rank"), "alpha_pattern": _patterns(alphas, alpha, "alpha"),
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path",
                                                                      None),
    }
    return write_files(path, tensors, config, checksum=False)


# PEFT LoRA features nlora does not have: config key -> what to call it (each refused by name)
_PEFT_FEATURES = {"use_dora": "DoRA (use_dora)", "use_rslora": "rsLoRA (use_rslora)", "lora_bias": "LoRA bias "
                  "(lora_bias)", "use_qalora": "QALoRA (use_qalora)", "target_parameters": "parameter targets "
                  "(target_parameters)", "trainable_token_indices": "trainable tokens (trainable_token_indices)"}


def _read_peft(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """A PEFT adapter directory's config and tensors (``.safetensors``, or ``.bin`` read with ``weights_only``)."""
    file = path / CONFIG_NAME  # PEFT's file names are nlora's
    if not file.is_file():
        raise ValueError(f"{path} has no {CONFIG_NAME}: not a PEFT adapter directory")
    config = json.loads(file.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LoRA; nlora imports PEFT LoRA "
                         f"adapters only; nothing was changed")
    used = [name for key, name in _PEFT_FEATURES.items() if config.get(key)]
    used += [f"bias={config['bias']!r}"] if config.get("bias", "none") != "none" else []
    if used:
        raise ValueError(f"{path}: the PEFT adapter uses {', '.join(used)}, which nlora does not have; nothing was "
                         f"changed (retrain without it, or load it with peft)")
    if (path / TENSOR_NAME).is_file():
        return config, safetensors.torch.load_file(path / TENSOR_NAME)
    if (path / "adapter_model.bin").is_file():
        return config, torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{path} has no {TENSOR_NAME} or adapter_model.bin")


def _plan_peft(model: nn.Module, config: dict, tensors: dict[str, Tensor], adapter: str,
               problems: _Problems) -> dict[str, tuple[nn.Module, AdapterConfig, Factors]]:
    """Every adapted module of the file, checked against the model: ``{name: (module, config, factors)}``; LoRA
    tensors of other layer types are problems."""
    modules, plans = _candidates(model), {}
    names = sorted(k[len(_PEFT_PREFIX):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    alphas = config.get("alpha_pattern") or {}
    for name in names:
        module = modules.get(name)
        a, b = tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"], tensors.get(f"{_PEFT_PREFIX}{name}.lora_B.weight")
        if module is None or not is_adaptable(unwrap(module)):
            problems.add("not a Linear / Conv1D of the model", name, "an adapter for another architecture? import "
                         "it into the model it was trained on")
            continue
        w = dense_weight(unwrap(module))  # a 4-bit weight's real (out, in)
        out_f, in_f = w.shape
        if b is None or a.shape[1:] != (in_f,) or tuple(b.shape) != (out_f, a.shape[0]):
            problems.add("lora_A/lora_B shapes do not fit the layer", f"{name} ({out_f} x {in_f})", "an adapter for "
                         "another architecture (or size)? import it into the model it was trained on")
        elif adapter in getattr(module, "adapters", {}):
            problems.add("already holds an adapter of that name", name, "pass adapter='<new name>'")
        else:
            alpha = _pattern_value(name, alphas, alphas.get(name, config.get("lora_alpha", 8)))  # as _patterns
            adapter_config = AdapterConfig.build(rank=a.shape[0], alpha=float(alpha), init="lora",
                                                 dropout=float(config.get("lora_dropout") or 0.0))
            plans[name] = (module, adapter_config, Factors(a.to(w.device), None, b.to(w.device)))
    if not names:
        problems.add("no lora_A / lora_B tensors", "adapter_model", "pass a PEFT LoRA adapter directory")
    # e.g. lora_embedding_A/B: a LoRA on an Embedding, which nlora does not adapt
    problems.add_each("LoRA tensors of a layer type nlora does not adapt",
                      [k for k in tensors if ".lora_" in k and not k.endswith((".lora_A.weight", ".lora_B.weight"))],
                      "retrain without it, or load it with peft")
    return plans


def import_peft(model: nn.Module, path: str | os.PathLike, adapter: str = "default") -> nn.Module:
    """Load the PEFT LoRA adapter directory ``path`` (``adapter_config.json`` plus ``adapter_model.safetensors``, or
    ``adapter_model.bin`` read with ``weights_only=True``) into ``model`` as nlora ``lora`` adapters named
    ``adapter`` (no N; ``s = lora_alpha / r`` per module, ``alpha_pattern`` and ``lora_dropout`` honoured) and make
    it active; returns ``model``. The adapted modules are the ones the file holds factors for (whatever
    ``target_modules`` / ``rank_pattern`` said), so the outputs equal PEFT's; ``modules_to_save`` become nlora's
    trainable modules with their saved weights. DoRA, rsLoRA, biases and non-LoRA types are refused by name.
    All-or-nothing: every module is checked first, and a problem leaves the model unchanged.
    """
    path = Path(path)
    config, tensors = _read_peft(path)
    problems = _Problems()
    plans = _plan_peft(model, config, tensors, adapter, problems)
    # factors on a meta layer would be lost to to_empty
    problems.add_each("layer on the meta device", [n for n, (_, _, factors) in plans.items() if factors.A.is_meta],
                      "materialise the model (to_empty) and load its weights before import_peft")
    saved = {k[len(_PEFT_PREFIX):]: t for k, t in tensors.items() if ".lora_" not in k}
    params = dict(model.named_parameters(remove_duplicate=False))
    # (a layer wrapped by nlora is refused here too: its weight is named .base.weight)
    problems.add_each("modules_to_save weight missing from the model, of another shape, or in a layer nlora adapts",
                      [n for n, t in saved.items() if n not in params or params[n].shape != t.shape],
                      "import it into the model it was trained on, without nlora adapters there")
    problems.raise_if_any(adapter, path, model, verb="import")
    for name, (module, adapter_config, factors) in plans.items():
        wrap_layer(model, name, module).add(adapter, Adapter(adapter_config, factors))
    with torch.no_grad():
        for name, t in saved.items():
            params[name].copy_(t)
    for name, module in _candidates(model).items() if saved else ():
        if any(name.endswith(k) for k in config.get("modules_to_save") or []):  # PEFT's rule for modules_to_save
            setattr(module, _TRAINABLE, True)
    set_adapter(model, adapter)
    return model
