"""The fused adapter forward (base output updated in place by addmm_) against a float64 reference of
``base(x) + sum s B N A x``, values and gradients, for the shapes and dtypes that take either path."""

import pytest
import torch
from torch import nn

import nlora
from nlora.layer import NLoRALinear


def _reference(layer: NLoRALinear, x: torch.Tensor) -> torch.Tensor:
    w = layer.base.weight.double()
    y = x.double() @ w.T + (layer.base.bias.double() if layer.base.bias is not None else 0)
    for name in layer.active_adapters:
        a = layer.adapters[name]
        y = y + a.scaling * ((x.double() @ a.lora_A.double().T) @ a.lora_N.double().T) @ a.lora_B.double().T
    return y


def _layer(dtype, alpha, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(24, 40, bias=True).to(dtype)
    layer = NLoRALinear(base, rank=6, alpha=alpha, init="slora")
    with torch.no_grad():  # B = 0 at init would hide B's contribution
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24), (2, 3, 4, 24)])
@pytest.mark.parametrize("alpha", [None, 3.0])
def test_fused_matches_float64_reference_and_grads(shape, alpha):
    layer = _layer(torch.float32, alpha)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    ref = _reference(layer, x.detach())
    assert y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    grads = [x.grad, layer.lora_A.grad, layer.lora_N.grad, layer.lora_B.grad]
    xd = x.detach().double().requires_grad_(True)
    params = [p.detach().double().requires_grad_(True) for p in (layer.lora_A, layer.lora_N, layer.lora_B)]
    a, n, b = params
    s = layer.scaling
    yd = xd @ layer.base.weight.double().T + layer.base.bias.double() + s * ((xd @ a.T) @ n.T) @ b.T
    yd.backward(g.double())
    for got, want in zip(grads, [xd.grad, *(p.grad for p in params)]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_fused_path_equals_unfused_path_bf16():
    """A non-contiguous input takes the plain path; it must give the same bf16 result as the fused one."""
    layer = _layer(torch.bfloat16, None)
    x = torch.randn(6, 24, 5, dtype=torch.bfloat16).transpose(1, 2)  # (6, 5, 24), not contiguous
    fused = layer(x.contiguous())
    plain = layer(x)
    ref = _reference(layer, x.float())
    assert fused.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fused.double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused, plain, rtol=1e-2, atol=1e-2)


def test_two_active_adapters_and_fp32_compute_on_bf16_base():
    model = nn.Sequential(nn.Linear(24, 40).to(torch.bfloat16))
    nlora.inject(model, ["0"], rank=4, init="slora", seed=1, adapter="a")
    nlora.inject(model, ["0"], rank=3, init="slora", seed=2, adapter="b", compute_dtype=torch.float32)
    layer = model[0]
    for ad in layer.adapters.values():
        with torch.no_grad():
            ad.lora_B.normal_()
    nlora.set_adapter(model, ["a", "b"])
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    ref = _reference(layer, x.float())
    torch.testing.assert_close(model(x).double(), ref, rtol=3e-2, atol=3e-2)


def test_fused_forward_leaves_input_and_base_weight_alone():
    layer = _layer(torch.float32, None)
    x = torch.randn(3, 4, 24)
    x0, w0 = x.clone(), layer.base.weight.detach().clone()
    layer(x)
    assert torch.equal(x, x0) and torch.equal(layer.base.weight, w0)


def test_inference_mode_and_no_grad():
    layer = _layer(torch.float32, 2.0)
    x = torch.randn(2, 3, 24)
    ref = _reference(layer, x)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_torch_compile_traces_one_graph_and_matches_eager():
    """Under torch.compile the forward must trace without graph breaks and give the eager result."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24))
    nlora.inject(model, "all-linear", rank=4, init="nystrom", seed=0)
    x = torch.randn(3, 5, 24)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    torch._dynamo.reset()
