"""Init time, nlora vs HF PEFT: a LLaMA-shaped model with random weights, r=128 on every linear layer.

Times the step from a built model to a ready one (adapters created, residuals written, device synchronised),
for nlora's inits and PEFT's ``init_lora_weights`` in the same process, on the same model. Slow inits
(randomised and full SVD) are timed on a subset of layers and scaled linearly to the whole model; the JSON
says which rows are scaled and from how many layers.

    python benchmarks/bench_init.py --shape 7b --device cuda --dtypes float32 bfloat16      # the H200 run
    python benchmarks/bench_init.py --shape 1b --device cpu --dtypes float32 --repeats 3     # the CPU run
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import nlora
from _common import build_llama, free_memory, llama_config, machine_info, summary, table, timed, write_json

NLORA_METHODS = {  # label: (init, options)
    "lora": ("lora", {}),
    "slora": ("slora", {}),
    "nystrom": ("nystrom", {}),
    "nystrom-pinv": ("nystrom-pinv", {}),
    "nystrom-optimal": ("nystrom-optimal", {}),
    "nystrom-pinv[svd]": ("nystrom-pinv", {"solver": "svd"}),  # the SVD solver (the default before the ridge one)
    "nystrom-optimal[svd]": ("nystrom-optimal", {"solver": "svd"}),
    "pissa-lowrank4": ("pissa", {"svd": "lowrank", "niter": 4}),
    "pissa-full": ("pissa", {"svd": "full"}),
}
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # = all-linear
PEFT_METHODS = {"lora": True, "pissa-lowrank4": "pissa_niter_4", "pissa-full": "pissa"}


def nlora_init(model, init: str, options: dict, rank: int, layers: list[int] | None):
    def go():
        nlora.inject(model, "all-linear", rank=rank, init=init, layers=layers, seed=0, **options)

    def undo():
        nlora.unload(model)

    return go, undo


def peft_init(model, init, rank: int, layers: list[int] | None):
    from peft import LoraConfig, get_peft_model

    holder = {}

    def go():
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=LLAMA_LINEARS, init_lora_weights=init,
                         layers_to_transform=layers, layers_pattern="layers" if layers else None, lora_dropout=0.0)
        holder["m"] = get_peft_model(model, cfg)

    def undo():
        holder.pop("m").unload()
        if hasattr(model, "peft_config"):
            del model.peft_config

    return go, undo


def measure(go, undo, device: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        free_memory()
        t, _ = timed(go, device)
        times.append(t)
        undo()
    free_memory()
    return times


def pinv_micro(device: str, iters: int = 20) -> list[dict]:
    """Per-call cost of the small factorisations the Nyström inits make per layer (why pinv/optimal cost more)."""
    import statistics

    def clock(fn) -> float:
        for _ in range(3):
            fn()
        ts = [timed(fn, device)[0] * 1e3 for _ in range(iters)]
        return statistics.median(ts)

    g = torch.Generator(device).manual_seed(0)
    core = torch.randn(128, 128, device=device, generator=g)
    tall = torch.randn(11008, 128, device=device, generator=g)
    wide = torch.randn(128, 4096, device=device, generator=g)
    batch = torch.randn(224, 128, 128, device=device, generator=g)
    rows = [("pinv 128x128 (rtol 0.1)", lambda: torch.linalg.pinv(core, rtol=0.1), 1),
            ("pinv 11008x128", lambda: torch.linalg.pinv(tall), 1),
            ("pinv 128x4096", lambda: torch.linalg.pinv(wide), 1),
            ("pinv batched 224 x 128x128 (per matrix)", lambda: torch.linalg.pinv(batch, rtol=0.1), 224),
            ("eigh 128x128", lambda: torch.linalg.eigh(core @ core.T), 1),
            ("qr 11008x128", lambda: torch.linalg.qr(tall), 1),
            ("pinv 128x128 on the host CPU (incl. copies)",
             lambda: torch.linalg.pinv(core.cpu(), rtol=0.1).to(device), 1)]
    if torch.device(device).type == "cuda":
        for drv in ("gesvd", "gesvdj", "gesvda"):
            rows.append((f"svd 128x128 driver={drv}", lambda d=drv: torch.linalg.svd(core, driver=d), 1))
    # The SVD-free default solver (nystrom.ridge_pinv / optimal_core(solver="ridge")) and its pieces, per layer.
    from nlora.inits import INITIALIZERS
    from nlora.nystrom import _lambda_max_bound, optimal_core, ridge_pinv

    spd = (core.double() @ core.double().T) / 128 + torch.eye(128, device=device, dtype=torch.float64)
    spd2 = torch.stack((spd, spd))
    chol = torch.linalg.cholesky(spd)
    tall64 = tall.double()
    w_big = torch.randn(11008, 4096, device=device, generator=g)
    w_big16 = w_big.bfloat16()
    idx = torch.arange(128, device=device)
    pinv_fn, opt_fn = INITIALIZERS["nystrom-pinv"].fn, INITIALIZERS["nystrom-optimal"].fn
    rows += [("ridge pinv 128x128 (rcond 0.1; the nystrom-pinv core)", lambda: ridge_pinv(core, 0.1), 1),
             ("gram 11008x128 fp64 (C^T C)", lambda: tall64.T @ tall64, 1),
             ("lambda_max bound 128x128 fp64 (5 squarings)", lambda: _lambda_max_bound(spd), 1),
             ("cholesky_ex 128x128 fp64", lambda: torch.linalg.cholesky_ex(spd), 1),
             ("cholesky_ex batched 2 x 128x128 fp64 (per call)", lambda: torch.linalg.cholesky_ex(spd2), 1),
             ("solve_triangular 128x128 fp64", lambda: torch.linalg.solve_triangular(chol, spd, upper=False), 1),
             ("C^T W 11008x4096 fp32 (the optimal core's big product)", lambda: tall.T @ w_big, 1),
             ("optimal core via Cholesky 11008x4096 fp32", lambda: optimal_core(w_big, idx, idx), 1),
             ("optimal core via Cholesky 11008x4096 bf16", lambda: optimal_core(w_big16, idx, idx), 1),
             ("optimal core via SVD 11008x4096 fp32 (solver='svd')",
              lambda: optimal_core(w_big, idx, idx, solver="svd"), 1),
             ("nystrom-pinv factors 11008x4096 fp32 (ridge)", lambda: pinv_fn(w_big, 128, scaling=1.0), 1),
             ("nystrom-pinv factors 11008x4096 fp32 (solver='svd')",
              lambda: pinv_fn(w_big, 128, scaling=1.0, solver="svd"), 1),
             ("nystrom-optimal factors 11008x4096 fp32 (ridge)", lambda: opt_fn(w_big, 128, scaling=1.0), 1),
             ("nystrom-optimal factors 11008x4096 bf16 (ridge)", lambda: opt_fn(w_big16, 128, scaling=1.0), 1)]
    out = []
    for label, fn, per in rows:
        try:
            out.append({"op": label, "ms_per_matrix": clock(fn) / per, **launches(fn, device)})
        except RuntimeError as e:  # a driver a build lacks
            out.append({"op": label, "error": str(e)[:200]})
    print(table([[o["op"], f"{o['ms_per_matrix']:.3f}" if "ms_per_matrix" in o else o["error"],
                  o.get("kernels", ""), o.get("syncs", "")] for o in out],
                ["op", "ms per matrix", "GPU kernels", "host syncs"]))
    return out


def launches(fn, device: str) -> dict:
    """GPU kernels one call launches and host synchronisations it makes (torch.profiler; CUDA only)."""
    if torch.device(device).type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    syncs = sum(1 for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")) - 1
    return {"kernels": kernels, "syncs": max(syncs, 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="7b", choices=["7b", "1b"])
    p.add_argument("--layers", type=int, default=None, help="decoder layers in the model (default: the shape's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lowrank-layers", type=int, default=4, help="layers the randomised-SVD inits are timed on")
    p.add_argument("--full-layers", type=int, default=1, help="layers the full-SVD inits are timed on (0: skip)")
    p.add_argument("--full-repeats", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], help="labels to skip, e.g. pissa-full")
    p.add_argument("--name", default=None, help="JSON name (default init_<shape>_<device>)")
    p.add_argument("--pinv-micro", action="store_true", help="only time the small factorisations, then stop")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    device = args.device
    if args.pinv_micro:
        write_json(args.name or f"pinv_micro_{torch.device(device).type}",
                   {"benchmark": "pinv_micro", "machine": machine_info(device), "results": pinv_micro(device)})
        return
    rows, records = [], []
    t_start = time.perf_counter()
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        cfg = llama_config(args.shape, args.layers)
        n_layers = cfg.num_hidden_layers
        t_build, model = timed(lambda: build_llama(cfg, device, dtype), device)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[{dtype_name}] built {n_layers}-layer {args.shape} model ({n_params / 1e9:.2f}B params) "
              f"in {t_build:.1f} s", flush=True)
        # Warm-up: one layer of every method (kernels, cuBLAS/cuSOLVER handles, PEFT imports).
        for label, (init, opts) in NLORA_METHODS.items():
            if label in args.skip or (label == "pissa-full" and (args.full_layers == 0 or dtype != torch.float32)):
                continue
            if label == "pissa-full":  # a small SVD loads cuSOLVER without paying a 4096 x 11008 one
                timed(lambda: torch.linalg.svd(torch.randn(512, 512, device=device)), device)
                continue
            measure(*nlora_init(model, init, opts, args.rank, [0]), device, 1)
        for label, init in PEFT_METHODS.items():
            if label in args.skip or label == "pissa-full":
                continue
            measure(*peft_init(model, init, args.rank, [0]), device, 1)

        plan = []
        for label, (init, opts) in NLORA_METHODS.items():
            plan.append(("nlora", label, nlora_init, (init, opts)))
            if label in PEFT_METHODS:
                plan.append(("peft", label, peft_init, (PEFT_METHODS[label],)))
        for lib, label, maker, extra in plan:
            if label in args.skip:
                continue
            if label == "pissa-full":
                if args.full_layers == 0 or dtype != torch.float32:
                    continue
                k, reps = args.full_layers, args.full_repeats
            elif label == "pissa-lowrank4":
                k, reps = min(args.lowrank_layers, n_layers), args.repeats
            else:
                k, reps = n_layers, args.repeats
            layers = None if k == n_layers else list(range(k))
            times = measure(*maker(model, *extra, args.rank, layers), device, reps)
            scale = n_layers / k
            whole = [t * scale for t in times]
            rec = {"library": lib, "method": label, "dtype": dtype_name, "layers_timed": k, "layers_model": n_layers,
                   "scaled": k != n_layers, "seconds_timed": summary(times), "seconds_whole_model": summary(whole)}
            records.append(rec)
            rows.append([dtype_name, lib, label, k, f"{rec['seconds_whole_model']['median']:.3f}",
                         f"{min(whole):.3f}-{max(whole):.3f}", "scaled" if k != n_layers else ""])
            print(table(rows[-1:], ["dtype", "lib", "method", "layers", "s (model)", "range", ""]).splitlines()[-1],
                  flush=True)
        del model
        free_memory()
    # Speed-ups against PEFT's plain LoRA init in the same dtype.
    for rec in records:
        ref = [r for r in records if r["library"] == "peft" and r["method"] == "lora" and r["dtype"] == rec["dtype"]]
        if ref:
            rec["speedup_vs_peft_lora"] = ref[0]["seconds_whole_model"]["median"] / rec["seconds_whole_model"]["median"]
    print()
    print(table(rows, ["dtype", "lib", "method", "layers timed", "s (whole model)", "range", "note"]))
    payload = {"benchmark": "init", "shape": args.shape, "rank": args.rank, "targets": "all-linear",
               "machine": machine_info(device), "args": vars(args), "results": records,
               "total_seconds": time.perf_counter() - t_start,
               "notes": "seconds_whole_model = seconds_timed * layers_model / layers_timed for scaled rows; "
                        "timing = built model -> adapters ready, device synchronised; warm-up on one layer first."}
    write_json(args.name or f"init_{args.shape}_{torch.device(device).type}", payload)


if __name__ == "__main__":
    main()
