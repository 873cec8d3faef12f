"""The same guarantees on a CUDA device (every test skipped without one): inits equal to the CPU's, the forward and
its gradients against float64, the precision policy (fp32 masters, bf16 compute, fp32 grads), IntTune reading A and
B from the base weight, merge/unmerge/disable, and a whole training step captured in a CUDA graph."""

import pytest
import torch
from torch import nn

import nlora
from nlora import NLoRALinear, get_init
from nlora.inits import INITIALIZERS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _linear(dtype, out_f=96, in_f=64):
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f).to("cuda", dtype)


def _reference(layer: NLoRALinear, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight.double() + layer.delta_weight().double()
    return x.double() @ w.T + layer.base.bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_faithful_nystrom_slices_on_cuda_equal_the_cpu_ones(dtype):
    w = torch.randn(96, 64).to(dtype)
    cpu = get_init("nystrom").fn(w, 16, scaling=1.0)
    gpu = get_init("nystrom").fn(w.cuda(), 16, scaling=1.0)
    for a, b in ((cpu.A, gpu.A), (cpu.N, gpu.N), (cpu.B, gpu.B)):
        assert b.device.type == "cuda" and torch.equal(a, b.cpu())


@pytest.mark.parametrize("name", ["nystrom-pinv", "nystrom-optimal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_inits_on_cuda_match_the_cpu(name, dtype):
    """Host synchronisation of the r x r work: tests/test_nystrom.py (torch's eigh checks its status on the host)."""
    spec = INITIALIZERS[name]
    g = torch.Generator().manual_seed(4)
    ws = [(torch.randn(o, k, generator=g) @ torch.randn(k, i, generator=g)).to(dtype)
          for o, i, k in ((40, 30, 30), (30, 40, 3), (40, 30, 0), (25, 25, 25), (40, 30, 6))]
    ranks, scalings = [8, 8, 5, 8, 8], [2.0, 2.0, 1.0, 0.5, 2.0]
    opts = {"rcond": 1e-3} if name == "nystrom-optimal" else {}  # rank-deficient slices: compare at a real cutoff
    got = spec.many([w.cuda() for w in ws], ranks, scalings=scalings, generators=[None] * len(ws), **opts)
    for w, k, s, f in zip(ws, ranks, scalings, got):
        want = spec.fn(w, k, scaling=s, **opts)
        assert torch.equal(f.A.cpu(), want.A) and torch.equal(f.B.cpu(), want.B) and torch.isfinite(f.N).all()

        def delta(fac):  # what the core is for: C and R cancel its rounding along their null directions
            return s * (fac.B.double().cpu() @ fac.N.double().cpu() @ fac.A.double().cpu())

        assert float((delta(f) - delta(want)).norm()) <= 1e-3 * (float(w.double().norm()) + 1e-30)


@pytest.mark.parametrize("init", ["nystrom", "slora", "nystrom-optimal", "pissa"])
def test_forward_and_gradients_on_cuda_match_float64(init):
    layer = NLoRALinear(_linear(torch.float32), rank=8, alpha=16, init=init)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.normal_(0, 0.2)
    ad = layer.adapters["default"]
    x = torch.randn(4, 32, 64, device="cuda", requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y.double(), _reference(layer, x.detach()), rtol=2e-3, atol=2e-3)  # tf32 may be on
    g = torch.randn_like(y)
    y.backward(g)
    xd, a, n, b = (t.detach().double().requires_grad_(True) for t in (x, ad.lora_A, ad.lora_N, ad.lora_B))
    yd = xd @ layer.weight.double().T + ad.scaling * ((xd @ a.T) @ n.T) @ b.T
    yd.backward(g.double())
    for got, want in ((x.grad, xd.grad), (ad.lora_A.grad, a.grad), (ad.lora_N.grad, n.grad), (ad.lora_B.grad, b.grad)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=3e-3, atol=3e-3 * float(want.abs().max()))


@pytest.mark.parametrize("train", ["all", "middle"])
def test_bf16_model_keeps_fp32_masters_bf16_compute_fp32_grads_on_cuda(train):
    layer = NLoRALinear(_linear(torch.bfloat16), rank=8, init="nystrom", train=train)
    with torch.no_grad():
        layer.lora_N.normal_(std=0.3)
    x = torch.randn(4, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_N.dtype == torch.float32
    y.float().pow(2).mean().backward()
    params = layer.adapters["default"].trainable_parameters()
    assert params and all(p.dtype == p.grad.dtype == torch.float32 for p in params)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _reference(layer, x.detach()), rtol=3e-2, atol=3e-2)
    ref = NLoRALinear(_linear(torch.bfloat16), rank=8, init="nystrom", compute_dtype=torch.float32, train=train)
    with torch.no_grad():
        ref.lora_N.copy_(layer.lora_N)
    torch.testing.assert_close(ref(x).float(), y.float(), rtol=5e-2, atol=5e-2)


def test_fp32_masters_get_fp32_accumulated_gradients_on_cuda():
    """bf16 compute, fp32 masters: the factors' gradient products come out of the GEMM in fp32 (out_dtype), not
    rounded to bf16 first, and match the float64 gradient closely."""
    layer = NLoRALinear(_linear(torch.bfloat16), rank=8, init="nystrom")
    x = torch.randn(4, 32, 64, device="cuda", dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    grad = layer.adapters["default"].lora_N.grad
    assert grad.dtype == torch.float32 and not torch.equal(grad, grad.bfloat16().float())
    a, n, b = (t.detach().double() for t in (layer.lora_A, layer.lora_N, layer.lora_B))
    xd = x.double().reshape(-1, 64)
    want = (torch.ones(xd.shape[0], 96, dtype=torch.float64, device="cuda") @ b).T @ (xd @ a.T)
    torch.testing.assert_close(grad.double(), want, rtol=2e-2, atol=1e-2)


def test_import_peft_puts_the_factors_on_the_layer_device(tmp_path):
    model = nn.Sequential(_linear(torch.float32))
    nlora.inject(model, ["0"], rank=4, init="slora", seed=0)
    with torch.no_grad():
        model[0].lora_B.normal_()
    x = torch.randn(3, 64, device="cuda")
    want = model(x)
    nlora.export_peft(model, tmp_path / "peft")
    fresh = nlora.import_peft(nn.Sequential(_linear(torch.float32)), tmp_path / "peft")
    assert fresh[0].lora_A.device.type == "cuda"
    torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)


def test_inttune_on_cuda_reads_a_and_b_as_views_of_the_base_weight():
    layer = NLoRALinear(_linear(torch.bfloat16), rank=8, init="nystrom", train="middle")
    w = layer.base.weight
    assert layer.adapters["default"].lora_A is None and layer.lora_A._base is w and layer.lora_B._base is w
    assert layer.lora_A.data_ptr() == w.data_ptr() and layer.lora_B.data_ptr() == w.data_ptr()


def test_merge_unmerge_and_disable_on_cuda():
    model = nn.Sequential(_linear(torch.float32), nn.GELU(), _linear(torch.float32, 32, 96))
    x = torch.randn(8, 64, device="cuda")
    y0 = model(x).detach()
    nlora.inject(model, ["0", "2"], rank=8, init="nystrom-pinv")
    torch.testing.assert_close(model(x), y0, rtol=1e-4, atol=1e-4)  # preserve_output by default
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.1)
    y = model(x).detach()
    nlora.merge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)
    with nlora.disable_adapter(model):
        torch.testing.assert_close(model(x), y0, rtol=1e-4, atol=1e-4)
    nlora.unmerge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)


def test_seeded_random_inits_are_reproducible_on_cuda():
    a, b = (nlora.inject(nn.Sequential(_linear(torch.float32)), ["0"], rank=8, init="slora", seed=3) for _ in range(2))
    assert a[0].lora_A.is_cuda and torch.equal(a[0].lora_A, b[0].lora_A) and torch.equal(a[0].lora_N, b[0].lora_N)


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
    assert len(params) == (6 if train == "all" else 2)  # IntTune on the paper's init: only N exists
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-4)
    moved = [float((p - p0).abs().max()) for p, p0 in zip(params, build()[1])]
    assert min(moved) > 0  # the replays trained every trainable factor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ct_w_of_a_low_precision_weight_multiplies_in_its_dtype_with_fp32_accuracy(dtype):
    """The optimal core's ``Cᵀ W``: C holds W's own columns (exact in W's dtype), so the bf16/fp16 GEMM with fp32
    accumulation (aten::mm.dtype, torch >= 2.8) gives the fp32 product to fp32 rounding, without an fp32 copy of W."""
    from nlora.nystrom import _ct_w, mm_out_dtype_works

    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    assert mm_out_dtype_works(torch.device("cuda"), dtype) == ((major, minor) >= (2, 8))
    w = torch.randn(300, 200, device="cuda").to(dtype)
    c = w[:, torch.randperm(200, device="cuda")[:16]].float()
    want = c.double().mT @ w.double()
    got = _ct_w(c, w)
    assert got.dtype == torch.float32
    assert float((got.double() - want).norm() / want.norm()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_route_on_cuda_matches_per_row_runs(dtype):
    """nlora.route on the GPU (IntTune adapters sharing A/B through the batched path, a LoRA on its own rows, None
    rows) against each row alone; the bf16 case against an fp32 run of the same rows."""
    from .model_zoo import MODELS
    from .test_route import many_adapters, per_row

    spec = MODELS["llama"]
    adapters = [("t0", dict(init="nystrom", rank=4, train="middle")), ("t1", dict(init="nystrom", rank=4,
                train="middle")), ("lora", dict(init="lora", rank=4))]
    model = many_adapters(spec, adapters).to("cuda", dtype)
    names = ["t1", None, "t0", "lora", "t1", None]
    ids = torch.randint(3, 64, (len(names), 6), generator=torch.Generator().manual_seed(0)).cuda()
    with nlora.route(model, names):
        assert model.model.layers[0].self_attn.q_proj.routing.shared is not None
        routed = spec.run(model, {"input_ids": ids})
    want = per_row(spec, model, {"input_ids": ids}, names)
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(routed.float(), want.float(), rtol=tol, atol=tol)
