"""Host-side cost of nlora's eager adapter path: forward + backward of a stack of small adapted linears, so small that
the time is the host dispatching ops and autograd nodes (and, on CUDA, launching kernels), not the kernels themselves.

Compares the one-node ``_AdapterBranch`` path against the op-by-op path of commit e638000
(``nlora.layer.FUSED_FUNCTION = False``), interleaved in one process, for NLoRA (train all), IntTune and LoRA with
nlora's default precision policy (fp32 master factors, compute in the activations' dtype) and with bf16 factors.
No optimizer step. With ``--dtype float32`` (what a CPU needs) the fp32 factors need no casts at all.

    python benchmarks/bench_host.py --device cuda
    python benchmarks/bench_host.py --device cpu --dtype float32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import nlora
import nlora.layer
from _common import machine_info, sync, table, write_json

CASES = {
    "nlora (train all)": dict(init="nystrom"),
    "inttune (train N)": dict(init="nystrom", train="middle"),
    "lora": dict(init="lora"),
    "nlora, bf16 factors": dict(init="nystrom", adapter_dtype=torch.bfloat16),
}


def build(device: str, layers: int, width: int, rank: int, opts: dict, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device, dtype)
    nlora.inject(model, "all-linear", rank=rank, seed=0, **opts)
    return model


def step_us(model: nn.Module, x: torch.Tensor, device: str, steps: int) -> float:
    """Mean microseconds per forward + backward over ``steps`` calls, the device synchronised at both ends."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        model(x).float().sum().backward()
    sync(device)
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=14, help="adapted linears per step (the 2-layer LLaMA step has 14)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=30, help="timed blocks per path, the two paths interleaved")
    p.add_argument("--dtype", default="bfloat16", help="base/activation dtype; on a CPU use float32: bf16 CPU "
                                                        "GEMMs are slow enough to hide the host cost being measured")
    p.add_argument("--name", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.tokens, args.width, device=args.device, dtype=dtype, requires_grad=True)
    records, rows = [], []
    for case, opts in CASES.items():
        model = build(args.device, args.layers, args.width, args.rank, opts, dtype)
        times = {True: [], False: []}
        for block in range(args.blocks + 1):
            for on in (True, False):
                nlora.layer.FUSED_FUNCTION = on
                t = step_us(model, x, args.device, args.steps)
                if block:  # the first block of each path is the warm-up
                    times[on].append(t)
        nlora.layer.FUSED_FUNCTION = True
        new, old = (statistics.median(times[k]) for k in (True, False))
        new_min, old_min = (min(times[k]) for k in (True, False))
        per_layer = (new - old) / args.layers
        records.append({"case": case, "options": {k: str(v) for k, v in opts.items()},
                        "function_us_per_step": {"median": new, "min": new_min, "samples": times[True]},
                        "op_by_op_us_per_step": {"median": old, "min": old_min, "samples": times[False]},
                        "delta_us_per_layer_median": per_layer})
        rows.append([case, f"{new:.0f} ({new_min:.0f})", f"{old:.0f} ({old_min:.0f})", f"{per_layer:+.1f}",
                     f"{new / old:.3f}"])
        print(rows[-1], flush=True)
    print(table(rows, ["case", "one node: us/step (min)", "op-by-op e638000 (min)", "delta us/layer", "ratio"]))
    name = args.name or f"host_overhead_{args.device}_{args.dtype}"
    write_json(name, {"benchmark": "host_overhead", "args": vars(args), "machine": machine_info(args.device),
                      "results": records,
                      "notes": "forward + backward (no optimizer) of --layers bf16 nn.Linear(width, width) with one "
                               "adapter each, tokens x width input needing a gradient; medians over --blocks blocks "
                               "of --steps steps, the two paths interleaved block by block; device synchronised at "
                               "both ends of each block. Tiny shapes: the time is host dispatch, not kernels."})


if __name__ == "__main__":
    main()
