"""The main job: fine-tune MiniLM-L6 on Rotten Tomatoes sentiment with LoRA, SLoRA, NLoRA and IntTune, against
the classifier head alone on the frozen encoder, at equal step budgets; sized for 2 CPU cores (< 5 minutes).

    bash demo.sh      # installs what is missing, then runs this
    python demo.py    # if the packages are already there

Every training run and every held-out evaluation shows a progress bar. Prints a table (method, trainable params,
init time, final train loss, held-out accuracy, time), saves a loss-curve PNG and writes JSON, both to the
untracked ``out/`` folder (``--out-dir`` to change it).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from experiments import rt_sentiment as rt

OUT = Path(__file__).resolve().parent / "out"
DEMO_METHODS = ["head-only", "lora", "slora", "nlora", "inttune"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=DEMO_METHODS, choices=list(rt.METHODS))
    ap.add_argument("--steps", type=int, default=120, help="training steps per method (equal budget)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3, help="base LR (head and adapters; IntTune's N gets 10x)")
    ap.add_argument("--rank", type=int, default=8, help="adapter rank; alpha = rank as in the paper")
    ap.add_argument("--max-len", type=int, default=40, help="tokens per snippet (the median snippet has 26)")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out snippets (fixed split, never trained on)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads. 1 by default: at batch 16 a second thread bought nothing on a 2-core "
                         "machine shared with other jobs (0.31 s/step with 1 thread, 0.50-0.55 with 2), and spinning "
                         "OpenMP threads made a contended 2-thread run 3x slower; try 2 on an idle machine")
    ap.add_argument("--out-dir", type=Path, default=OUT, help="where the JSON and the PNG go (default: out/)")
    ap.add_argument("--tag", default="demo")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    device = torch.device("cpu")
    texts, labels = rt.load_rotten_tomatoes()
    tok, encoder = rt.load_encoder()
    data = rt.encode(tok, texts, labels, args.max_len)
    split = rt.split_indices(len(data), args.heldout)
    train, heldout = data.subset(split["train"]), data.subset(split["test"])
    print(f"MiniLM-L6 ({sum(p.numel() for p in encoder.parameters()):,} params) on Rotten Tomatoes: "
          f"{len(train):,} train / {len(heldout):,} held-out snippets (chance = majority class "
          f"{max(heldout.labels.float().mean().item(), 1 - heldout.labels.float().mean().item()):.1%}); "
          f"{args.steps} steps x batch {args.batch}, r={args.rank}, lr={args.lr:g} (IntTune N: x10), "
          f"{torch.get_num_threads()} CPU threads; setup {time.perf_counter() - t_start:.1f}s")
    rows = []
    for name in args.methods:
        method = rt.METHODS[name]
        t0, c0 = time.perf_counter(), time.process_time()
        model, init_s = rt.build(method, copy.deepcopy(encoder), rank=args.rank, seed=args.seed)
        trainable, total = rt.nlora.count_parameters(model)
        with tqdm(total=args.steps, desc=f"{name:10s} train", unit="step", leave=True) as bar:
            res = rt.train_run(model, train, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                               device=device, lr_mult=method.lr_mult, progress=bar)
        t1 = time.perf_counter()
        if "diverged_at" in res:
            res["heldout_acc"] = float("nan")
        else:
            with tqdm(total=len(heldout), desc=f"{name:10s} eval ", unit="snippet", leave=True) as bar:
                res["heldout_acc"] = rt.accuracy(model, heldout, device, progress=bar)
        res["eval_s"] = time.perf_counter() - t1
        rows.append({"method": name, "init": method.init, "train": method.train, "lr": args.lr * method.lr_mult,
                     "trainable": trainable, "total": total, "init_s": init_s,
                     "final_loss": rt.final_loss(res["losses"]), "heldout_acc": res["heldout_acc"],
                     "time_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "train_s": res["train_s"],
                     "eval_s": res["eval_s"], "losses": res["losses"]})
        del model
    total_s, total_cpu_s = time.perf_counter() - t_start, time.process_time()
    print(f"\n{'method':10s} {'trainable':>10s} {'init s':>8s} {'final loss':>10s} {'held-out acc':>12s} "
          f"{'time s':>7s} {'CPU s':>7s}")
    for r in rows:
        print(f"{r['method']:10s} {r['trainable']:>10,d} {r['init_s']:8.3f} {r['final_loss']:10.4f} "
              f"{100 * r['heldout_acc']:11.1f}% {r['time_s']:7.1f} {r['cpu_s']:7.1f}")
    print(f"total {total_s:.0f}s wall, {total_cpu_s:.0f} CPU-seconds (final loss = mean of the last 10% of steps; "
          f"time = init + training + held-out evaluation)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "rank": args.rank, "alpha": args.rank,
            "max_len": args.max_len, "heldout": len(heldout), "train": len(train), "seed": args.seed,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "total_s": total_s, "total_cpu_s": total_cpu_s, "targets": rt.TARGETS}
    (args.out_dir / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    plot(rows, meta, args.out_dir / f"{args.tag}_loss.png")
    print(f"wrote {args.out_dir / (args.tag + '.json')} and {args.out_dir / (args.tag + '_loss.png')}")


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Training-loss curves (moving average) of every method on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(5, meta["steps"] // 15)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.plot(range(1, len(r["losses"]) + 1), rt.smooth(r["losses"], window), "--" if r["init"] is None else "-",
                label=f"{r['method']} ({100 * r['heldout_acc']:.1f}% held-out)")
    ax.set(xlabel="step", ylabel=f"train loss ({window}-step moving average)",
           title=f"MiniLM-L6 on Rotten Tomatoes, r={meta['rank']}, batch {meta['batch']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
