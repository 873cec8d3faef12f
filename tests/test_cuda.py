"""The same guarantees on a CUDA device (skipped without one): inits, fused forward, precision policy, merge."""

import pytest
import torch
from torch import nn

import nlora
from nlora import NLoRALinear, get_init

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _linear(dtype, out_f=96, in_f=64):
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_faithful_nystrom_slices_on_cuda_equal_the_cpu_ones(dtype):
    w = torch.randn(96, 64).to(dtype)
    cpu = get_init("nystrom").fn(w, 16, scaling=1.0)
    gpu = get_init("nystrom").fn(w.cuda(), 16, scaling=1.0)
    for a, b in ((cpu.A, gpu.A), (cpu.N, gpu.N), (cpu.B, gpu.B)):
        assert b.device.type == "cuda" and torch.equal(a, b.cpu())


@pytest.mark.parametrize("init", ["nystrom", "slora", "nystrom-optimal", "pissa"])
def test_fused_forward_on_cuda_matches_float64(init):
    layer = NLoRALinear(_linear(torch.float32), rank=8, alpha=16, init=init)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(4, 32, 64, device="cuda", requires_grad=True)
    y = layer(x)
    a = layer.adapters["default"]
    w = layer.base.weight.double() + a.delta_weight().double()
    ref = x.double() @ w.T + layer.base.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3)  # tf32 may be on for matmuls
    y.sum().backward()
    assert a.lora_A.grad is not None and torch.isfinite(a.lora_A.grad).all()


def test_bf16_model_keeps_fp32_masters_and_bf16_compute_on_cuda():
    layer = NLoRALinear(_linear(torch.bfloat16), rank=8, init="nystrom")
    x = torch.randn(2, 16, 64, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    y.float().square().mean().backward()
    assert layer.lora_N.grad.dtype == torch.float32
    ref = NLoRALinear(_linear(torch.bfloat16), rank=8, init="nystrom", compute_dtype=torch.float32)
    torch.testing.assert_close(ref(x).float(), y.float(), rtol=5e-2, atol=5e-2)


def test_merge_unmerge_and_disable_on_cuda():
    model = nn.Sequential(_linear(torch.float32), nn.GELU(), _linear(torch.float32, 32, 96))
    x = torch.randn(8, 64, device="cuda")
    y0 = model(x)
    nlora.inject(model, ["0", "2"], rank=8, init="nystrom-pinv")
    torch.testing.assert_close(model(x), y0, rtol=1e-4, atol=1e-4)  # preserve_output by default
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.1)
    y = model(x)
    nlora.merge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)
    with nlora.disable_adapter(model):
        torch.testing.assert_close(model(x), y0, rtol=1e-4, atol=1e-4)
    nlora.unmerge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)


def test_seeded_random_inits_are_reproducible_on_cuda():
    a, b = (nlora.inject(nn.Sequential(_linear(torch.float32)), ["0"], rank=8, init="slora", seed=3) for _ in range(2))
    assert torch.equal(a[0].lora_A, b[0].lora_A) and torch.equal(a[0].lora_N, b[0].lora_N)


@pytest.mark.parametrize("train", ["all", "middle"])
def test_a_training_step_captured_in_a_cuda_graph_replays_like_eager_steps(train):
    """A whole step (forward, backward, capturable fused AdamW) of a bf16 model with fp32 masters captures in a CUDA
    graph (no host sync, no allocation outside the graph pool); each replay moves the adapters as an eager step does."""

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64)).to("cuda", torch.bfloat16)
        nlora.inject(model, "all-linear", rank=8, init="nystrom", train=train, seed=0)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, params, torch.optim.AdamW(params, lr=1e-2, fused=True, capturable=True)

    x = torch.randn(4, 16, 64, device="cuda", dtype=torch.bfloat16)

    def make_step(model, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            model(x).float().pow(2).mean().backward()
            opt.step()
        return step

    eager, eager_params, eager_opt = build()
    eager_step = make_step(eager, eager_opt)
    for _ in range(6):
        eager_step()
    model, params, opt = build()
    step = make_step(model, opt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # three eager warm-up steps, as the CUDA-graph docs prescribe
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # captured, not run
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert all(p.dtype == torch.float32 for p in params) and len(params) == len(eager_params)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-4)
    moved = [float((p - p0).abs().max()) for p, p0 in zip(params, build()[1])]
    assert min(moved) > 0  # the replays trained every trainable factor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ct_w_of_a_low_precision_weight_multiplies_in_its_dtype_with_fp32_accuracy(dtype):
    """The optimal core's ``Cᵀ W``: C holds W's own columns (exact in W's dtype), so the bf16/fp16 GEMM with fp32
    accumulation gives the fp32 product to fp32 rounding, without an fp32 copy of W."""
    from nlora.nystrom import _ct_w

    w = torch.randn(300, 200, device="cuda").to(dtype)
    c = w[:, torch.randperm(200, device="cuda")[:16]].float()
    want = c.double().mT @ w.double()
    got = _ct_w(c, w)
    assert got.dtype == torch.float32
    assert float((got.double() - want).norm() / want.norm()) < 1e-6
