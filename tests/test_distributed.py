"""DDP and FSDP2 training of injected models (NLoRA, SLoRA, IntTune) against a single-process run.

Two processes (``torch.multiprocessing.spawn``, rendezvous on a free port of 127.0.0.1) run every scenario once;
rank 0 writes the results to a file that the tests below compare with single-process runs on the same global
batch. A training scenario that raises is recorded with its traceback and fails its own test only.
Backend: gloo on CPU by default; ``NLORA_DIST_BACKEND=nccl`` runs the same code with NCCL on two GPUs.

Tolerance: fp32 everywhere. Per-step losses agree to 2e-6 absolute (measured on CPU/gloo: <= 4.8e-7) and
adapter weights after 3 AdamW steps to rtol=1e-4, atol=1e-5 (measured: <= 5e-6 absolute, 7.2e-5 of the
largest entry; Adam's normalisation magnifies the last-bit differences of tiny gradients). The only sources of
difference are the order of floating-point sums in the gradient reduction and the per-rank batch split.
Factors computed from sharded weights by Nyström slicing are bit-identical to the unsharded ones.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch

import nlora
from nlora import sharded

transformers = pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

BACKEND = os.environ.get("NLORA_DIST_BACKEND", "gloo")
WORLD = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, STEPS, LR, SEED = 4, 3, 1e-2, 0
VARIANTS = {  # the paper's three methods, and an output-preserving exact Nyström init
    "nlora": dict(init="nystrom"),
    "slora": dict(init="slora"),
    "inttune": dict(init="nystrom", train="middle"),
    "nlora-pinv": dict(init="nystrom-pinv", index="norm"),
}
SCENARIOS = {"ddp": ["nlora", "slora", "inttune"], "fsdp": ["nlora", "slora", "inttune"],
             "fsdp_meta": ["nlora", "nlora-pinv", "slora", "inttune"], "fsdp_then_inject": ["nlora-pinv", "slora"]}
FACTOR_INITS = {  # inject into an already sharded model: factors must equal the unsharded ones
    "nystrom": dict(init="nystrom"),
    "nystrom-random": dict(init="nystrom", index="random"),
    "nystrom-pinv-norm": dict(init="nystrom-pinv", index="norm"),
    "nystrom-optimal": dict(init="nystrom-optimal", index="random"),
    "pissa": dict(init="pissa"),
    "slora": dict(init="slora"),
    "lora": dict(init="lora"),
}
RTOL, ATOL, LOSS_ATOL = 1e-4, 1e-5, 2e-6
TIMEOUT_S = int(os.environ.get("NLORA_DIST_TIMEOUT", "120"))


def build_model() -> torch.nn.Module:
    """A tiny Llama (2 blocks, hidden 32), the same on every rank and in the reference."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(1234)
    return transformers.LlamaForCausalLM(config)


def build_gpt2() -> torch.nn.Module:
    """A tiny GPT-2: its Conv1D weights are stored (in, out), so a row-sharded weight is column-sharded in nlora's
    (out, in) view."""
    torch.manual_seed(1234)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=32))


def global_batch(device) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, 64, (2 * WORLD, 12), generator=g).to(device)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter parameter, whole (gathered from shards), on the CPU."""
    return {k: sharded.full(v.detach()).cpu() for k, v in model.named_parameters() if ".adapters." in k}


def train(model: torch.nn.Module, batch: torch.Tensor, world: int) -> list[float]:
    """``STEPS`` AdamW steps on ``batch`` (this rank's part of the global batch); the global mean loss per step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
        losses.append(value.item() / world)
    return losses


def reference(variant: str, device="cpu") -> tuple[list[float], dict, torch.nn.Module]:
    """The single-process run on the whole global batch."""
    model = build_model().to(device)
    nlora.inject(model, TARGETS, rank=RANK, seed=SEED, **VARIANTS[variant])
    losses = train(model, global_batch(device), 1)
    return losses, adapter_state(model), model


# -- the recipes (what the README's "Scaling out" section shows) -------------------------------------------------
def ddp_model(variant, device):
    model = build_model().to(device)
    nlora.inject(model, TARGETS, rank=RANK, seed=SEED, **VARIANTS[variant])
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def fsdp_model(variant, device, mesh):
    model = build_model().to(device)
    nlora.inject(model, TARGETS, rank=RANK, seed=SEED, **VARIANTS[variant])
    for block in model.model.layers:  # per-block wrapping: frozen base and trainable adapters share a group
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_meta_model(variant, device, mesh):
    """Build on meta, inject (adapters stay pending), shard, materialise, load the checkpoint, then initialise."""
    pretrained = build_model().state_dict()  # stands for the checkpoint on disk
    with torch.device("meta"):
        model = build_model()
    nlora.inject(model, TARGETS, rank=RANK, seed=SEED, **VARIANTS[variant])
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)  # HF non-persistent buffers
    set_model_state_dict(model, nlora.remap_base_keys(model, pretrained),
                         options=StateDictOptions(full_state_dict=True, strict=False))
    nlora.initialize_adapters(model)
    return model


def fsdp_then_inject_model(variant, device, mesh):
    """Inject into a model that is already FSDP2-sharded, then shard the new adapters."""
    model = build_model().to(device)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    nlora.inject(model, TARGETS, rank=RANK, seed=SEED, **VARIANTS[variant])
    for layer in nlora.model.adapter_layers(model).values():
        for adapter in layer.adapters.values():
            fully_shard(adapter, mesh=mesh, reshard_after_forward=False)  # the layer uses A, N, B after the call
    return model


# -- the worker ------------------------------------------------------------------------------------------------
def run_scenario(kind: str, variant: str, device, mesh, batch) -> dict:
    """Build the model of one recipe, train it; for FSDP NLoRA also merge and unmerge on the DTensor weights."""
    if kind == "ddp":
        model = ddp_model(variant, device)
    elif kind == "fsdp":
        model = fsdp_model(variant, device, mesh)
    elif kind == "fsdp_meta":
        model = fsdp_meta_model(variant, device, mesh)
    else:
        model = fsdp_then_inject_model(variant, device, mesh)
    losses = train(model, batch, WORLD)
    entry = {"losses": losses, "adapters": adapter_state(model.module if kind == "ddp" else model)}
    if kind == "fsdp" and variant == "nlora":  # merge / unmerge on DTensor weights
        x = global_batch(device)
        before = model(input_ids=x).logits.detach()
        nlora.merge(model, safe=True)
        merged = model(input_ids=x).logits.detach()
        entry["merged_weights"] = {k: sharded.full(v.detach()).cpu() for k, v in
                                   model.named_parameters() if k.endswith("base.weight")}
        nlora.unmerge(model)
        after = model(input_ids=x).logits.detach()
        entry.update(before=before.cpu(), merged=merged.cpu(), unmerged=after.cpu())
    return entry


def _worker(rank: int, port: int, backend: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=WORLD, device_id=device if backend == "nccl" else None,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))  # a rank-divergence bug fails, not hangs
    mesh = init_device_mesh(device.type, (WORLD,))
    batch = global_batch(device).chunk(WORLD)[rank]
    results: dict = {"train": {}, "factors": {}, "errors": {}}
    try:
        for kind, variants in SCENARIOS.items():
            for variant in variants:
                try:  # an error fails that scenario's test only (every rank raises at the same point)
                    results["train"][(kind, variant)] = run_scenario(kind, variant, device, mesh, batch)
                except Exception:
                    results["errors"][(kind, variant)] = traceback.format_exc()
        for name, kwargs in FACTOR_INITS.items():  # inject into a sharded model, compare factors, no training
            model = build_model().to(device)
            for block in model.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            with CollectiveSizes() as comm:
                nlora.inject(model, TARGETS, rank=RANK, seed=SEED, **kwargs)
            results.setdefault("largest_collective", {})[name] = max(comm.numels, default=0)
            state = {k: sharded.full(v.detach()).cpu() for k, v in model.state_dict().items()}
            state.update({f"{n}.rows": l.adapters["default"].rows for n, l in nlora.model.adapter_layers(model).items()
                          if l.adapters["default"].rows is not None})
            results["factors"][name] = {k: v.cpu() for k, v in state.items()}
        # unseeded random init on a sharded model: ranks seeded differently must still agree (rank 0's draw)
        model = build_model().to(device)
        fully_shard(model, mesh=mesh)
        torch.manual_seed(100 + rank)
        nlora.inject(model, TARGETS, rank=RANK, init="slora")
        mine = torch.cat([p.detach().flatten() for p in adapter_state(model).values()]).to(device)
        gathered = [torch.empty_like(mine) for _ in range(WORLD)]
        dist.all_gather(gathered, mine)
        results["unseeded_equal"] = all(torch.equal(gathered[0], g) for g in gathered)
        results["helpers"] = check_helpers(device, mesh)
        model = build_gpt2().to(device)  # Conv1D: inject (residual written into transposed shards), then merge
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        nlora.inject(model, ["c_attn", "c_proj", "c_fc"], rank=RANK, init="nystrom-pinv", index="norm", seed=SEED)
        results["gpt2_injected"] = {k: sharded.full(v.detach()).cpu() for k, v in model.state_dict().items()}
        nlora.merge(model)
        results["gpt2_merged"] = {k: sharded.full(v.detach()).cpu() for k, v in model.state_dict().items()}
        model = build_model().to(device)  # NaN in one rank's shard only: every rank must refuse, nothing changes
        fully_shard(model, mesh=mesh)
        bad = model.model.layers[1].mlp.up_proj.weight
        if rank == WORLD - 1:
            with torch.no_grad():
                bad.to_local()[-1, 0] = float("nan")
        try:
            nlora.inject(model, TARGETS, rank=RANK, init="nystrom")
            results["nan_refused"] = False
        except ValueError as err:
            named = "layers.1.mlp.up_proj: weight has NaN" in str(err)
            results["nan_refused"] = named and not nlora.adapter_names(model)  # and nothing was injected
        flags = torch.tensor([float(results["nan_refused"])], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        results["nan_refused"] = bool(flags.item())
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def check_helpers(device, mesh) -> dict[str, bool]:
    """``nlora.sharded`` on uneven (13 x 7) weights in every supported layout, against the plain operations."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    g = torch.Generator().manual_seed(0)
    w = torch.randn(13, 7, generator=g).to(device)
    m = torch.randn(3, 13, generator=g).to(device)
    rows, cols = torch.tensor([0, 6, 7, 12], device=device), torch.tensor([1, 3, 6], device=device)
    mesh2 = init_device_mesh(device.type, (1, WORLD))  # HSDP-style layout: replicate over dim 0, shard over dim 1
    layouts = {"shard0": (mesh, [Shard(0)]), "shard1": (mesh, [Shard(1)]), "replicate": (mesh, [Replicate()]),
               "hsdp": (mesh2, [Replicate(), Shard(0)]), "2d-fallback": (mesh2, [Shard(1), Shard(0)])}
    ok = {}
    for name, (mesh_, placements) in layouts.items():
        d = distribute_tensor(w, mesh_, placements)
        ok[name] = (torch.equal(sharded.take(d, rows, 0), w[rows]) and torch.equal(sharded.take(d, cols, 1), w[:, cols])
                    and torch.allclose(sharded.sq_norms(d, 0), w.square().sum(1), rtol=1e-5)
                    and torch.allclose(sharded.sq_norms(d, 1), w.square().sum(0), rtol=1e-5)
                    and torch.allclose(sharded.left_matmul(m, d), m @ w, rtol=1e-5, atol=1e-6)
                    and torch.equal(sharded.full(d), w)
                    and torch.equal(sharded.local_part(w, d), d.to_local())
                    and sharded.all_ranks_true(True, d) and not sharded.all_ranks_true(dist.get_rank() == 0, d))
    return ok


class CollectiveSizes(TorchDispatchMode):
    """Records the element count of every tensor handed to a collective (functional or c10d) while active."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("_c10d_functional", "c10d"):
            self.numels += [a.numel() for a in args if isinstance(a, torch.Tensor)]
        return func(*args, **(kwargs or {}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    if BACKEND == "nccl" and torch.cuda.device_count() < WORLD:
        pytest.skip(f"NLORA_DIST_BACKEND=nccl needs {WORLD} GPUs, found {torch.cuda.device_count()}")
    if BACKEND == "gloo" and not dist.is_gloo_available():
        pytest.skip("the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    torch.multiprocessing.spawn(_worker, args=(_free_port(), BACKEND, str(out)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=True)


def _device():
    return torch.device("cuda", 0) if BACKEND == "nccl" else torch.device("cpu")


_REFS: dict = {}


def _ref(variant):
    if variant not in _REFS:
        _REFS[variant] = reference(variant, _device())
    return _REFS[variant]


TRAIN_CASES = [pytest.param(kind, variant) for kind, variants in SCENARIOS.items() for variant in variants]


@pytest.mark.parametrize("kind,variant", TRAIN_CASES)
def test_training_matches_single_process(dist_results, kind, variant):
    if (kind, variant) in dist_results["errors"]:
        pytest.fail(f"{kind}/{variant} raised on the ranks:\n{dist_results['errors'][(kind, variant)]}")
    losses, adapters, _ = _ref(variant)
    got = dist_results["train"][(kind, variant)]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=0, atol=LOSS_ATOL)
    assert got["adapters"].keys() == adapters.keys() and adapters
    for k, v in adapters.items():
        torch.testing.assert_close(got["adapters"][k], v.cpu(), rtol=RTOL, atol=ATOL, msg=k)
    init_model = build_model()
    nlora.inject(init_model, TARGETS, rank=RANK, seed=SEED, **VARIANTS[variant])
    moved = 0.0
    for k, v in adapter_state(init_model).items():
        if VARIANTS[variant].get("train") == "middle" and not k.endswith("lora_N"):
            assert torch.equal(got["adapters"][k], v), k  # IntTune: A and B stay at their init
        else:
            moved = max(moved, (got["adapters"][k] - v).abs().max().item())
    assert moved > 100 * ATOL  # the adapters really trained, far beyond the tolerance


def test_fsdp_merge_unmerge_on_dtensor_weights(dist_results):
    if ("fsdp", "nlora") in dist_results["errors"]:
        pytest.fail(f"fsdp/nlora raised on the ranks:\n{dist_results['errors'][('fsdp', 'nlora')]}")
    got = dist_results["train"][("fsdp", "nlora")]
    _, _, model = _ref("nlora")
    nlora.merge(model)
    for k, v in model.named_parameters():
        if k.endswith("base.weight"):
            torch.testing.assert_close(got["merged_weights"][k], v.detach().cpu(), rtol=RTOL, atol=ATOL, msg=k)
    nlora.unmerge(model)
    torch.testing.assert_close(got["merged"], got["before"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["unmerged"], got["before"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(FACTOR_INITS))
def test_inject_into_sharded_model_gives_unsharded_factors(dist_results, name):
    """Same factors (and, for output-preserving inits, the same residual base weights) as the unsharded inject;
    random inits are world-size independent because every module draws from ``seed`` mixed with its name."""
    model = build_model().to(_device())
    nlora.inject(model, TARGETS, rank=RANK, seed=SEED, **FACTOR_INITS[name])
    got = dist_results["factors"][name]
    want = {k: v.cpu() for k, v in model.state_dict().items()}
    want.update({f"{n}.rows": l.adapters["default"].rows.cpu() for n, l in nlora.model.adapter_layers(model).items()
                 if l.adapters["default"].rows is not None})
    assert got.keys() == want.keys()
    exact = name.startswith("nystrom") and name != "nystrom-optimal" or name in ("slora", "lora")
    for k, v in want.items():
        if exact and BACKEND == "gloo":  # slicing, the same r x r pinv, the same seeded draws: bit for bit
            assert torch.equal(got[k], v), k
        else:  # sums over sharded rows (optimal core) or a gathered SVD on another device: rounding only
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_unseeded_random_init_is_the_same_on_every_rank(dist_results):
    assert dist_results["unseeded_equal"]


def test_sharded_helpers_match_plain_ops_in_every_layout(dist_results):
    assert dist_results["helpers"] == dict.fromkeys(["shard0", "shard1", "replicate", "hsdp", "2d-fallback"], True)


def test_nystrom_on_sharded_weights_moves_only_r_rows_and_columns(dist_results):
    """The largest tensor any collective sees while injecting is ``r x max(out, in)`` for every Nyström init
    (the selected rows / columns, or an ``r x in`` product), never a weight; PiSSA's SVD gathers whole weights."""
    largest = dist_results["largest_collective"]
    biggest_slice = RANK * 64  # r x max(out, in) of the tiny Llama (intermediate 64, hidden 32)
    assert biggest_slice < 16 * 32  # smaller than the smallest weight (k_proj, v_proj: 16 x 32): the bound bites
    for name in FACTOR_INITS:
        if name.startswith("nystrom"):
            assert 0 < largest[name] <= biggest_slice, (name, largest[name])
    assert largest["pissa"] >= 64 * 32 // WORLD  # a whole (sharded) weight travels: documented


def test_nan_in_one_shard_is_refused_on_every_rank(dist_results):
    assert dist_results["nan_refused"]


def test_sharded_gpt2_conv1d_inject_and_merge_match_unsharded(dist_results):
    model = build_gpt2().to(_device())
    nlora.inject(model, ["c_attn", "c_proj", "c_fc"], rank=RANK, init="nystrom-pinv", index="norm", seed=SEED)
    for stage in ("injected", "merged"):
        if stage == "merged":
            nlora.merge(model)
        got = dist_results[f"gpt2_{stage}"]
        assert got.keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got[k], v.cpu(), rtol=1e-6, atol=1e-7, msg=f"{stage}: {k}")
