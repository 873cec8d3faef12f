"""The memory-bound passes an adapter adds to a training step, each GEMM timed alone (GPU).

One LLaMA-2-7B decoder layer's projections (4 x 4096->4096, 2 x 4096->11008, 1 x 11008->4096) at --tokens rows,
r = 128, bf16. For each shape: the base GEMM ``x Wᵀ`` (the compute-bound floor), a copy of the output (the
bandwidth ceiling) and the passes nlora's node runs: forward ``x Aᵀ`` and ``y += h2 Bᵀ`` (in place); backward
``g B``, ``gᵀ h2`` (dB), ``vᵀ x`` (dA) and ``g_x += v A`` (in place). IntTune on the paper's init runs only the two
in-place passes (``x Aᵀ`` and ``g B`` are columns of the base's own products). Also ``y += h Bᵀ`` with two terms'
factors concatenated (2r wide) and the base GEMM accumulating into an existing output (``addmm``, beta = 1): the
alternatives for folding a second pass. CUDA-event medians of --repeats runs of 50 calls.

  python3 benchmarks/gemm_passes.py [--tokens 8192] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.common import machine, pyplot, save, write  # noqa: E402

SHAPES = {"attention (x4)": (4096, 4096, 4), "gate/up (x2)": (4096, 11008, 2), "down (x1)": (11008, 4096, 1)}
NLORA = ("x Aᵀ", "y += h2 Bᵀ", "g B", "gᵀ h2", "vᵀ x", "g_x += v A")
INTTUNE = ("y += h2 Bᵀ", "g_x += v A")


def microseconds(fn, repeats: int) -> float:
    """Median over ``repeats`` of the mean CUDA time of 50 calls of ``fn`` (after 5 warm-up calls), in µs."""
    times = []
    for _ in range(repeats):
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 50)
    return statistics.median(times)


def passes(tokens: int, d_in: int, d_out: int, r: int, repeats: int) -> dict[str, tuple[float, float | None]]:
    """``{pass: (µs, GB/s or None)}`` for one projection shape."""
    new = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    x, g, y, gx, w = new(tokens, d_in), new(tokens, d_out), new(tokens, d_out), new(tokens, d_in), new(d_out, d_in)
    a, b, h2, v, h, b2, z = new(r, d_in), new(d_out, r), new(tokens, r), new(tokens, r), new(tokens, 2 * r), \
        new(2 * r, d_out), torch.empty_like(y)
    gb = lambda *ts: sum(t.numel() * t.element_size() for t in ts) / 1e9  # noqa: E731  (GB each pass moves)
    ops = {"base x Wᵀ": (lambda: torch.mm(x, w.t()), None), "copy y (ceiling)": (lambda: z.copy_(y), gb(y, y)),
           "x Aᵀ": (lambda: F.linear(x, a), gb(x)), "y += h2 Bᵀ": (lambda: y.addmm_(h2, b.t()), gb(y, y)),
           "g B": (lambda: torch.mm(g, b), gb(g)), "gᵀ h2": (lambda: torch.mm(g.t(), h2), gb(g)),
           "vᵀ x": (lambda: torch.mm(v.t(), x), gb(x)), "g_x += v A": (lambda: gx.addmm_(v, a), gb(gx, gx)),
           "y += h Bᵀ, 2 terms (2r)": (lambda: y.addmm_(h, b2), gb(y, y)),
           "base into y (beta = 1)": (lambda: torch.addmm(y, x, w.t()), None)}
    out = {}
    for name, (fn, size) in ops.items():
        us = microseconds(fn, repeats)
        out[name] = (us, None if size is None else size / us * 1e6)
    return out


def plot(result, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [n for n in next(iter(result["shapes"].values())) if not n.startswith("base")]  # the passes, not the GEMM
    for i, (shape, ops) in enumerate(result["shapes"].items()):
        ax.barh([k + 0.27 * i for k in range(len(names))], [ops[n]["us"] for n in names], height=0.27, label=shape)
    ax.set_yticks([k + 0.27 for k in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlabel("µs per call")
    ax.legend(fontsize=7)
    ax.set_title(result["title"], fontsize=8)
    save(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    torch.manual_seed(0)
    shapes, layer = {}, {"base": 0.0, "NLoRA": 0.0, "IntTune": 0.0}
    title = f"one LLaMA-2-7B layer's projections, {args.tokens} tokens, r = {args.rank}, bf16, cuda"
    print(title)
    print(f"{'shape':<16} {'pass':<26} {'µs':>8} {'GB/s':>7}")
    for shape, (d_in, d_out, count) in SHAPES.items():
        ops = passes(args.tokens, d_in, d_out, args.rank, args.repeats)
        shapes[shape] = {n: {"us": us, "gb_per_s": bw} for n, (us, bw) in ops.items()}
        for n, (us, bw) in ops.items():
            print(f"{shape:<16} {n:<26} {us:>8.1f} {'' if bw is None else f'{bw:.0f}':>7}")
        layer["base"] += count * 2 * ops["base x Wᵀ"][0]  # forward x Wᵀ and backward g W
        layer["NLoRA"] += count * sum(ops[n][0] for n in NLORA)
        layer["IntTune"] += count * sum(ops[n][0] for n in INTTUNE)
    print(f"\nper layer: base GEMMs {layer['base']:.0f} µs; the adapter's passes: NLoRA {layer['NLoRA']:.0f} µs, "
          f"IntTune {layer['IntTune']:.0f} µs")
    write({"benchmark": "gemm_passes", "title": title, "machine": machine("cuda"), "tokens": args.tokens,
           "rank": args.rank, "shapes": shapes, "per_layer_us": layer}, args.out, "gemm_passes", plot)


if __name__ == "__main__":
    main()
