"""Init time of the batched Nyström inits (``InitSpec.many``: the r x r work of all layers of one ``inject`` as one
batch) against the same inits run layer by layer (``many`` switched off), interleaved in one process, plus the aten
op count of one ``inject`` (a TorchDispatchMode counter: host dispatches, views included) at two layer counts, so the
per-layer slope is visible. The init's cost at these sizes is host dispatch, not arithmetic.

    python benchmarks/bench_init_batch.py                      # CPU: 224 x Linear(256, 256), r = 32
    python benchmarks/bench_init_batch.py --device cuda --shape 7b --dtype float32   # LLaMA-2-7B linears, r = 128
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nlora
from _common import machine_info, sync, table, timed, write_json
from nlora.inits import INITIALIZERS

INITS = ("lora", "nystrom", "nystrom-pinv", "nystrom-optimal")
SHAPES_7B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # q k v o, gate up, down (out, in)


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def per_layer(init: str, on: bool):
    """Run ``init`` without its batched form (the path before InitSpec.many) while ``on``."""
    saved = INITIALIZERS[init]
    if on and getattr(saved, "many", None) is not None:
        INITIALIZERS[init] = dataclasses.replace(saved, many=None)
    try:
        yield
    finally:
        INITIALIZERS[init] = saved


def build(args, layers: int) -> nn.Module:
    """``layers`` Linear layers (no bias) on the device, weights drawn there."""
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.shape == "7b":
        shapes = (SHAPES_7B * (layers // len(SHAPES_7B) + 1))[:layers]
    else:
        shapes = [(args.width, args.width)] * layers
    return nn.Sequential(*[nn.Linear(i, o, bias=False, device=args.device, dtype=dtype) for o, i in shapes])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=["square", "7b"], default="square")
    p.add_argument("--layers", type=int, default=224)
    p.add_argument("--width", type=int, default=256, help="square layers' width (--shape square)")
    p.add_argument("--rank", type=int, default=None, help="default 32 (square), 128 (7b)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--count-layers", type=int, nargs=2, default=[32, 64], help="layer counts of the op count")
    p.add_argument("--name", default=None)
    args = p.parse_args()
    rank = args.rank or (128 if args.shape == "7b" else 32)
    model = build(args, args.layers)
    modes = [("batched", False), ("per-layer", True)]
    rows, out = [], []
    for init in INITS:
        paths = modes if getattr(INITIALIZERS[init], "many", None) is not None else [("layer by layer only", False)]
        times = {m: [] for m, _ in paths}
        for rep in range(args.repeats + 1):  # the first round warms up (allocator, BLAS handles)
            for mode, off in paths:
                with per_layer(init, off):
                    dt, _ = timed(lambda: nlora.inject(model, "all-linear", rank=rank, init=init, seed=0), args.device)
                nlora.unload(model)
                sync(args.device)
                if rep:
                    times[mode].append(dt)
        for mode, off in paths:
            counts = []
            for n in args.count_layers:
                small = build(args, n) if args.shape == "square" else build(argparse.Namespace(**{
                    **vars(args), "device": "cpu", "dtype": "float32", "shape": "square", "width": 2 * rank}), n)
                with per_layer(init, off), OpCounter() as c:
                    nlora.inject(small, "all-linear", rank=rank, init=init, seed=0)
                counts.append(c.n)
            slope = (counts[1] - counts[0]) / (args.count_layers[1] - args.count_layers[0])
            med = statistics.median(times[mode])
            rows.append([init, mode, f"{med:.4f}", f"{min(times[mode]):.4f}", f"{max(times[mode]):.4f}",
                         counts[0], counts[1], f"{slope:.1f}"])
            out.append({"init": init, "mode": mode, "seconds": times[mode], "median_s": med,
                        "ops": dict(zip(map(str, args.count_layers), counts)), "ops_per_layer": slope})
    n0, n1 = args.count_layers
    print(f"{args.layers} layers ({args.shape}, width {args.width if args.shape == 'square' else '7b'}), r={rank}, "
          f"{args.dtype} on {args.device}, median of {args.repeats}")
    print(table(rows, ["init", "path", "median s", "min s", "max s", f"ops ({n0} layers)", f"ops ({n1} layers)",
                       "ops / layer"]))
    name = args.name or f"init_batch_{args.device}_{args.shape}_{args.dtype}"
    write_json(name, {"machine": machine_info(args.device), "args": vars(args), "rank": rank, "results": out,
                      "note": "op counts are aten dispatches of one inject on CPU fp32 copies of the layer shapes "
                              "(square: the benchmark's; 7b: square layers of width 2r), views included"})


if __name__ == "__main__":
    main()
