"""The fine-tuning study: do NLoRA / SLoRA / IntTune beat LoRA on a real model and real data?

Two tasks, every method of each, a learning-rate sweep per method, several seeds each:
``--task rt``: MiniLM-L6 (all-MiniLM-L6-v2) on Rotten Tomatoes sentiment (``rt_sentiment.METHODS``, accuracy);
``--task gsm``: SmolLM2-135M-Instruct on GSM-symbolic word problems from held-out templates
(``gsm_smollm.METHODS``, exact match of the final answer after greedy chain-of-thought decoding).
The learning rate of each method is chosen on a validation split; the held-out test metric (mean +/- std over
seeds) is reported at that rate, with the number of steps each method needs to reach LoRA's final training loss (the paper's
convergence claim). Runs are spread over worker processes (small models leave a GPU idle between kernel
launches) and stop starting new jobs at ``--budget-s``; the table says how many seeds finished.

    python -m experiments.study                  # full grid (meant for a GPU)
    python -m experiments.study --task gsm --workers 6 --budget-s 420   # the SmolLM2 half (GPU; see gsm_smollm)
    python -m experiments.study --quick          # a few steps of every method on CPU: checks the pipeline
    python -m experiments.study --aggregate runs.jsonl   # tables + JSON + plots from saved runs
    python -m experiments.study --export-assets DIR      # MiniLM as fp16 + the RT csv, to carry to a GPU box
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from experiments import rt_sentiment as rt

RESULTS = Path(__file__).resolve().parent / "results"
LRS = {  # base learning rates swept per method (IntTune's N trains at 10x these; the head at 1x)
    "head-only": [1e-3, 3e-3, 1e-2, 3e-2],
    **{m: [3e-4, 1e-3, 3e-3, 1e-2] for m in rt.METHODS if m != "head-only"},
    "pissa": [1e-4, 3e-4, 1e-3, 3e-3],  # PiSSA's factors carry the top singular values: it wants smaller steps
}


def jobs(methods: list[str], seeds: list[int], lrs: dict[str, list[float]]) -> list[dict]:
    """The grid, seed-major: every (method, lr) at seed 0 first, so a run cut short by the budget still
    covers every method. Runs without training (zero-shot) are deterministic: seed 0 only."""
    return [{"method": m, "lr": lr, "seed": s} for s in seeds for m in methods for lr in lrs[m]
            if not (lrs[m] == [0.0] and s != seeds[0])]


def init_change(model: rt.SentimentModel, data: rt.Encoded, device: torch.device) -> float:
    """Relative change of the encoder's output on 64 validation snippets caused by the adapters at init:
    ||h_init - h_pretrained|| / ||h_pretrained|| (0 for output-preserving inits, up to rounding)."""
    ids, mask, _ = data.batch(torch.arange(min(64, len(data))), device)
    with torch.no_grad():
        h = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        if not rt.nlora.adapter_layers(model):  # head-only: no adapters
            return 0.0
        with rt.nlora.disable_adapter(model):
            h0 = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    return float((h - h0).norm() / h0.norm())


class SentimentTask:
    """The study's Rotten Tomatoes task: shared state for one worker, and one (method, lr, seed) run."""

    name = "rt"
    title = "MiniLM-L6 on Rotten Tomatoes"
    metric = "acc"
    methods = rt.METHODS
    lrs = LRS
    defaults = {"steps": 400, "batch": 32, "rank": 8, "max_len": 64, "val": 1000, "test": 2000}

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        texts, labels = rt.load_rotten_tomatoes()
        tok, self.encoder = rt.load_encoder()
        self.encoder.to(device)
        data = rt.encode(tok, texts, labels, args.max_len)
        split = rt.split_indices(len(data), args.test, args.val)
        if args.quick:  # small subsets: the pipeline, not the numbers
            split = {k: v[:256] for k, v in split.items()}
        self.train, self.val, self.test = (data.subset(split[k]) for k in ("train", "val", "test"))

    def run(self, job: dict) -> dict:
        method = rt.METHODS[job["method"]]
        model, init_s = rt.build(method, copy.deepcopy(self.encoder), rank=self.args.rank_r, seed=job["seed"])
        change = init_change(model, self.val, self.device)
        res = rt.train_run(model, self.train, steps=self.args.steps, batch=self.args.batch, lr=job["lr"],
                           seed=job["seed"], device=self.device, lr_mult=method.lr_mult,
                           evals={"val": self.val, "test": self.test}, eval_every=self.args.eval_every)
        trainable, total = rt.nlora.count_parameters(model)
        return {**job, "init_s": init_s, "init_rel_change": change, "trainable": trainable, "total": total, **res}


def get_task(name: str):
    if name == "gsm":
        from experiments import gsm_smollm

        return gsm_smollm.Task
    return SentimentTask


def worker(args: argparse.Namespace) -> None:
    """Run this worker's share of the grid; one JSON line per finished run to ``args.out``."""
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(args.threads)
    deadline = args.start + args.budget_s
    task = get_task(args.task)(args, device)
    grid = jobs(args.methods, args.seeds, args.lr_grid)[args.worker_index::args.world]
    with open(args.out, "a") as f:
        for job in grid:
            if time.time() > deadline:
                print(f"[worker {args.worker_index}] budget reached; skipping the rest", flush=True)
                break
            row = task.run(job)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"[worker {args.worker_index}] {job['method']:16s} lr={job['lr']:.0e} seed={job['seed']} "
                  f"val={row['val_acc']:.4f} test={row['test_acc']:.4f} loss={final_loss(row['losses']):.4f} "
                  f"{row['train_s']:.1f}s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def final_loss(losses: list[float]) -> float:
    """rt.final_loss, NaN for a run without training steps."""
    return rt.final_loss(losses) if losses else float("nan")


EXTRA = ("test_iid_acc", "val_nll", "test_iid_nll", "test_nll")  # further held-out measures some tasks report


def _selection_key(s: dict) -> tuple[float, float, float]:
    """The LRs run with the most seeds first (a sweep on seed 0 whose best LR then ran more seeds), then the
    higher validation metric, then the lower validation NLL (where measured); NaN ranks last."""
    acc = s["val_acc"][0]
    nll = s.get("val_nll", (float("nan"), 0))[0]
    return (s["seeds"], -1.0 if math.isnan(acc) else acc, -math.inf if math.isnan(nll) else -nll)


def sweep_summary(rows: list[dict], order: list[str] | None = None) -> tuple[dict, list[dict]]:
    """Runs grouped by (method, lr), and one summary per group (seeds, mean +/- std of every metric), sorted by
    method (in ``order``, else by name) and learning rate."""
    by: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        by.setdefault((r["method"], r["lr"]), []).append(r)
    rank = (lambda m: order.index(m)) if order else (lambda m: m)
    sweep = []
    for (m, lr), rs in sorted(by.items(), key=lambda kv: (rank(kv[0][0]), kv[0][1])):
        sweep.append({"method": m, "lr": lr, "seeds": len(rs),
                      "val_acc": mean_std([r["val_acc"] for r in rs]), "test_acc": mean_std([r["test_acc"] for r in rs]),
                      "final_loss": mean_std([final_loss(r["losses"]) for r in rs]),
                      **{k: mean_std([r[k] for r in rs]) for k in EXTRA if k in rs[0]},
                      "diverged": sum("diverged_at" in r for r in rs)})
    return by, sweep


def best_per_method(sweep: list[dict]) -> dict[str, dict]:
    """Each method's best sweep entry by ``_selection_key`` (the first, i.e. the lowest LR, on a tie)."""
    best: dict[str, dict] = {}
    for s in sweep:
        cur = best.get(s["method"])
        if cur is None or _selection_key(s) > _selection_key(cur):
            best[s["method"]] = s
    return best


def best_lrs(rows: list[dict]) -> dict[str, list[float]]:
    """Each method's best learning rate in ``rows`` (same rule as ``aggregate``), as a one-LR grid."""
    return {m: [s["lr"]] for m, s in best_per_method(sweep_summary(rows)[1]).items()}


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(rows: list[dict], meta: dict, out_dir: Path, tag: str, task=None) -> dict:
    """Pick each method's LR on the validation metric (mean over seeds; ties: lower validation NLL where
    measured), report the test metric's mean +/- std there, steps to LoRA's final training loss, and write
    JSON + plots."""
    task = task or get_task(meta.get("task", "rt"))
    order = list(task.methods)
    window = max(5, meta["steps"] // 20)
    by, sweep = sweep_summary(rows, order)
    best = best_per_method(sweep)
    target = best["lora"]["final_loss"][0] if "lora" in best else None
    quarter = min(max(window, meta["steps"] // 4), meta["steps"])  # the early target: LoRA's smoothed loss a quarter of the way in
    early = (statistics.fmean(rt.smooth(r["losses"], window)[quarter - 1] for r in by[("lora", best["lora"]["lr"])])
             if "lora" in best else None)
    table = []
    for m in order:
        if m not in best:
            continue
        b = best[m]
        rs = by[(m, b["lr"])]
        reach = [rt.steps_to_reach(r["losses"], target, window) if target is not None else None for r in rs]
        hit = [x for x in reach if x is not None]
        reach_early = [rt.steps_to_reach(r["losses"], early, window) if early is not None else None for r in rs]
        hit_early = [x for x in reach_early if x is not None]
        at_quarter = [dict(r["acc_curve"]).get(quarter) for r in rs if r.get("acc_curve")]
        table.append({
            "method": m, "best_lr": b["lr"], "seeds": len(rs), "trainable": rs[0]["trainable"],
            "init_s": statistics.fmean(r["init_s"] for r in rs),
            "init_rel_change": statistics.fmean(r["init_rel_change"] for r in rs),
            "val_acc": b["val_acc"], "test_acc": b["test_acc"], "final_loss": b["final_loss"],
            "steps_to_lora_loss": (statistics.fmean(hit) if hit else None), "seeds_reaching": len(hit),
            "mean_loss": mean_std([statistics.fmean(r["losses"]) if r["losses"] else float("nan") for r in rs]),
            **{k: b[k] for k in EXTRA if k in b},
            "steps_to_lora_early_loss": (statistics.fmean(hit_early) if hit_early else None),
            "seeds_reaching_early": len(hit_early),
            "val_acc_at_quarter": mean_std([a for a in at_quarter if a is not None]),
            "s_per_step": statistics.fmean(r.get("s_per_step", float("nan")) for r in rs),
        })
    lrs = {m: sorted({r["lr"] for r in rows if r["method"] == m}) for m in order if any(r["method"] == m for r in rows)}
    result = {"meta": {**meta, "lrs": lrs, "runs": len(rows), "smoothing_window": window, "lora_final_loss_target": target,
                       "quarter_step": quarter, "lora_quarter_loss_target": early},
              "table": table, "sweep": sweep}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{tag}.json").write_text(json.dumps(result, indent=1))
    print_tables(result, task)
    plot(rows, best, meta, window, out_dir / f"{tag}_curves.png", task)
    plot_sweep(sweep, meta, out_dir / f"{tag}_lr_sweep.png", task)
    return result


def fmt(ms: tuple[float, float], pct: bool = True) -> str:
    m, s = ms
    if math.isnan(m):
        return "nan"
    return f"{100 * m:.2f} ± {100 * s:.2f}" if pct else f"{m:.4f} ± {s:.4f}"


def _reach(steps: float | None, hit: int, seeds: int) -> str:
    return "never" if steps is None else f"{steps:.0f} ({hit}/{seeds})"


def print_tables(result: dict, task) -> None:
    meta = result["meta"]
    metric = task.metric
    print(f"\n{task.title}: r={meta['rank']}, {meta['steps']} steps x batch {meta['batch']}, "
          f"seeds {meta['seeds']}, device {meta['device_name']}")
    print(f"LoRA's final train loss (target) = {meta['lora_final_loss_target'] or float('nan'):.4f}; its loss at step "
          f"{meta['quarter_step']} (early target) = {meta['lora_quarter_loss_target'] or float('nan'):.4f}; "
          f"steps counted on a {meta['smoothing_window']}-step moving average\n")
    head = f"{'method':16s} {'best lr':>8s} {'seeds':>5s} {'trainable':>9s} {'init s':>8s} {'init Δh':>8s} " \
           f"{'val ' + metric + ' %':>14s} {'test ' + metric + ' %':>14s} {'final loss':>16s} {'mean loss':>16s} {'steps→LoRA loss':>16s} " \
           f"{'steps→early':>12s} {'val@quarter %':>14s}" + (f" {'test NLL':>16s} {'iid ' + metric + ' %':>14s} {'iid NLL':>16s}" if result["table"] and "test_iid_acc" in result["table"][-1] else "")
    print(head)
    print("-" * len(head))
    for t in result["table"]:
        reach = _reach(t["steps_to_lora_loss"], t["seeds_reaching"], t["seeds"])
        print(f"{t['method']:16s} {t['best_lr']:8.0e} {t['seeds']:5d} {t['trainable']:9,d} {t['init_s']:8.4f} "
              f"{t['init_rel_change']:8.4f} {fmt(t['val_acc']):>14s} {fmt(t['test_acc']):>14s} "
              f"{fmt(t['final_loss'], False):>16s} {fmt(t['mean_loss'], False):>16s} {reach:>16s} "
              f"{_reach(t['steps_to_lora_early_loss'], t['seeds_reaching_early'], t['seeds']):>12s} "
              f"{fmt(t['val_acc_at_quarter']):>14s}" + (f" {fmt(t['test_nll'], False):>16s} {fmt(t['test_iid_acc']):>14s} {fmt(t['test_iid_nll'], False):>16s}" if "test_iid_acc" in t else ""))
    print("\nLR sweep (mean ± std over seeds):")
    for s in result["sweep"]:
        print(f"  {s['method']:16s} lr={s['lr']:.0e} n={s['seeds']} val {fmt(s['val_acc'])}  test {fmt(s['test_acc'])}  "
              f"loss {fmt(s['final_loss'], False)}" + (f"  val NLL {fmt(s['val_nll'], False)}" if "val_nll" in s else "")
              + (f"  DIVERGED x{s['diverged']}" if s["diverged"] else ""))


def plot(rows: list[dict], best: dict, meta: dict, window: int, path: Path, task) -> None:
    """Smoothed training loss (mean over seeds) and validation accuracy against steps, best LR per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for m in task.methods:
        if m not in best:
            continue
        rs = [r for r in rows if r["method"] == m and r["lr"] == best[m]["lr"] and "diverged_at" not in r]
        if not rs or not rs[0]["losses"]:
            continue
        curves = [rt.smooth(r["losses"], window) for r in rs]
        mean = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
        style = "--" if task.methods[m].init is None else "-"
        ax1.plot(range(1, len(mean) + 1), mean, style, label=f"{m} (lr {best[m]['lr']:.0e})")
        if rs[0].get("acc_curve"):
            xs = [p[0] for p in rs[0]["acc_curve"]]
            ys = [statistics.fmean(r["acc_curve"][i][1] for r in rs) for i in range(len(xs))]
            ax2.plot(xs, [100 * y for y in ys], style + "o", ms=3, label=m)
    lo, hi = (min(v), max(v)) if (v := [y for line in ax1.get_lines() for y in line.get_ydata()]) else (1, 1)
    if lo > 0 and hi / lo > 20:  # losses spanning orders of magnitude (a destroyed init next to working ones)
        ax1.set_yscale("log")
    if meta.get("lora_final_loss_target"):
        ax1.axhline(meta["lora_final_loss_target"], color="grey", lw=0.8, ls=":", label="LoRA final loss")
    ax1.set(xlabel="step", ylabel=f"train loss ({window}-step moving avg, mean over seeds)",
            title=f"{task.title}, r={meta['rank']}")
    if any(rs.get("acc_curve") for rs in rows):
        ax2.set(xlabel="step", ylabel="validation accuracy % (mean over seeds)", title="held-out accuracy during training")
    else:  # no curve during training (generation is costly): the final held-out metric per method
        names = [m for m in task.methods if m in best]
        ys = range(len(names))
        splits = [("test", "held-out templates")] + ([("test_iid", "unseen problems, training templates")]
                                                    if "test_iid_acc" in best[names[0]] else [])
        h = 0.8 / len(splits)
        for i, (key, label) in enumerate(splits):
            ax2.barh([y + i * h for y in ys], [100 * best[m][f"{key}_acc"][0] for m in names], height=h,
                     xerr=[100 * best[m][f"{key}_acc"][1] for m in names], label=label)
        ax2.set_yticks([y + h * (len(splits) - 1) / 2 for y in ys], names)
        ax2.invert_yaxis()
        ax2.set(xlabel=f"test {task.metric} % (mean ± std over seeds, best lr)", title="held-out result")
    ax1.legend(fontsize=8)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def plot_sweep(sweep: list[dict], meta: dict, path: Path, task) -> None:
    """Validation accuracy (mean +/- std over seeds) against the base learning rate, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in task.methods:
        pts = [s for s in sweep if s["method"] == m and s["lr"] > 0]
        if pts:
            ax.errorbar([s["lr"] for s in pts], [100 * s["val_acc"][0] for s in pts],
                        yerr=[100 * s["val_acc"][1] for s in pts], marker="o", ms=4, capsize=3,
                        ls="--" if task.methods[m].init is None else "-", label=m)
    ax.set(xscale="log", xlabel="base learning rate (IntTune's N: x10)", ylabel=f"validation {task.metric} % (mean ± std)",
           title=f"LR sweep, {meta['steps']} steps, r={meta['rank']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def init_stats(rank: int, out: Path, task: str = "rt") -> dict:
    """How far the faithful NLoRA init (first-r slices, core not inverted, base left alone) moves each pretrained
    weight (MiniLM, or SmolLM2 for ``task="gsm"``): ||s B N A|| / ||W|| per layer kind (s = 1, as alpha = r)."""
    if task == "gsm":
        from experiments import gsm_smollm

        model, targets, model_name = gsm_smollm.load_lm()[1], gsm_smollm.TARGETS, "SmolLM2-135M"
    else:
        model, targets, model_name = rt.load_encoder()[1], rt.TARGETS, "MiniLM-L6"
    kinds: dict[str, list[float]] = {}
    for name, mod in rt.nlora.select_targets(model, targets).items():
        w = mod.weight.detach().float()
        f = rt.nlora.get_init("nystrom").fn(w, rank, scaling=1.0)
        delta = f.B @ f.N @ f.A
        kind = ".".join(name.split(".")[3:])
        kinds.setdefault(kind, []).append(float(delta.norm() / w.norm()))
    stats = {k: {"mean": statistics.fmean(v), "max": max(v), "layers": len(v)} for k, v in kinds.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model_name, "rank": rank, "scaling": 1.0, "rel_delta_norm": stats}, indent=1))
    print(f"faithful NLoRA init on {model_name}, r={rank}, s=1: ||B N A||_F / ||W||_F")
    for k, v in stats.items():
        print(f"  {k:28s} mean {v['mean']:.4f}  max {v['max']:.4f}  ({v['layers']} layers)")
    return stats


def export_assets(dest: Path) -> None:
    """Copy MiniLM (weights as fp16 safetensors: 45 MB instead of 91) and the RT csv into ``dest``."""
    from safetensors.torch import load_file, save_file

    src = rt.model_dir()
    mdir = dest / "minilm"
    mdir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, mdir / name)
    weights = load_file(src / "model.safetensors")
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()},
              mdir / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(rt.rt_csv(), dest / rt.RT_FILE)
    print(f"exported to {dest}: " + ", ".join(f"{p.name} {p.stat().st_size/1e6:.1f} MB" for p in sorted(dest.rglob('*')) if p.is_file()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--task", choices=["rt", "gsm"], default="rt",
                    help="rt: MiniLM-L6 / Rotten Tomatoes; gsm: SmolLM2-135M / GSM-symbolic (defaults below per task)")
    ap.add_argument("--quick", action="store_true", help="CPU pipeline check: 1 lr, 1 seed, a few steps, small splits")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every method of the task")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="rt 400, gsm 300")
    ap.add_argument("--batch", type=int, default=None, help="rt 32, gsm 16")
    ap.add_argument("--rank", dest="rank_r", type=int, default=None, help="adapter rank, alpha = rank (rt 8, gsm 16)")
    ap.add_argument("--max-len", type=int, default=None, help="tokens (rt 64, gsm 384)")
    ap.add_argument("--test", type=int, default=None, help="held-out test examples (rt 2000, gsm 300)")
    ap.add_argument("--val", type=int, default=None, help="validation examples for the LR choice (rt 1000, gsm 200)")
    ap.add_argument("--eval-every", type=int, default=50, help="rt only: validation accuracy curve every N steps")
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="run only these base LRs (for the chosen methods)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this many seconds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default=None, help="results file stem (default: study[_gsm][_quick])")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--runs", type=Path, default=None, help="where the per-run JSON lines go")
    ap.add_argument("--aggregate", type=Path, default=None, help="only aggregate this runs.jsonl")
    ap.add_argument("--best-lr-from", type=Path, default=None,
                    help="run each method only at its best LR among the runs in this runs.jsonl (e.g. a seed-0 sweep)")
    ap.add_argument("--export-assets", type=Path, default=None)
    ap.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--init-stats", action="store_true", help="only measure how much the faithful NLoRA init moves W")
    args = ap.parse_args()
    task = get_task(args.task)
    for key, value in task.defaults.items():
        dest = "rank_r" if key == "rank" else key
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    args.methods = args.methods or list(task.methods)
    unknown = sorted(set(args.methods) - set(task.methods))
    if unknown:
        ap.error(f"unknown methods {unknown} for --task {args.task}; choose from {list(task.methods)}")
    if args.init_stats:
        return init_stats(args.rank_r, args.out_dir / ("nlora_init_stats" + ("_smollm2" if args.task == "gsm" else "")
                                                       + ".json"), args.task)
    if args.export_assets:
        return export_assets(args.export_assets)
    grid = {m: list(task.lrs[m]) for m in task.methods}
    if args.quick:
        args.steps, args.seeds, args.eval_every = (12 if args.task == "rt" else 4), [0], 6
        if args.task == "gsm":  # CPU-sized batches: 135M params and a 49k vocabulary
            args.batch, args.max_len = 2, 192
        grid = {m: v[1:2] or v for m, v in grid.items()}
    if args.lrs:
        for m in args.methods:
            if grid[m] != [0.0]:
                grid[m] = list(args.lrs)
    if args.best_lr_from:
        grid = {**grid, **best_lrs([json.loads(x) for x in args.best_lr_from.read_text().splitlines() if x.strip()])}
    args.lr_grid = grid
    tag = args.tag or "study" + ("_gsm" if args.task == "gsm" else "") + ("_quick" if args.quick else "")
    if args.worker_index is not None:
        return worker(args)
    meta = {"task": args.task, "rank": args.rank_r, "steps": args.steps, "batch": args.batch, "max_len": args.max_len,
            "seeds": args.seeds, "lrs": {m: grid[m] for m in args.methods}, "test": args.test, "val": args.val,
            "quick": args.quick, "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                                                  else platform.processor() or "cpu"),
            "torch": torch.__version__, "workers": args.workers, "command": "python -m experiments.study " + " ".join(sys.argv[1:])}
    runs = args.aggregate or args.runs or (args.out_dir / f"{tag}_runs.jsonl")
    if not args.aggregate:
        runs.parent.mkdir(parents=True, exist_ok=True)
        runs.unlink(missing_ok=True)
        start = time.time()
        base = [sys.executable, "-m", "experiments.study", *sys.argv[1:], "--world", str(args.workers),
                "--start", str(start)]
        procs = [subprocess.Popen(base + ["--worker-index", str(i), "--out", str(runs.with_suffix(f".{i}.part"))])
                 for i in range(args.workers)]
        codes = [p.wait() for p in procs]
        with open(runs, "w") as f:
            for i in range(args.workers):
                part = runs.with_suffix(f".{i}.part")
                if part.exists():
                    f.write(part.read_text())
                    part.unlink()
        meta["wall_s"] = time.time() - start
        if any(codes):
            print(f"worker exit codes {codes}", file=sys.stderr)
    rows = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]
    if args.aggregate:
        saved = args.out_dir / f"{tag}.json"
        if saved.exists():
            meta = {**json.loads(saved.read_text())["meta"], **{"aggregated_from": str(args.aggregate)}}
    aggregate(rows, meta, args.out_dir, tag, task)


if __name__ == "__main__":
    main()
