"""Deferred initialisation (nlora/deferred.py): inject into a model built on the ``meta`` device (adapters pending),
``to_empty``, load the base weights through ``remap_base_keys``, ``initialize_adapters``; the result must be
bit-identical to injecting into the loaded model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nlora


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16), nn.GELU(), nn.Linear(16, 5))


INITS = [("nystrom", {}), ("nystrom", {"index": "random"}), ("nystrom", {"train": "middle"}),
         ("nystrom", {"preserve_output": True, "train": "middle"}), ("nystrom-pinv", {"index": "norm"}),
         ("nystrom-optimal", {}), ("pissa", {"svd": "lowrank"}), ("slora", {}), ("lora", {}), ("gaussian", {})]


def meta_injected(init, kwargs) -> nn.Module:
    with torch.device("meta"):
        model = build()
    nlora.inject(model, ["0", "2"], rank=4, init=init, seed=7, **kwargs)
    return model


def loaded(model: nn.Module, pretrained: dict) -> nn.Module:
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(nlora.remap_base_keys(model, pretrained), strict=False)
    assert not unexpected and all(".adapters." in k for k in missing)
    return model


@pytest.mark.parametrize("init,kwargs", INITS, ids=[f"{i}-{'-'.join(map(str, k.values()))}" for i, k in INITS])
def test_meta_inject_then_initialize_equals_inject(init, kwargs):
    ref = build()
    pretrained = {k: v.clone() for k, v in ref.state_dict().items()}
    nlora.inject(ref, ["0", "2"], rank=4, init=init, seed=7, **kwargs)
    model = meta_injected(init, kwargs)
    assert nlora.pending_adapters(model) == [("0", "default"), ("2", "default")]
    assert all(p.is_meta for p in model.parameters())
    loaded(model, pretrained)
    assert nlora.initialize_adapters(model) == [("0", "default"), ("2", "default")]
    assert nlora.pending_adapters(model) == [] and nlora.initialize_adapters(model) == []
    assert model.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():  # factors and (for output-preserving inits) the residual base weights
        assert torch.equal(model.state_dict()[k], v), k
    for (k, v), (k2, v2) in zip(ref.named_buffers(), model.named_buffers(), strict=True):  # rows/cols, init_A/N/B
        assert k == k2 and torch.equal(v, v2), k
    for layer, ref_layer in zip(nlora.adapter_layers(model).values(), nlora.adapter_layers(ref).values()):
        ad, ref_ad = layer.adapters["default"], ref_layer.adapters["default"]
        assert ad.reads_base == ref_ad.reads_base and torch.equal(ad.base_sample, ref_ad.base_sample)
        for t, r in zip(ad.factors(layer.weight), ref_ad.factors(ref_layer.weight)):
            assert (t is None and r is None) or torch.equal(t, r)
    x = torch.randn(5, 24)
    assert torch.equal(model(x), ref(x))
    with nlora.disable_adapter(model), nlora.disable_adapter(ref):
        torch.testing.assert_close(model(x), ref(x))
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in ref.parameters()]


def test_pending_adapter_refuses_to_run_or_merge():
    model = meta_injected("nystrom-pinv", {})
    model.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="initialize_adapters"):
        model(torch.randn(2, 24))
    with pytest.raises(RuntimeError, match="initialize_adapters"):
        nlora.merge(model)
    with nlora.disable_adapter(model), pytest.raises(RuntimeError, match="initialize_adapters"):
        model(torch.randn(2, 24))


def test_initialize_before_materialising_is_refused():
    model = meta_injected("slora", {})
    with pytest.raises(ValueError, match=r"0: base weight, .*to_empty"):
        nlora.initialize_adapters(model)
    assert len(nlora.pending_adapters(model)) == 2


def test_initialize_with_bad_weights_changes_nothing():
    model = loaded(meta_injected("nystrom", {"preserve_output": True}), build().state_dict())
    with torch.no_grad():
        model[2].base.weight[3, 1] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="2: weight has NaN"):
        nlora.initialize_adapters(model)
    for k, v in model.state_dict().items():  # the first layer's residual was not written either
        assert torch.equal(v.view(torch.int32), before[k].view(torch.int32)), k  # bitwise, NaN included
    assert len(nlora.pending_adapters(model)) == 2


def test_remap_base_keys_only_moves_adapted_modules():
    model = build()
    sd = model.state_dict()
    nlora.inject(model, ["2"], rank=4, init="lora")
    remapped = nlora.remap_base_keys(model, sd)
    assert set(remapped) == {"0.weight", "0.bias", "2.base.weight", "2.base.bias", "4.weight", "4.bias"}
    assert remapped["2.base.weight"] is sd["2.weight"]
    buffered = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4))  # buffers of other modules are kept as they are
    keys = buffered.state_dict()
    nlora.inject(buffered, ["1"], rank=2, init="lora")
    assert set(nlora.remap_base_keys(buffered, keys)) == {k for k in keys if k.startswith("0.")} | {
        "1.base.weight", "1.base.bias"}
