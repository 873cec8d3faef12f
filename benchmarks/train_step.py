"""Training-step time and peak memory: nlora vs PEFT on 8 LLaMA-2-7B-shaped decoder layers (GPU, bf16).

Every variant is its own model from the same seed, fed random inputs_embeds (requires_grad, so the frozen floor has a
backward too): ``--head lm`` (default) a LlamaForCausalLM with LLaMA-2's 32,000-token head and HF's cross-entropy on
random labels, the setup of the targets' reference figures; ``--head none`` the decoder stack alone, loss = mean of
the squared outputs. r = alpha = 128 on all 7 projections of every layer (never the head); a plain eager zero_grad /
forward / backward / AdamW step.
3 warm-up steps per variant, then interleaved rounds of --steps steps per variant; medians over rounds. Peak memory:
a separate pass, one variant at a time. Details: docs/benchmarks.md.

  python3 benchmarks/train_step.py [--shapes 4x2048 2x1024] [--variants ...] [--head lm|none] [--steps 10]
                                   [--rounds 3] [--out DIR]
  python3 benchmarks/train_step.py --tiny     # CPU smoke test: hidden 64, 2 layers, 2x32 tokens, r=8, fp32
"""

import argparse
import gc
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import nlora  # noqa: E402
from benchmarks.common import machine, pyplot, save, time_rounds, write  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from transformers/PEFT

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {  # name -> nlora.inject keyword arguments, "peft-bf16" / "peft-default", or None (no adapters)
    "floor": None,
    "nlora NLoRA": dict(init="nystrom"),
    "nlora SLoRA": dict(init="slora"),
    "nlora LoRA": dict(init="lora"),
    "nlora IntTune": dict(init="nystrom", train="middle"),
    "nlora NLoRA bf16": dict(init="nystrom", adapter_dtype=torch.bfloat16),
    "PEFT LoRA bf16": "peft-bf16",
    "PEFT default": "peft-default",
}



LM_VOCAB = 32000  # LLaMA-2's vocabulary: --head lm; --head none builds a LlamaModel with a 256-entry (unused) table


def with_head(cfg) -> bool:
    """Whether ``cfg`` is the LM-head setup (a LlamaForCausalLM trained on labels), not the decoder stack alone."""
    return cfg.vocab_size == LM_VOCAB


def optimizer(model, device):
    """Fused (on CUDA) AdamW, lr 1e-4, over ``model``'s trainable parameters; ``None`` when nothing trains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, fused=(device == "cuda")) if params else None


def build(name, cfg, rank, device, dtype):
    """A fresh model of ``cfg`` (seed 0) with variant ``name``'s adapters, and its optimizer (None: nothing trains)."""
    from transformers import LlamaForCausalLM, LlamaModel

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = (LlamaForCausalLM if with_head(cfg) else LlamaModel)(cfg).requires_grad_(False).train()
    torch.set_default_dtype(torch.float32)
    kind = VARIANTS[name]
    if isinstance(kind, dict):
        nlora.inject(model, "all-linear", rank=rank, alpha=rank, **kind)
    elif kind is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=PROJ, lora_dropout=0.0)
        model = get_peft_model(model, config, autocast_adapter_dtype=(kind == "peft-default"))
    return model, optimizer(model, device)


def step(model, opt, batch):
    """One training step on ``batch = (inputs_embeds, labels)``; labels ``None``: the decoder stack's squared mean."""
    x, labels = batch
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    x.grad = None
    out = model(inputs_embeds=x, labels=labels)
    loss = out.loss if labels is not None else out.last_hidden_state.float().square().mean()
    loss.backward()
    if opt is not None:
        opt.step()


def peak_gib(name, cfg, batch, args, make=None):
    """CUDA peak allocation of building variant ``name`` (by ``make(name, cfg, rank, device, dtype)``, default
    ``build``) and running 2 steps on ``batch``, above what was allocated before."""
    batch[0].grad = None
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model, opt = (make or build)(name, cfg, args.rank, "cuda", torch.bfloat16)
    for _ in range(2):
        step(model, opt, batch)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def measure_shape(shape, names, cfg, args, device, dtype):
    batch, seq = map(int, shape.split("x"))
    gen = torch.Generator(device).manual_seed(1)
    x = torch.randn(batch, seq, cfg.hidden_size, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    labels = torch.randint(cfg.vocab_size, (batch, seq), device=device, generator=gen) if with_head(cfg) else None
    models = {n: build(n, cfg, args.rank, device, dtype) for n in names}
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, (m, _) in models.items()}
    ms = time_rounds(models, (x, labels), step, args, device)
    del models
    peak = {n: peak_gib(n, cfg, (x, labels), args) for n in names} if device == "cuda" else {}

    def ratio(n, ref):  # median over rounds of the same round's ratio
        return statistics.median(a / b for a, b in zip(ms[n], ms[ref])) if ref in ms else None

    rows = [{"variant": n, "trainable_params": trainable[n], "ms_per_step": statistics.median(ms[n]),
             "ms_per_step_rounds": ms[n], "x_floor": ratio(n, "floor"), "x_peft_bf16": ratio(n, "PEFT LoRA bf16"),
             "peak_gib": peak.get(n),
             "peak_x_floor": peak[n] / peak["floor"] if n in peak and "floor" in peak else None} for n in names]
    return {"shape": shape, "batch": batch, "seq": seq, "rows": rows}


def plot(result, path):
    plt = pyplot()

    fig, axes = plt.subplots(1, len(result["shapes"]), figsize=(max(9, 6 * len(result["shapes"])), 4), squeeze=False)
    for ax, s in zip(axes[0], result["shapes"]):
        rows = [r for r in s["rows"] if r["x_floor"] is not None]
        ax.barh([r["variant"] for r in rows], [r["x_floor"] for r in rows], color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("training step time, x floor (frozen model, no adapters)")
        ax.set_title(f"{s['batch']} x {s['seq']} tokens")
    fig.suptitle(result["title"], fontsize=10)
    save(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", help="batch x tokens, e.g. 4x2048 (default: 4x2048 2x1024; --tiny: 2x32)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--layers", type=int, help="decoder layers (default 8; --tiny: 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--head", choices=["lm", "none"], default="lm",
                   help="lm: LlamaForCausalLM with a 32,000-token head and cross-entropy; none: the decoder stack")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny fp32 model, r=8")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    from transformers import LlamaConfig

    if args.tiny:
        device, dtype, args.rank, name = "cpu", torch.float32, 8, "train_step_tiny"
        dims = dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4)
        shapes, layers = args.shapes or ["2x32"], args.layers or 2
    else:
        device, dtype, args.rank, name = "cuda", torch.bfloat16, 128, "train_step"
        dims = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
        shapes, layers = args.shapes or ["4x2048", "2x1024"], args.layers or 8
    cfg = LlamaConfig(**dims, num_hidden_layers=layers, vocab_size=LM_VOCAB if args.head == "lm" else 256,
                      use_cache=False, attn_implementation="sdpa")
    title = (f"{layers} LLaMA layers (hidden {cfg.hidden_size}, MLP {cfg.intermediate_size})"
             f"{' + LM head (32,000)' if args.head == 'lm' else ''}, {str(dtype)[6:]}, "
             f"r = alpha = {args.rank} on all 7 projections, {device}")
    print(title)
    result = {"benchmark": "train_step", "title": title, "machine": machine(device), "device": device,
              "dtype": str(dtype), "rank": args.rank, "alpha": args.rank, "layers": layers,
              "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "heads": cfg.num_attention_heads,
              "attention": cfg._attn_implementation, "head": args.head, "steps_per_round": args.steps,
              "rounds": args.rounds, "warmup_steps": 3, "adamw_fused": device == "cuda", "shapes": []}
    for shape in shapes:
        s = measure_shape(shape, args.variants, cfg, args, device, dtype)
        result["shapes"].append(s)
        print(f"\n{shape} tokens: median of {args.rounds} rounds x {args.steps} steps")
        print(f"{'variant':<18} {'trainable':>11} {'ms/step':>9} {'x floor':>8} {'x PEFT bf16':>11} "
              f"{'peak GiB':>9} {'mem x floor':>11}")
        for r in s["rows"]:
            x_floor, x_peft, gib, mem = ("-" if r[k] is None else f"{r[k]:.3f}"
                                         for k in ("x_floor", "x_peft_bf16", "peak_gib", "peak_x_floor"))
            print(f"{r['variant']:<18} {r['trainable_params']:>11,} {r['ms_per_step']:>9.2f} {x_floor:>8} "
                  f"{x_peft:>11} {gib:>9} {mem:>11}")
    write(result, args.out, name, plot)


if __name__ == "__main__":
    main()
