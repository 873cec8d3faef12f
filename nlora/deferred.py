"""Deferred initialisation for models built on the ``meta`` device (the FSDP2 / torchtune recipe).

``inject`` into a meta model creates *pending* adapters (shapes only, any init). After ``model.to_empty(device=...)``
and loading the pretrained base weights, ``initialize_adapters`` computes every pending adapter's factors from the
real weights exactly as ``inject`` would have (same seed, same per-module generator), also when the model is
FSDP2-sharded: then only the ``r`` rows and columns a Nyström init needs travel between ranks.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

from . import sharded
from .factors import compute_factors, module_generator
from .model import adapter_layers, pending_adapters


def initialize_adapters(model: nn.Module) -> list[tuple[str, str]]:
    """Give every pending (meta-injected) adapter its initial values from the now-loaded base weights.

    Call it after ``model.to_empty(device=...)``, after loading the base weights, and after ``fully_shard`` if you
    shard. Inits that preserve the output subtract their initial delta from the base weight here. All factors are
    computed before anything is written, so an error leaves the model as it was. Returns the pairs it initialised.
    """
    layers, pending = adapter_layers(model), pending_adapters(model)
    plans = []
    for name, adapter_name in pending:  # compute everything first; nothing is modified
        layer = layers[name]
        adapter = layer.adapters[adapter_name]
        on_meta = [n for n, t in [("base weight", layer.weight), *adapter.named_parameters()] if sharded.is_meta(t)]
        if on_meta:
            raise ValueError(f"{name}: {', '.join(on_meta)} still on the meta device; call model.to_empty(device=...) "
                             f"and load the base weights before initialize_adapters")
        generator = module_generator(adapter.config.seed, name, sharded.local_view(layer.weight).device)
        factors = compute_factors({name: layer.weight}, {name: adapter.config}, {name: generator})[name]
        plans.append((layer, adapter, factors))
    for layer, adapter, factors in plans:
        adapter.fill(factors)
        layer.settle(adapter)
    return pending


def remap_base_keys(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A pretrained checkpoint's keys renamed for the injected model: ``<module>.weight`` of an adapted module becomes
    ``<module>.base.weight`` (same for the bias and buffers); every other key is kept. Load the result with
    ``strict=False`` (the adapter parameters are not in it) and check that the missing keys are adapter ones."""
    moved = {f"{name}.{key}": f"{name}.base.{key}" for name, layer in adapter_layers(model).items()
             for key, _ in [*layer.base.named_parameters(recurse=False), *layer.base.named_buffers(recurse=False)]}
    return {moved.get(k, k): v for k, v in state_dict.items()}
