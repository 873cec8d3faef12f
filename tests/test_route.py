"""nlora.route (nlora/route.py): each batch row through its own adapter. Routed outputs equal per-row runs under
``set_adapter`` (``None`` rows: ``disable_adapter``) for every init on the battery's models, ``generate()`` with a KV
cache included; the shared-A/B fast path equals the per-adapter fallback; K compact IntTune adapters cost K r² numbers
per layer. The refusals are rows of tests/test_bad_input.py."""

from __future__ import annotations

import warnings

import pytest
import torch

import nlora
from nlora.layer import Adapter

from .model_zoo import MODELS, one_thread  # noqa: F401 (autouse fixture)

# (adapter name, inject keyword arguments); the preserving inits come first: they rewrite the base weight, and
# adapters that read A and B from it take their slices after that
ADAPTERS = [
    ("pissa", dict(init="pissa", rank=3)),
    ("pinv", dict(init="nystrom-pinv", rank=2)),
    ("optimal", dict(init="nystrom-optimal", rank=3, train="middle")),
    ("lora", dict(init="lora", rank=2)),
    ("gaussian", dict(init="gaussian", rank=3)),
    ("slora", dict(init="slora", rank=4)),
    ("nlora", dict(init="nystrom", rank=3)),
    ("tenant1", dict(init="nystrom", rank=4, train="middle")),
    ("tenant2", dict(init="nystrom", rank=4, train="middle", alpha=2.0)),
    ("tenant3", dict(init="nystrom", rank=2, train="middle")),  # another rank: its own group
]


def many_adapters(spec, adapters=ADAPTERS, seed=0):
    model = spec.model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the faithful init's "moves the outputs" warning
        for name, kwargs in adapters:
            nlora.inject(model, spec.targets, adapter=name, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking factors, so that every adapter's delta differs
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def batch_of(spec, rows: int, seed: int = 3) -> dict:
    inputs = {}
    for i in range(rows):  # the zoo's inputs have 2 or 3 rows: stack enough of them
        one = spec.inputs(torch.Generator().manual_seed(seed + i))
        for k, v in one.items():
            inputs.setdefault(k, []).append(v[:1])
    return {k: torch.cat(v) for k, v in inputs.items()}


def per_row(spec, model, inputs: dict, names, run=None) -> torch.Tensor:
    """Each row alone through ``run(model, row)`` (default ``spec.run``), under set_adapter(name) or, for None,
    disable_adapter."""
    run = run or spec.run
    outs = []
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        if name is None:
            with nlora.disable_adapter(model):
                outs.append(run(model, row))
        else:
            nlora.set_adapter(model, name)
            outs.append(run(model, row))
    return torch.cat(outs)


NAMES = ["tenant1", None, "pissa", "tenant2", "pinv", "optimal", "lora", "tenant1", "gaussian", "slora", "nlora",
         "tenant3", None, "tenant2"]


@pytest.mark.parametrize("model_name", list(MODELS))
@torch.no_grad()
def test_routed_rows_equal_per_row_runs_for_every_init(model_name):
    spec = MODELS[model_name]
    model = many_adapters(spec)
    inputs = batch_of(spec, len(NAMES))
    with nlora.route(model, NAMES):
        routed = spec.run(model, inputs)
    want = per_row(spec, model, inputs, NAMES)
    torch.testing.assert_close(routed, want, rtol=1e-5, atol=1e-5)
    assert all(layer.routing is None for layer in nlora.adapter_layers(model).values())  # gone after the block
    with nlora.disable_adapter(model):  # None rows: exactly the original model
        base = spec.run(model, inputs)
    none = [i for i, n in enumerate(NAMES) if n is None]
    torch.testing.assert_close(routed[none], base[none], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@torch.no_grad()
def test_routed_generate_with_a_kv_cache_equals_per_row_generate(model_name):
    spec = MODELS[model_name]
    model = many_adapters(spec)
    names = ["tenant1", None, "tenant2", "pissa", "slora", "tenant3"]
    inputs = {"input_ids": batch_of(spec, len(names))["input_ids"]}

    def generate(m, batch):
        return m.generate(batch["input_ids"], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=2)

    with nlora.route(model, names):
        routed = generate(model, inputs)
    assert torch.equal(routed, per_row(spec, model, inputs, names, generate))


@torch.no_grad()
def test_shared_a_b_fast_path_equals_the_per_adapter_fallback():
    """IntTune adapters on the paper's init read the same A and B from W: they run as one batched product, which
    must equal running each adapter on its own rows (forced here by giving each adapter its own copy of A and B)."""
    spec = MODELS["llama"]
    tenants = [(f"t{k}", dict(init="nystrom", rank=4, train="middle", alpha=1.0 + k)) for k in range(5)]
    model = many_adapters(spec, tenants)
    names = ["t3", "t0", None, "t4", "t1", "t1", "t2", None]
    inputs = batch_of(spec, len(names))
    q = model.model.layers[0].self_attn.q_proj
    with nlora.route(model, names):
        route = q.routing
        assert route.shared is not None and route.shared[1].shape == (6, 4, 4) and not route.groups
        fast = spec.run(model, inputs)
    for layer in nlora.adapter_layers(model).values():
        for adapter in layer.adapters.values():
            adapter.own_factors(layer.weight)
    with nlora.route(model, names):
        assert q.routing.shared is None and len(q.routing.groups) == 5
        fallback = spec.run(model, inputs)
    torch.testing.assert_close(fast, fallback, rtol=1e-5, atol=1e-5)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages among ``tensors``."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def adapter_storage(model) -> int:
    """Every tensor the model's adapters hold (parameters, buffers, the recorded base-weight samples)."""
    tensors = []
    for m in model.modules():
        if isinstance(m, Adapter):
            tensors += list(m.parameters()) + list(m.buffers()) + [getattr(m, "base_sample", None)]
    return storage_bytes(tensors)


def test_k_compact_inttune_adapters_cost_k_r_squared_numbers_per_layer(tmp_path):
    spec = MODELS["bert"]
    trained = many_adapters(spec, [("task", dict(init="nystrom", rank=4, train="middle"))])
    nlora.save_adapter(trained, tmp_path / "task", compact=True)
    model = spec.model()
    sizes = []
    for k in range(12):
        nlora.load_adapter(model, tmp_path / "task", adapter=f"tenant{k}")
        sizes.append(adapter_storage(model))
    layers = len(nlora.adapter_layers(model))
    per_adapter = {b - a for a, b in zip(sizes[1:], sizes[2:])}
    assert per_adapter == {layers * 4 * 4 * 4}  # r² fp32 numbers per layer, nothing else (no A, B, index or sample)
    for adapter in (m for m in model.modules() if isinstance(m, Adapter)):
        assert adapter.reads_base and adapter.lora_A is None and adapter.lora_B is None


@torch.no_grad()
def test_a_nested_route_and_a_merge_inside_a_route_are_refused():
    spec = MODELS["mlp"]
    model = many_adapters(spec, ADAPTERS[-3:])
    x = spec.inputs(torch.Generator().manual_seed(0))["x"]
    names = ["tenant1", None, "tenant3"]
    with nlora.route(model, names):
        with pytest.raises(RuntimeError, match=r"cannot route while adapters are merged, disabled \(disable_adapter\) "
                                               r"or already routed"):
            with nlora.route(model, names):
                pass
        nlora.set_adapter(model, "tenant1")
        nlora.merge(model)
        with pytest.raises(RuntimeError, match=r"^layers\.0\.fc: routing needs every adapter unmerged and enabled"):
            model(x)
        nlora.unmerge(model)
        torch.testing.assert_close(model(x), model(x))  # routed again once unmerged
    assert all(layer.routing is None for layer in nlora.adapter_layers(model).values())
