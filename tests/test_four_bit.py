"""4-bit bases (QLoRA-style): torchao NF4 and bitsandbytes Linear4bit, each where it imports (skipped otherwise).

Every test runs the same model twice: with 4-bit weights, and with plain bf16 weights equal to their dequantised
values. The inits must give bit-identical factors, the forward and the adapters' gradients must agree, output
preservation must hold without writing the 4-bit weight, in-place merge is refused, and merge_and_unload gives plain
dequantised Linears."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import nlora
from nlora.layer import dense_weight, is_4bit

from .model_zoo import one_thread  # noqa: F401 (autouse fixture)

BACKENDS = ["torchao-nf4", "bnb-nf4"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(256, 512)
        self.down = nn.Linear(512, 256, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def quantised(backend: str, seed: int = 0) -> nn.Module:
    """Net in bf16 with both weights in 4 bits."""
    torch.manual_seed(seed)
    model = Net().to(torch.bfloat16).requires_grad_(False)
    for name in ("up", "down"):
        lin = getattr(model, name)
        if backend == "torchao-nf4":
            nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
            lin.weight = nn.Parameter(nf4.to_nf4(lin.weight.detach()), requires_grad=False)
        else:
            bnb = pytest.importorskip("bitsandbytes")
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=torch.bfloat16, quant_type="nf4").to(torch.bfloat16)
            new.load_state_dict(lin.state_dict())  # quantised from bf16 when moved to the device
            setattr(model, name, new.to("cpu").requires_grad_(False))
    return model


def values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as plain values (4-bit ones dequantised) and every other tensor of the state dict."""
    out = {f"{n}.dense": dense_weight(m).clone() for n, m in model.named_modules() if is_4bit(m)}
    return out | {k: v.clone() for k, v in model.state_dict().items() if type(v) in (torch.Tensor, nn.Parameter)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def dequantised(model: nn.Module) -> nn.Module:
    """The same network with plain bf16 Linears holding the dequantised weights."""
    plain = Net().to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        for name in ("up", "down"):
            q, p = getattr(model, name), getattr(plain, name)
            p.weight.copy_(dense_weight(q).to(torch.bfloat16))
            if p.bias is not None:
                p.bias.copy_(q.bias)
    return plain


INJECT = {
    "nlora": dict(init="nystrom"),
    "nlora-preserve": dict(init="nystrom", preserve_output=True),
    "pinv": dict(init="nystrom-pinv"),
    "optimal-inttune": dict(init="nystrom-optimal", train="middle"),
    "inttune": dict(init="nystrom", train="middle"),
    "pissa": dict(init="pissa"),
    "lora": dict(init="lora", seed=3),
}


def both(backend: str, kwargs: dict) -> tuple[nn.Module, nn.Module]:
    q = quantised(backend)
    d = dequantised(q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (q, d):
            nlora.inject(m, ["up", "down"], rank=8, **kwargs)
    return q, d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(INJECT))
def test_inits_on_a_4bit_base_equal_those_of_its_dequantised_weight(backend, case):
    q, d = both(backend, INJECT[case])
    for name in ("up", "down"):
        lq, ld = getattr(q, name), getattr(d, name)
        assert is_4bit(lq.base) and lq.four_bit and not ld.four_bit
        for attr in ("lora_A", "lora_N", "lora_B"):
            a, b = getattr(lq, attr), getattr(ld, attr)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (name, attr)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["nlora-preserve", "inttune", "pissa", "lora"])
def test_forward_and_adapter_gradients_match_the_dequantised_model(backend, case):
    q, d = both(backend, INJECT[case])
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():  # trained-looking factors: every delta is non-zero
        for m in (q, d):
            g = torch.Generator().manual_seed(2)
            for p in [p for _, p in sorted(m.named_parameters()) if p.requires_grad]:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    outs = []
    for m in (q, d):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.float().square().mean().backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        outs.append((y.float(), xi.grad.float(), grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=2e-2, atol=2e-3)
    for n, g in outs[0][2].items():
        torch.testing.assert_close(g.float(), outs[1][2][n].float(), rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_preserve_output_keeps_the_output_without_writing_the_4bit_weight(backend):
    q = quantised(backend)
    before = {n: dense_weight(getattr(q, n)).clone() for n in ("up", "down")}
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        y0 = q(x).float()
        nlora.inject(q, ["up", "down"], rank=8, init="nystrom-pinv")  # preserve_output by default
        torch.testing.assert_close(q(x).float(), y0, rtol=2e-2, atol=2e-2)
        with nlora.disable_adapter(q):
            assert torch.equal(q(x).float(), y0)
    for n, w in before.items():  # the 4-bit weights are untouched
        assert is_4bit(getattr(q, n).base) and torch.equal(dense_weight(getattr(q, n).base), w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_is_refused_and_merge_and_unload_gives_plain_dequantised_linears(backend):
    q, _ = both(backend, INJECT["nlora-preserve"])
    with torch.no_grad():
        q.up.adapters["default"].lora_N.mul_(1.5)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        want = q(x).float()
    before = values(q)
    with pytest.raises(ValueError, match=r"4-bit base weights are never written .*merge_and_unload"):
        nlora.merge(q)
    with pytest.raises(ValueError, match=r"^up: the base weight is 4-bit \(\w+\), which nlora never writes .*"
                                         r"merge_and_unload"):
        q.up.merge()  # the layer-level call refuses too
    assert same(values(q), before)
    plain = nlora.merge_and_unload(q)
    for name in ("up", "down"):
        lin = getattr(plain, name)
        assert type(lin) is nn.Linear and type(lin.weight) is nn.Parameter and lin.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(plain(x).float(), want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_and_route_on_a_4bit_base(backend, tmp_path):
    q, _ = both(backend, INJECT["inttune"])
    with torch.no_grad():
        q.up.adapters["default"].lora_N.mul_(2.0)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    nlora.save_adapter(q, tmp_path / "a")
    fresh = nlora.load_adapter(quantised(backend), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
        nlora.inject(fresh, ["up", "down"], rank=4, init="nystrom", preserve_output=True, adapter="other")
        with nlora.route(fresh, ["default", None, "other"]):
            routed = fresh(x)
        nlora.set_adapter(fresh, "other")
        torch.testing.assert_close(routed[2], fresh(x[2:]).squeeze(0), rtol=2e-2, atol=2e-2)
        with nlora.disable_adapter(fresh):
            torch.testing.assert_close(routed[1], fresh(x[1:2]).squeeze(0), rtol=2e-2, atol=2e-2)


def test_other_torchao_weight_subclasses_are_refused_by_name():
    quant = pytest.importorskip("torchao.quantization")
    model = Net().to(torch.bfloat16)
    try:
        quant.quantize_(model, quant.Int8WeightOnlyConfig())
    except Exception as err:  # noqa: BLE001 - this torchao build cannot quantise on CPU
        pytest.skip(f"torchao int8 on CPU: {err}")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"^up: the weight is a \w+ \(a quantised or wrapped tensor\)"):
        nlora.inject(model, ["up", "down"], rank=4)
    assert all(type(m) is nn.Linear for m in (model.up, model.down)) and model.state_dict().keys() == before.keys()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_above_the_real_min_out_in_is_refused_with_the_real_shape(backend):
    """bitsandbytes stores the 4-bit weight packed as (n, 1) uint8: the check reads the real (out, in)."""
    q = quantised(backend)
    before = values(q)
    with pytest.raises(ValueError, match=r"^up: rank=300 is larger than min\(out, in\) = 256 of this \(512, 256\) "
                                         r"layer; lower it or use rank_pattern$"):
        nlora.inject(q, ["up", "down"], rank=300)
    assert same(values(q), before) and type(q.up) is not nlora.NLoRALinear


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_peft_lora_imports_onto_a_4bit_base(backend, tmp_path):
    q, d = both(backend, INJECT["lora"])
    with torch.no_grad():
        d.up.adapters["default"].lora_B.normal_(0, 0.05)
    nlora.export_peft(d, tmp_path / "peft")
    fresh = nlora.import_peft(quantised(backend), tmp_path / "peft")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).float(), d(x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_safe_merge_and_unload_leaves_the_4bit_model_as_it_was(backend):
    q, _ = both(backend, INJECT["nlora"])
    with torch.no_grad():
        q.down.adapters["default"].lora_N[0, 0] = float("inf")
    before = values(q)
    with pytest.raises(ValueError, match=r"^down: merging would put NaN/Inf into the weight; nothing was merged"):
        nlora.merge_and_unload(q, safe=True)
    assert q.up.four_bit and q.down.four_bit and is_4bit(q.up.base) and same(values(q), before)
