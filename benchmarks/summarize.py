"""Print the headline tables (Markdown) from the committed JSON results, so the README quotes them exactly.

    python benchmarks/summarize.py > /tmp/headline.md
"""

from __future__ import annotations

import json

from _common import results_dir


def _load(name: str):
    path = results_dir() / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def init_table(name: str, title: str) -> list[str]:
    d = _load(name)
    if not d:
        return []
    m = d["machine"]
    out = [f"**{title}** ({m.get('gpu') or m['cpu']}, torch {m['torch']}, peft {m['peft']}; `{m['command']}`)", "",
           _row(["dtype", "library", "init", "s (whole model)", "range", "x faster than PEFT LoRA", "note"]),
           _row(["---"] * 7)]
    for r in d["results"]:
        s = r["seconds_whole_model"]
        note = f"timed on {r['layers_timed']} of {r['layers_model']} layers, scaled" if r["scaled"] else ""
        out.append(_row([r["dtype"], r["library"], r["method"], f"{s['median']:.3f}", f"{s['min']:.3f}-{s['max']:.3f}",
                         f"{r.get('speedup_vs_peft_lora', float('nan')):.3g}", note]))
    return out + [""]


def train_table(name: str, title: str) -> list[str]:
    d = _load(name)
    if not d:
        return []
    m = d["machine"]
    out = [f"**{title}** ({m.get('gpu')}, torch {m['torch']}, peft {m['peft']}; head: {d.get('head', 'none')}, "
           f"{d.get('optimizer', 'AdamW foreach')}; `{m['command']}`)", ""]
    if len(d["results"]) > 1:
        host = all("host_ms_per_step" in r for r in d["results"])
        out += [_row(["variant", "ms/step", "per round", "x floor", "peak GiB", "mem x floor", "trainable params"]
                     + (["host ms/step"] if host else [])), _row(["---"] * (7 + host))]
        for r in d["results"]:
            out.append(_row([r["variant"], f"{r['ms_per_step']:.2f}", " / ".join(f"{v:.2f}" for v in r["round_medians_ms"]),
                             f"{r['x_floor']:.3f}", f"{r['peak_gib']:.3f}", f"{r['mem_x_floor']:.3f}",
                             f"{r['trainable_params']:,}"] + ([f"{r['host_ms_per_step']:.2f}"] if host else [])))
        out.append("")
    for key, label in (("compiled", "torch.compile"), ("graphed", "CUDA-graphed")):
        cs = [c for c in d.get(key, []) if "ms" in c]
        if cs:
            out += [_row([f"{label} variant", "ms/step", f"x {label} floor", "peak GiB"]), _row(["---"] * 4)]
            for c in cs:
                out.append(_row([c["variant"], f"{c['ms']['median']:.2f}", f"{c['x_floor']:.3f}",
                                 f"{c['peak_gib']:.3f}"]))
            out.append("")
    return out


def infer_table(name: str) -> list[str]:
    d = _load(name)
    if not d:
        return []
    m = d["machine"]
    out = [f"**Inference forward** ({m.get('gpu')}, {d['layers']} layers, bf16, r={d['rank']}; `{m['command']}`)", "",
           _row(["tokens", "variant", "ms", "per round", "x base"]), _row(["---"] * 5)]
    for r in d["results"]:
        out.append(_row([r["shape"], r["variant"], f"{r['ms']:.3f}", " / ".join(f"{v:.3f}" for v in r["round_medians_ms"]),
                         f"{r['x_base']:.3f}"]))
    return out + [""]


def loss_table(name: str) -> list[str]:
    d = _load(name)
    if not d:
        return []
    m = d["machine"]
    out = [f"**Loss trajectory** ({d['model']}, {d['task']}; {m.get('gpu') or m['cpu']}; `{m['command']}`)", "",
           _row(["init", "policy", "loss step 1", "mean loss last 50", "test accuracy by step", "max abs loss diff"]),
           _row(["---"] * 6)]
    for init in dict.fromkeys(r["init"] for r in d["results"]):
        a, b = [r for r in d["results"] if r["init"] == init]
        diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        for r in (a, b):
            last = r["losses"][-50:]
            acc = ", ".join(f"{k}: {v:.3f}" for k, v in r["accuracy"].items())
            out.append(_row([init, r["policy"], f"{r['losses'][0]:.4f}", f"{sum(last) / len(last):.4f}", acc,
                             f"{diff:.4f}"]))
    return out + [""]


def approx_table(name: str) -> list[str]:
    d = _load(name)
    if not d:
        return []
    m = d["machine"]
    out = [f"**Approximation of real weights** ({d['model']}, median over the 37 Linear layers; `{m['command']}`)", "",
           _row(["rank", "SVD best", "pinv first", "pinv random", "pinv norm", "optimal first", "optimal random",
                 "optimal norm", "faithful nystrom ||sBNA||/||W|| (first)", "(norm)", "init ms pinv/optimal/nystrom"]),
           _row(["---"] * 11)]
    for s in d["summary"]:
        q = s["median_over_modules"]
        cols = [f"{i}/{x}/rel_error" for i in ("nystrom-pinv", "nystrom-optimal") for x in ("first", "random", "norm")]
        t = "/".join(f"{q[f'{i}/first/seconds'] * 1e3:.2f}" for i in ("nystrom-pinv", "nystrom-optimal", "nystrom"))
        out.append(_row([s["rank"], f"{q['svd_best_rel_error']:.3f}"] + [f"{q[c]:.3f}" for c in cols]
                        + [f"{q['nystrom/first/perturbation']:.3f}", f"{q['nystrom/norm/perturbation']:.3f}", t]))
    svd = [s for s in d["summary"] if "nystrom-pinv[svd]/first/rel_error" in s["median_over_modules"]]
    if svd:  # the same with solver="svd" (exact SVD truncation; the default before the ridge solver)
        out += ["", "Same, with `solver=\"svd\"` (the exact SVD truncation; the plain columns above use the default "
                    "ridge solver):", "",
                _row(["rank", "pinv[svd] first", "pinv[svd] random", "pinv[svd] norm", "optimal[svd] first",
                      "optimal[svd] random", "optimal[svd] norm", "init ms pinv/optimal"]), _row(["---"] * 8)]
        for s in svd:
            q = s["median_over_modules"]
            cols = [f"{i}[svd]/{x}/rel_error" for i in ("nystrom-pinv", "nystrom-optimal")
                    for x in ("first", "random", "norm")]
            t = "/".join(f"{q[f'{i}[svd]/first/seconds'] * 1e3:.2f}" for i in ("nystrom-pinv", "nystrom-optimal"))
            out.append(_row([s["rank"]] + [f"{q[c]:.3f}" for c in cols] + [t]))
    return out + [""]


def main() -> None:
    lines = []
    lines += init_table("init_7b_cuda", "Init, LLaMA-2-7B shape (32 layers), r=128, all linear, H200")
    lines += train_table("train_7b_cuda_function", "Training step, 2 LLaMA-7B layers, bf16 base, 4x512 tokens, r=128")
    lines += train_table("train_7b_cuda", "Training step, same setup, an earlier run (before the one-node branch)")
    lines += train_table("train_7b_cuda_compiled", "torch.compile training step (same setup)")
    lines += train_table("train_7b_cuda_decoder_foreach", "Training step, decoder stack only (no LM head), AdamW foreach")
    lines += infer_table("infer_7b_cuda")
    lines += loss_table("loss_minilm_cuda")
    lines += approx_table("approx_minilm_cpu")
    for name, run in (("init_1b_cpu_run1", "run 1"), ("init_1b_cpu", "run 2"), ("init_1b_cpu_run3", "run 3"),
                      ("init_1b_cpu_run4", "run 4 (the final code but the adapter-building overlap)")):
        lines += init_table(name, f"Init, 1B shape (TinyLlama: hidden 2048, MLP 5632, 22 layers), r=128, shared 2-core "
                                  f"CPU, {run}")
    d = _load("pinv_micro_cuda")
    if d:
        lines += ["**Per-call cost of the small factorisations on the H200** (`" + d["machine"]["command"] + "`)", "",
                  _row(["op", "ms per matrix"]), _row(["---"] * 2)]
        lines += [_row([o["op"], f"{o['ms_per_matrix']:.3f}" if "ms_per_matrix" in o else o.get("error")])
                  for o in d["results"]] + [""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
