"""Inference forward time, nlora vs HF PEFT: unmerged adapters, merged adapters and the plain base.

LLaMA-style layers of 7B dims in bf16, r=128 on every linear, ``torch.inference_mode``; a prefill-sized batch
(4 x 512 tokens, device-bound) and a single token (1 x 1, launch-bound). Same model object, same process.

    python benchmarks/bench_infer.py --layers 2 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import nlora
from _common import build_llama, cuda_step_times, free_memory, llama_config, machine_info, table, write_json
from bench_train import Setup

VARIANTS = {  # name -> (kind, options, merged)
    "base (no adapters)": ("floor", {}, False),
    "nlora-nystrom unmerged": ("nlora", {"init": "nystrom"}, False),
    "nlora-nystrom unmerged (unfused a8d7078 fwd)": ("nlora", {"init": "nystrom", "unfused": True}, False),
    "nlora-lora unmerged": ("nlora", {"init": "lora"}, False),
    "peft-lora unmerged (bf16 adapters)": ("peft", {"autocast_adapter_dtype": False}, False),
    "peft-lora unmerged (fp32 adapters, default)": ("peft", {"autocast_adapter_dtype": True}, False),
    "nlora-nystrom merged (wrappers kept)": ("nlora", {"init": "nystrom"}, True),
    "peft-lora merged (wrappers kept)": ("peft", {"autocast_adapter_dtype": False}, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--shapes", nargs="+", default=["4x512", "1x1"])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--name", default="infer_7b_cuda")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    model = build_llama(llama_config("7b", args.layers), "cuda", torch.bfloat16)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    xs = {s: torch.randn(*s, model.config.hidden_size, device="cuda", dtype=torch.bfloat16) for s in shapes}
    samples: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for name, (kind, opts, merged) in VARIANTS.items():
            free_memory()
            setup = Setup(model, kind, opts, args.rank)
            if merged:
                if kind == "nlora":
                    nlora.merge(setup.run_model)
                else:
                    setup.run_model.merge_adapter()
            with torch.inference_mode():
                for s, x in xs.items():
                    ms = cuda_step_times(lambda: setup.run_model(inputs_embeds=x), args.warmup, args.iters)
                    samples.setdefault((name, s), []).append(statistics.median(ms))
            if merged and kind == "peft":
                setup.run_model.unmerge_adapter()
            setup.close()
    records, rows = [], []
    for s in shapes:
        base = statistics.mean(samples[("base (no adapters)", s)])
        for name in VARIANTS:
            vals = samples[(name, s)]
            ms = statistics.mean(vals)
            records.append({"variant": name, "shape": f"{s[0]}x{s[1]}", "ms": ms, "round_medians_ms": vals,
                            "x_base": ms / base})
            rows.append([f"{s[0]}x{s[1]}", name, f"{ms:.3f}", "/".join(f"{v:.3f}" for v in vals), f"{ms / base:.3f}"])
    print(table(rows, ["tokens", "variant", "ms", "per round", "x base"]))
    write_json(args.name, {"benchmark": "inference", "shape": "7b", "layers": args.layers, "rank": args.rank,
                           "base_dtype": "bfloat16", "machine": machine_info("cuda"), "args": vars(args),
                           "results": records, "total_seconds": time.perf_counter() - t0,
                           "notes": "ms = mean over rounds of the median of CUDA-event times per forward "
                                    "(inference_mode, after warm-up)."})


if __name__ == "__main__":
    main()
