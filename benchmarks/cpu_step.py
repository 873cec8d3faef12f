"""CPU training-step time: nlora vs PEFT LoRA in one process on a small LLaMA model (CI-class hardware).

Model: transformers LlamaForCausalLM (hidden 256, MLP 688, 4 layers, 4 heads, vocab 1000, fp32, random weights, seed
0), r = alpha = 8 on every linear layer but lm_head, batch 4 x 128 random tokens, causal-LM cross-entropy, AdamW.
Each variant is its own model from the same seed. A plain eager loop: zero_grad, forward, backward, step.
Timing: 3 warm-up steps per variant, then --rounds interleaved rounds (round-robin over the variants) of --steps
steps each, timed with time.perf_counter; the table shows the median over rounds of ms/step and of the per-round
ratio to PEFT LoRA. torch.set_num_threads(--threads, default 2).

  python3 benchmarks/cpu_step.py [--rounds 5] [--steps 10] [--threads 2] [--out DIR]
"""

import argparse
import os
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
VARIANTS = {  # name -> nlora.inject keyword arguments, or "peft"
    "nlora LoRA": dict(init="lora"),
    "nlora NLoRA (preserve_output)": dict(init="nystrom", preserve_output=True),
    "nlora IntTune": dict(init="nystrom", train="middle"),
    "PEFT LoRA": "peft",
}
RANK = 8



def build(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1000, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).train()
    kind = VARIANTS[name]
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=PROJ, lora_dropout=0.0))
    else:
        nlora.inject(model, "all-linear", rank=RANK, alpha=RANK, **kind)  # "all-linear" leaves lm_head out
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def step(model, opt, ids):
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = machine("cpu")  # before the runs: its load_avg_1m is the load at the start
    ids = torch.randint(0, 1000, (4, 128), generator=torch.Generator().manual_seed(1))
    models = {n: build(n) for n in VARIANTS}
    ms = time_rounds(models, ids, step, args, "cpu")
    rows = [{"variant": n, "trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad),
             "ms_per_step": statistics.median(ms[n]), "ms_per_step_rounds": ms[n],
             "x_peft_lora": statistics.median(a / b for a, b in zip(ms[n], ms["PEFT LoRA"]))}
            for n, (m, _) in models.items()]
    info["load_avg_1m_end"] = os.getloadavg()[0]  # other processes on the machine disturb the timings
    result = {"benchmark": "cpu_step", "machine": info, "model": "LlamaForCausalLM hidden 256, MLP 688, "
              "4 layers, 4 heads, vocab 1000, fp32", "rank": RANK, "alpha": RANK, "batch": 4, "seq": 128,
              "targets": "all 28 decoder linear layers (lm_head excluded)",
              "optimizer": "AdamW lr 1e-4, torch defaults",
              "warmup_steps": 3, "rounds": args.rounds, "steps_per_round": args.steps, "rows": rows}
    print(f"{result['model']}, r = alpha = {RANK}, {result['batch']} x {result['seq']} tokens, "
          f"{args.threads} threads, {result['machine']['cpu']}: median of {args.rounds} rounds x {args.steps} steps")
    print(f"load average (1 min) at start / end: {info['load_avg_1m']:.2f} / {info['load_avg_1m_end']:.2f}")
    print(f"{'variant':<30} {'trainable':>10} {'ms/step':>9} {'x PEFT LoRA':>12}  rounds (ms/step)")
    for r in rows:
        print(f"{r['variant']:<30} {r['trainable_params']:>10,} {r['ms_per_step']:>9.2f} "
              f"{r['x_peft_lora']:>12.3f}  " + " ".join(f"{v:.1f}" for v in r["ms_per_step_rounds"]))
    write(result, args.out, "cpu_step", plot)


def plot(result: dict, path) -> None:
    """Bars of ms/step per variant, each labelled with its ratio to PEFT LoRA."""
    rows, title = result["rows"], result["model"]
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.2))
    bars = ax.barh([r["variant"] for r in rows], [r["ms_per_step"] for r in rows], color="#4C72B0")
    ax.bar_label(bars, labels=[f"{r['x_peft_lora']:.2f}x PEFT" for r in rows], padding=3, fontsize=8)
    ax.set_xlabel("ms per training step (median of rounds)")
    ax.set_title(f"CPU step, {title}", fontsize=8)
    ax.invert_yaxis()
    save(fig, path)


if __name__ == "__main__":
    main()
