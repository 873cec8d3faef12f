"""4-bit (torchao NF4) bases: training step, peak memory and Nyström init against the NF4 floor and the bf16 run (GPU).

Step and memory: 8 LLaMA-2-7B-shaped decoder layers (as train_step.py: random inputs_embeds with requires_grad, a
plain eager AdamW loop), r = alpha = 128 on all 7 projections, their weights in NF4 (``to_nf4`` of the bf16 weights)
or left in bf16. Variants: the frozen NF4 floor, NLoRA (``preserve_output=True``: the initial delta is subtracted
in the forward, the 4-bit weight is never written), NLoRA with the paper's init (no residual) and IntTune on NF4,
and NLoRA (``preserve_output=True``) on the bf16 base; median of
--rounds interleaved rounds of --steps steps. Peak memory: one variant at a time, 2 steps, as built and again with HF
gradient checkpointing on every decoder layer (the QLoRA recipe's default). Init: ``nlora.inject`` of
``nystrom`` (preserve_output) on a 32-block stack of LLaMA-2-7B-shaped NF4 Linears, median of 3.
PEFT is not compared: it does not adapt torchao NF4 Linears.

  python3 benchmarks/four_bit.py [--shape 4x2048] [--out DIR]     (needs torchao)
  python3 benchmarks/four_bit.py --tiny                           # CPU smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import nlora  # noqa: E402
from benchmarks.common import machine, pyplot, save, sync, time_rounds, write  # noqa: E402
from benchmarks.train_step import optimizer, peak_gib, step  # noqa: E402

warnings.filterwarnings("ignore")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = {"NF4 floor": None, "NLoRA on NF4": dict(init="nystrom", preserve_output=True),
            "NLoRA, paper's init, on NF4": dict(init="nystrom"), "IntTune on NF4": dict(init="nystrom", train="middle"),
            "NLoRA on bf16": dict(init="nystrom", preserve_output=True)}


def to_nf4(model: nn.Module) -> nn.Module:
    """Every nn.Linear of ``model`` with its weight as a torchao NF4Tensor (LlamaModel: the 7 projections)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4 as nf4

    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight = nn.Parameter(nf4(m.weight.detach()), requires_grad=False)
    return model


def build(name, cfg, rank, device, dtype=torch.bfloat16):
    """Variant ``name`` of the bf16 LlamaModel (seed 0) and its optimizer (None for the floor)."""
    from transformers import LlamaModel

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaModel(cfg).requires_grad_(False).train()
    torch.set_default_dtype(torch.float32)
    if "bf16" not in name:
        to_nf4(model)
    if VARIANTS[name] is not None:
        nlora.inject(model, list(PROJ), rank=rank, alpha=rank, **VARIANTS[name])
    return model, optimizer(model, device)


def build_checkpointed(name, cfg, rank, device, dtype=torch.bfloat16):
    """``build``, with HF gradient checkpointing on every decoder layer."""
    model, opt = build(name, cfg, rank, device, dtype)
    model.gradient_checkpointing_enable()
    return model, opt


def init_seconds(blocks, hidden, inter, rank, device):
    """Median seconds of nlora.inject(nystrom, preserve_output) on a stack of NF4 Linears."""
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    stack = nn.ModuleDict({f"b{i}_{p}": nn.Linear(i_, o, bias=False, device=device, dtype=torch.bfloat16)
                           for i in range(blocks) for p, (o, i_) in zip(PROJ, shapes)}).requires_grad_(False)
    for m in stack.values():
        m.weight = nn.Parameter(m.weight.detach().normal_(0, 0.02), requires_grad=False)
    stack = to_nf4(stack)
    times = []
    for _ in range(4):  # the first is a warm-up
        model = nn.ModuleDict(dict(stack.items()))
        sync(device)
        t0 = time.perf_counter()
        nlora.inject(model, "all-linear", rank=rank, alpha=rank, init="nystrom", preserve_output=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        nlora.unload(model)
    return statistics.median(times[1:])


def plot(result, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    rows = result["rows"]
    ax.barh([r["variant"] for r in rows], [r["x_nf4_floor"] for r in rows], color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("training step time, x NF4 floor")
    ax.set_title(result["title"], fontsize=8)
    save(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4x2048")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    from transformers import LlamaConfig

    if args.tiny:
        device, rank, layers, blocks, name, shape = "cpu", 8, 2, 2, "four_bit_tiny", "2x32"
        dims = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
    else:
        device, rank, layers, blocks, name, shape = "cuda", 128, 8, 32, "four_bit", args.shape
        dims = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    cfg = LlamaConfig(**dims, num_hidden_layers=layers, vocab_size=256, use_cache=False, attn_implementation="sdpa")
    batch, seq = map(int, shape.split("x"))
    x = torch.randn(batch, seq, cfg.hidden_size, device=device, dtype=torch.bfloat16).requires_grad_(True)
    args.rank = rank
    models = {n: build(n, cfg, rank, device) for n in VARIANTS}
    ms = time_rounds(models, (x, None), step, args, device, warmup=2)  # (inputs_embeds, no labels)
    del models
    peak = {n: peak_gib(n, cfg, (x, None), args, build) for n in VARIANTS} if device == "cuda" else {}
    ckpt = {n: peak_gib(n, cfg, (x, None), args, build_checkpointed) for n in VARIANTS} if device == "cuda" else {}
    title = (f"{layers} LLaMA layers (hidden {cfg.hidden_size}), torchao NF4 base, r = alpha = {rank} on all 7 "
             f"projections, {shape} tokens, {device}")
    rows = [{"variant": n, "ms_per_step": statistics.median(v), "ms_rounds": v,
             "x_nf4_floor": statistics.median(a / b for a, b in zip(v, ms["NF4 floor"])), "peak_gib": peak.get(n),
             "peak_x_nlora_bf16": peak[n] / peak["NLoRA on bf16"] if peak else None, "peak_ckpt_gib": ckpt.get(n),
             "peak_ckpt_x_nlora_bf16": ckpt[n] / ckpt["NLoRA on bf16"] if ckpt else None} for n, v in ms.items()]
    init_s = init_seconds(blocks, cfg.hidden_size, cfg.intermediate_size, rank, device)
    result = {"benchmark": "four_bit", "title": title, "machine": machine(device), "rank": rank, "layers": layers,
              "shape": shape, "rows": rows, "init_blocks": blocks, "init_nystrom_preserve_s": init_s}
    print(title)
    print(f"{'variant':<28} {'ms/step':>9} {'x NF4 floor':>12} {'peak GiB':>9} {'x bf16 NLoRA':>13} "
          f"{'checkpointed: peak GiB':>23} {'x bf16 NLoRA':>13}")
    for r in rows:
        gib, mem, ckpt_gib, ckpt_mem = ("-" if r[k] is None else f"{r[k]:.3f}" for k in (
            "peak_gib", "peak_x_nlora_bf16", "peak_ckpt_gib", "peak_ckpt_x_nlora_bf16"))
        print(f"{r['variant']:<28} {r['ms_per_step']:>9.2f} {r['x_nf4_floor']:>12.3f} {gib:>9} {mem:>13} "
              f"{ckpt_gib:>23} {ckpt_mem:>13}")
    print(f"init: nlora.inject(nystrom, preserve_output) of {blocks} x 7 NF4 Linears: {init_s:.3f} s")
    write(result, args.out, name, plot)


if __name__ == "__main__":
    main()
