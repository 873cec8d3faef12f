"""Adapter init time: nlora.inject (each init) vs PEFT get_peft_model on a LLaMA-2-7B-shaped stack (GPU).

The model is a plain stack of nn.Linear modules with LLaMA-2-7B shapes: 32 blocks of q_proj, k_proj, v_proj, o_proj
(4096 x 4096), gate_proj, up_proj (11008 x 4096) and down_proj (4096 x 11008), no bias, random weights, built once
on the device in fp32 and then in bf16. Each measurement deep-copies the stack (not timed), synchronises, calls
``nlora.inject(copy, "all-linear", rank=128, init=X)`` (or PEFT's ``get_peft_model`` with LoraConfig(r=128) on the
7 projections: plain LoRA init, the reference), synchronises, and deletes the copy. Every method is run once on a
one-block stack first (warm-up: CUDA libraries load there), then --repeats interleaved repetitions; the table shows
the median seconds and PEFT / method.

  python3 benchmarks/init_time.py [--dtypes float32 bfloat16] [--layers 32] [--repeats 3] [--out DIR]
  python3 benchmarks/init_time.py --tiny     # CPU smoke test: 2 blocks of 64 / 172, r=8
"""

import argparse
import copy
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import nlora  # noqa: E402
from benchmarks.common import machine, pyplot, save, sync, write  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from transformers/PEFT

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["nystrom", "nystrom-pinv", "nystrom-optimal", "lora", "slora", "peft"]



class Block(nn.Module):
    def __init__(self, hidden, inter, dtype):
        super().__init__()
        for name in ["q_proj", "k_proj", "v_proj", "o_proj"]:
            setattr(self, name, nn.Linear(hidden, hidden, bias=False, dtype=dtype))
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype)


class Stack(nn.Module):
    def __init__(self, layers, hidden, inter, dtype):
        super().__init__()
        self.layers = nn.ModuleList(Block(hidden, inter, dtype) for _ in range(layers))


def build(layers, hidden, inter, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):
        return Stack(layers, hidden, inter, dtype).requires_grad_(False)


def init(model, method, rank):
    if method == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=rank, target_modules=PROJ))
    return nlora.inject(model, "all-linear", rank=rank, init=method)


def timed_init(base, method, rank, device):
    model = copy.deepcopy(base)
    sync(device)
    t0 = time.perf_counter()
    model = init(model, method, rank)
    sync(device)
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return seconds


def plot(result, path):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(result["dtypes"])
    for i, d in enumerate(result["dtypes"]):
        xs = [j + i * width for j in range(len(d["rows"]))]
        ax.bar(xs, [r["seconds"] for r in d["rows"]], width, label=d["dtype"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(result["methods"]))], result["methods"])
    ax.set_yscale("log")
    ax.set_ylabel("init time, s (median, log scale)")
    ax.legend()
    ax.set_title(result["title"], fontsize=10)
    save(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--layers", type=int, help="blocks to build (default 32; --tiny: 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 2 blocks of hidden 64 / MLP 172, r=8")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    if args.tiny:
        device, hidden, inter, rank, layers, name = "cpu", 64, 172, 8, args.layers or 2, "init_time_tiny"
    else:
        device, hidden, inter, rank, layers, name = "cuda", 4096, 11008, 128, args.layers or 32, "init_time"
    title = f"init of {layers} x 7 linear layers (hidden {hidden}, MLP {inter}), r = {rank}, {device}"
    print(title)
    result = {"benchmark": "init_time", "title": title, "machine": machine(device), "device": device,
              "layers": layers, "hidden": hidden, "intermediate": inter, "rank": rank, "repeats": args.repeats,
              "methods": args.methods, "dtypes": []}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for method in args.methods:  # warm-up on one block
            timed_init(build(1, hidden, inter, device, dtype), method, rank, device)
        base = build(layers, hidden, inter, device, dtype)
        seconds = {m: [] for m in args.methods}
        for _ in range(args.repeats):
            for method in args.methods:
                seconds[method].append(timed_init(base, method, rank, device))
        del base
        gc.collect()
        med = {m: statistics.median(s) for m, s in seconds.items()}
        rows = [{"method": m, "seconds": med[m], "seconds_repeats": seconds[m],
                 "peft_over_method": med["peft"] / med[m] if "peft" in med else None} for m in args.methods]
        result["dtypes"].append({"dtype": dtype_name, "rows": rows})
        print(f"\n{dtype_name}: median of {args.repeats}")
        print(f"{'method':<16} {'seconds':>9} {'PEFT / method':>14}  repeats")
        for r in rows:
            ratio = "-" if r["peft_over_method"] is None else f"{r['peft_over_method']:.2f}"
            print(f"{r['method']:<16} {r['seconds']:>9.3f} {ratio:>14}  "
                  + " ".join(f"{s:.3f}" for s in r["seconds_repeats"]))
    write(result, args.out, name, plot)


if __name__ == "__main__":
    main()
