"""Deferred initialisation for models built on the ``meta`` device (the FSDP2 / torchtune recipe).

``inject`` into a meta model creates *pending* adapters (shapes only, any init, data-driven ones too). After
``model.to_empty(device=...)`` and loading the pretrained base weights, ``initialize_adapters`` computes every
pending adapter's factors from the real weights, exactly as ``inject`` would have on the loaded model (same
seed, same per-module generator), also when the model is FSDP2-sharded: then only the ``r`` rows and columns
a Nyström init needs travel between ranks and each rank writes its own shard of the factors.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from . import sharded
from .layer import build_factors, weight_view
from .model import _generator, adapter_layers


def pending_adapters(model: nn.Module) -> list[tuple[str, str]]:
    """``(module name, adapter name)`` of every adapter still waiting for ``initialize_adapters``."""
    return [(name, a) for name, layer in adapter_layers(model).items()
            for a, module in layer.adapters.items() if module.pending_init]


def initialize_adapters(model: nn.Module) -> list[tuple[str, str]]:
    """Give every pending (meta-injected) adapter its initial values from the now-loaded base weights.

    Call it after ``model.to_empty(device=...)`` and after loading the base weights (and after ``fully_shard``
    if you shard). Inits that preserve the output subtract their initial delta from the base weight here.
    All factors are computed before anything is written, so an error leaves the model as it was.
    Returns the ``(module name, adapter name)`` pairs it initialised (empty if none was pending).
    """
    todo = [(name, layer, a) for name, layer in adapter_layers(model).items() for a in layer.adapters
            if layer.adapters[a].pending_init]
    plans = []
    for name, layer, adapter_name in todo:  # phase 1: check and compute; nothing is modified
        adapter = layer.adapters[adapter_name]
        w = weight_view(layer.base)
        on_meta = [n for n, t in [("base weight", w), *adapter.named_parameters()] if sharded.is_meta(t)]
        if on_meta:
            raise ValueError(f"{name}: {', '.join(on_meta)} still on the meta device; call "
                             f"model.to_empty(device=...) and load the base weights before initialize_adapters")
        factors, _ = build_factors(layer.base, adapter.rank, adapter.alpha, adapter.init, train=adapter.train_mode,
                                   adapter=adapter_name, name=name, existing=(),
                                   generator=_generator(adapter.init_seed, name, sharded.local_view(w).device),
                                   **adapter.options)
        plans.append((name, layer, adapter_name, factors))
    for name, layer, adapter_name, factors in plans:  # phase 2: write
        adapter = layer.adapters[adapter_name]
        with torch.no_grad():
            for pname, value in (("lora_A", factors.A), ("lora_N", factors.N), ("lora_B", factors.B)):
                param = getattr(adapter, pname)
                if param is not None:
                    sharded.local_view(param).copy_(sharded.local_part(value.to(param.dtype), param))
        adapter.keep_initial(factors)
        adapter.pending_init = False
        if adapter.preserve_output:
            layer._add_to_weight(-layer._delta(adapter, initial=True))
    return [(name, adapter_name) for name, _, adapter_name, _ in plans]


def remap_base_keys(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A pretrained checkpoint's keys renamed for the injected model: ``<module>.weight`` of an adapted module
    becomes ``<module>.base.weight`` (same for ``bias``); every other key is kept. Load the result with
    ``strict=False`` (the adapter parameters are not in it) and check the missing keys are adapter ones."""
    moved = {}
    for name, layer in adapter_layers(model).items():
        for pname, _ in layer.base.named_parameters(recurse=False):
            moved[f"{name}.{pname}"] = f"{name}.base.{pname}"
        for bname, _ in layer.base.named_buffers(recurse=False):
            moved[f"{name}.{bname}"] = f"{name}.base.{bname}"
    return {moved.get(k, k): v for k, v in state_dict.items()}
