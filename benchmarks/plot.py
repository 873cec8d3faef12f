"""Draw the benchmark plots (PNG, next to the JSON in benchmarks/results/) from whatever result files exist.

    python benchmarks/plot.py
"""

from __future__ import annotations

import json

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from _common import results_dir  # noqa: E402

COLORS = {"nlora": "tab:blue", "peft": "tab:orange", "floor": "tab:gray"}


def _load(name: str):
    path = results_dir() / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _machine(d: dict) -> str:
    m = d["machine"]
    return f"{m.get('gpu') or m['cpu']} | torch {m['torch']}, peft {m['peft']}, transformers {m['transformers']}"


def _save(fig, name: str) -> None:
    """Lay out, write ``<name>.png`` next to the JSON, and free the figure."""
    fig.tight_layout()
    fig.savefig(results_dir() / f"{name}.png", dpi=110)
    plt.close(fig)


def plot_init(name: str) -> None:
    d = _load(name)
    if not d:
        return
    dtypes = list(dict.fromkeys(r["dtype"] for r in d["results"]))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.8), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        rs = [r for r in d["results"] if r["dtype"] == dt]
        labels = [f"{r['library']} {r['method']}" + (" *" if r["scaled"] else "") for r in rs]
        vals = [r["seconds_whole_model"]["median"] for r in rs]
        ax.barh(labels, vals, color=[COLORS[r["library"]] for r in rs])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short spans
        ax.invert_yaxis()
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.3g} s", va="center", fontsize=8)
        ax.set_title(f"{dt}: init of the whole model (r={d['rank']}, all linear)", fontsize=10)
        ax.set_xlabel("seconds (log)")
    fig.suptitle(f"Init time, {d['shape']}-shaped LLaMA ({d['results'][0]['layers_model']} layers); "
                 f"* = timed on a subset of layers and scaled\n{_machine(d)}", fontsize=9)
    _save(fig, name)


def plot_train(name: str) -> None:
    d = _load(name)
    if not d:
        return
    panels = []  # (title, labels, ratios, annotations, colors, targets)
    rs = d["results"]
    if len(rs) > 1:
        colors = [COLORS.get(r["kind"], "tab:gray") for r in rs]
        panels.append(("eager step time / floor", [r["variant"] for r in rs], [r["x_floor"] for r in rs],
                       [f"{r['ms_per_step']:.2f} ms" for r in rs], colors, (1.06, 1.12)))
        panels.append(("eager peak memory / floor", [r["variant"] for r in rs], [r["mem_x_floor"] for r in rs],
                       [f"{r['peak_gib']:.2f} GiB" for r in rs], colors, (1.05,)))
    for key, title in (("compiled", "torch.compile step time / compiled floor"),
                       ("graphed", "CUDA-graphed step time / graphed floor")):
        cs = [c for c in d.get(key, []) if "ms" in c]
        if cs:
            colors = [COLORS["floor"] if c["variant"] == "floor" else
                      COLORS["peft"] if c["variant"].startswith("peft") else COLORS["nlora"] for c in cs]
            panels.append((title, [c["variant"] for c in cs], [c["x_floor"] for c in cs],
                           [f"{c['ms']['median']:.2f} ms" for c in cs], colors, (1.06, 1.12)))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.8 * len(panels), 5.0), squeeze=False)
    for ax, (title, labels, vals, notes, colors, targets) in zip(axes[0], panels):
        ax.barh(labels, vals, color=colors)
        ax.invert_yaxis()
        for t in targets:
            ax.axvline(t, ls="--", color="k", lw=0.8)
        for i, (v, n) in enumerate(zip(vals, notes)):
            ax.text(v, i, f" {v:.3f} ({n})", va="center", fontsize=8)
        ax.set_xlim(0.9, max(vals) * 1.3)
        ax.set_title(title + " (dashed: targets)", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    head = "LM head + cross-entropy" if d.get("head", "none") == "lm" else "decoder stack only"
    fig.suptitle(f"Training step (fwd+bwd+{d.get('optimizer', 'AdamW foreach')}), {d['layers']} LLaMA-7B layers, "
                 f"{head}, bf16 base, {d['batch']}x{d['seq']} tokens, r={d['rank']}\n{_machine(d)}", fontsize=9)
    _save(fig, name)


def plot_infer(name: str) -> None:
    d = _load(name)
    if not d:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in d["results"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.2), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        rs = [r for r in d["results"] if r["shape"] == s]
        vals = [r["x_base"] for r in rs]
        ax.barh([r["variant"] for r in rs], vals,
                color=[COLORS["nlora"] if r["variant"].startswith("nlora") else
                       COLORS["peft"] if r["variant"].startswith("peft") else COLORS["floor"] for r in rs])
        ax.invert_yaxis()
        ax.axvline(1.01, ls="--", color="k", lw=0.8)
        for i, (v, r) in enumerate(zip(vals, rs)):
            ax.text(v, i, f" {v:.3f} ({r['ms']:.3f} ms)", va="center", fontsize=8)
        ax.set_xlim(0.9, max(vals) * 1.3)
        ax.set_title(f"{s} tokens: forward time / plain base", fontsize=10)
    fig.suptitle(f"Inference, {d['layers']} LLaMA-7B layers, bf16, r={d['rank']}\n{_machine(d)}", fontsize=9)
    _save(fig, name)


def plot_loss(name: str) -> None:
    d = _load(name)
    if not d:
        return
    fig, ax = plt.subplots(figsize=(8, 4.8))
    k = 10
    for r, style in zip(d["results"], ["-", "--", "-", "--", "-", "--"]):
        ls = r["losses"]
        smooth = [sum(ls[max(0, i - k + 1):i + 1]) / len(ls[max(0, i - k + 1):i + 1]) for i in range(len(ls))]
        acc = list(r["accuracy"].values())[-1]
        ax.plot(range(1, len(ls) + 1), smooth, style, label=f"{r['init']}, {r['policy']} (test acc {acc:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving mean of {k})")
    ax.legend(fontsize=8)
    ax.set_title(f"{d['model']}, {d['task']}\nr={d['args']['rank']}, lr={d['args']['lr']}, batch "
                 f"{d['args']['batch']} | {_machine(d)}", fontsize=8)
    _save(fig, name)


def plot_approx(name: str) -> None:
    d = _load(name)
    if not d:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    ranks = [s["rank"] for s in d["summary"]]
    meds = [s["median_over_modules"] for s in d["summary"]]
    series = [("svd_best_rel_error", "best rank-r (SVD)", "k", "-")]
    for init, ls in (("nystrom-pinv", "--"), ("nystrom-optimal", "-")):
        for idx, c in (("first", "tab:blue"), ("random", "tab:green"), ("norm", "tab:red")):
            series.append((f"{init}/{idx}/rel_error", f"{init} ({idx})", c, ls))
    for idx, c in (("first", "tab:blue"), ("norm", "tab:red")):
        series.append((f"nystrom/{idx}/perturbation", f"faithful nystrom perturbation ({idx})", c, ":"))
    for key, label, c, ls in series:
        ax.plot(ranks, [m[key] for m in meds], ls, color=c, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel("median over the 37 Linear layers")
    ax.axhline(1.0, color="gray", lw=0.6)
    ax.legend(fontsize=7)
    ax.set_title(f"||W - s B N A||_F / ||W||_F on all-MiniLM-L6-v2 (and ||s B N A||/||W|| for faithful nystrom)\n"
                 f"{_machine(d)}", fontsize=8)
    _save(fig, name)


def main() -> None:
    for stem in sorted(p.stem for p in results_dir().glob("*.json")):
        kind = stem.split("_")[0]
        fn = {"init": plot_init, "train": plot_train, "infer": plot_infer, "loss": plot_loss,
              "approx": plot_approx}.get(kind)
        data = _load(stem)
        if fn and isinstance(data, dict) and data.get("results") and "machine" in data \
                and (kind != "init" or "dtype" in data["results"][0]):  # init_batch_*: op counts, a table only
            fn(stem)
            print(f"plotted {stem}.png")


if __name__ == "__main__":
    main()
