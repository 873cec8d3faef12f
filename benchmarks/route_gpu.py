"""Mixed-adapter batches: nlora.route over K IntTune adapters vs PEFT's adapter_names over K LoRA adapters (GPU).

8 LLaMA-2-7B-shaped layers, r = 128 on all 7 projections, bf16 weights and adapters, inference mode. Each row of a
batch uses one of K adapters (row i -> adapter i mod K). Every figure is a ratio to the same library's forward of the
same batch with ONE adapter active (set_adapter, no routing), and nlora's routed time is also compared with PEFT's
mixed batch at the same K. nlora's route is entered once per batch (its entry time is reported on its own), as
around a generate() call. Prefill: 64 sequences x 128 tokens. Decode: one new token for each of 1,024 sequences
with a KV cache of 64 tokens. Medians of --rounds interleaved rounds of --reps forwards.

  python3 benchmarks/route_gpu.py [--rounds 3] [--reps 10] [--out DIR]
  python3 benchmarks/route_gpu.py --tiny     # CPU smoke test: hidden 64, 2 layers, r = 8, fp32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import nlora  # noqa: E402
from benchmarks.common import machine, pyplot, save, sync, write  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(cfg, device, dtype):
    from transformers import LlamaModel

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaModel(cfg).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    return model


def nlora_model(cfg, k, rank, device, dtype):
    """K IntTune adapters on the paper's init (t0 .. t{K-1}); each stores only its own N (random values)."""
    model = base_model(cfg, device, dtype)
    nlora.inject(model, "all-linear", rank=rank, alpha=rank, init="nystrom", train="middle", adapter="t0",
                 adapter_dtype=dtype)
    g = torch.Generator(device).manual_seed(1)
    for layer in nlora.adapter_layers(model).values():
        first = layer.adapters["t0"]
        for i in range(1, k):
            layer.add(f"t{i}", copy.deepcopy(first))
        with torch.no_grad():
            for adapter in layer.adapters.values():
                adapter.lora_N.copy_(torch.randn(adapter.lora_N.shape, generator=g, device=device) * 0.02)
    nlora.set_adapter(model, "t0")
    return model


def peft_model(cfg, k, rank, device, dtype):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=PROJ, lora_dropout=0.0)
    model = get_peft_model(base_model(cfg, device, dtype), config, adapter_name="t0", autocast_adapter_dtype=False)
    for i in range(1, k):
        model.add_adapter(f"t{i}", config)
    model.set_adapter("t0")
    return model.eval()


def timed(fn, reps, device):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / reps


def runner(lib, model, names, ids, cache_len):
    """A zero-argument function running one forward of ``ids`` (PEFT: with ``adapter_names=names``; nlora: called
    inside ``nlora.route(model, names)``, entered by the caller). With ``cache_len``, a decode step: the KV cache of
    a ``cache_len``-token prefill is built once and the new token is cropped off after each step."""
    def forward(x, **kw):
        return model(input_ids=x, adapter_names=names, **kw) if lib == "peft" and names else model(input_ids=x, **kw)

    if not cache_len:
        return lambda: forward(ids, use_cache=False)
    context = torch.randint(0, 256, (ids.shape[0], cache_len), device=ids.device, generator=torch.Generator(
        ids.device).manual_seed(2))
    cache = forward(context, use_cache=True).past_key_values

    def step():
        forward(ids, past_key_values=cache, use_cache=True)
        cache.crop(-ids.shape[1])  # drop the new token again (negative: accepted by old and new transformers)
    return step


def routed(lib, model, names):
    """nlora's route for ``names`` (nothing for PEFT or one adapter)."""
    return nlora.route(model, names) if lib == "nlora" and names else contextlib.nullcontext()


def measure(case, lib, k_values, cfg, args, device, dtype):
    """ms per forward for one adapter and for each K of ``k_values`` (interleaved over rounds), and ms to enter
    each route (once per batch: before its prefill and all its decode steps)."""
    batch, seq, cache_len = case
    model = (peft_model if lib == "peft" else nlora_model)(cfg, max(k_values), args.rank, device, dtype)
    ids = torch.randint(0, 256, (batch, seq), device=device, generator=torch.Generator(device).manual_seed(3))
    routes = {"one adapter": None} | {f"K={k}": [f"t{i % k}" for i in range(batch)] for k in k_values}
    ms, enter = {}, {}
    with torch.inference_mode():
        fns = {}
        for key, names in routes.items():
            with routed(lib, model, names):
                fns[key] = runner(lib, model, names, ids, cache_len)
                fns[key]()
        for _ in range(args.rounds):
            for key, names in routes.items():
                sync(device)
                t0 = time.perf_counter()
                with routed(lib, model, names):
                    sync(device)
                    enter.setdefault(key, []).append((time.perf_counter() - t0) * 1e3)
                    ms.setdefault(key, []).append(timed(fns[key], args.reps, device))
    del model, fns
    if device == "cuda":
        torch.cuda.empty_cache()
    return ms, {k: statistics.median(v) for k, v in enter.items()}


def plot(result, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(result["cases"]), figsize=(11, 4), squeeze=False)
    for ax, case in zip(axes[0], result["cases"]):
        for lib, color in (("nlora", "tab:blue"), ("peft", "tab:orange")):
            rows = [r for r in case["rows"] if r["library"] == lib and r["K"]]
            ax.plot([r["K"] for r in rows], [r["x_one_adapter"] for r in rows], "o-", color=color,
                    label=f"{lib} ({'IntTune, route' if lib == 'nlora' else 'LoRA, adapter_names'})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("distinct adapters K in the batch")
        ax.set_ylabel("forward time, x one adapter")
        ax.set_title(case["name"], fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(result["title"], fontsize=9)
    save(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    from transformers import LlamaConfig

    if args.tiny:
        device, dtype, args.rank, name, layers = "cpu", torch.float32, 8, "route_gpu_tiny", 2
        dims = dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4)
        cases = [("prefill", (8, 16, 0), [1, 4, 8], [4, 8]), ("decode", (32, 1, 8), [1, 8, 32], [8])]
    else:
        device, dtype, args.rank, name, layers = "cuda", torch.bfloat16, 128, "route_gpu", 8
        dims = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
        cases = [("prefill", (64, 128, 0), [1, 16, 64], [16, 64]), ("decode", (1024, 1, 64), [1, 64, 1024], [64])]
    cfg = LlamaConfig(**dims, num_hidden_layers=layers, vocab_size=256, attn_implementation="sdpa")
    title = (f"{layers} LLaMA layers (hidden {cfg.hidden_size}), {str(dtype)[6:]}, r = alpha = {args.rank} on all "
             f"linear layers, {device}, inference mode")
    print(title)
    result = {"benchmark": "route_gpu", "title": title, "machine": machine(device), "rank": args.rank,
              "layers": layers, "rounds": args.rounds, "reps": args.reps, "cases": []}
    for case_name, shape, k_nlora, k_peft in cases:
        batch, seq, cache_len = shape
        label = (f"{case_name}: {batch} x {seq} tokens" if not cache_len
                 else f"{case_name}: {batch} sequences x 1 token, KV cache {cache_len}")
        ms, enter = {}, {}
        for lib, ks in (("nlora", k_nlora), ("peft", k_peft)):
            ms[lib], enter[lib] = measure(shape, lib, ks, cfg, args, device, dtype)
        rows = []
        for lib, runs in ms.items():
            for key, values in runs.items():
                k = None if key == "one adapter" else int(key[2:])
                ratio = statistics.median(a / b for a, b in zip(values, runs["one adapter"]))
                peft_k = ms["peft"].get(key) if lib == "nlora" and k else None
                vs_peft = statistics.median(b / a for a, b in zip(values, peft_k)) if peft_k else None
                rows.append({"library": lib, "K": k, "ms": statistics.median(values), "ms_rounds": values,
                             "x_one_adapter": ratio, "peft_mixed_over_nlora": vs_peft,
                             "route_entry_ms": enter[lib][key] if lib == "nlora" and k else None})
        result["cases"].append({"name": label, "batch": batch, "seq": seq, "cache": cache_len, "rows": rows})
        print(f"\n{label}\n{'library':<7} {'K':>5} {'ms':>9} {'x one adapter':>14} {'PEFT mixed / nlora':>19} "
              f"{'route entry ms':>15}")
        for r in rows:
            vs, entry = ("-" if r[k] is None else f"{r[k]:.2f}" for k in ("peft_mixed_over_nlora", "route_entry_ms"))
            print(f"{r['library']:<7} {r['K'] or 'one':>5} {r['ms']:>9.2f} {r['x_one_adapter']:>14.3f} {vs:>19} "
                  f"{entry:>15}")
    write(result, args.out, name, plot)


if __name__ == "__main__":
    main()
