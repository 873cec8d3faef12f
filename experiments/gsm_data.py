"""GSM-style word problems for the SmolLM2 study, generated offline by ``reasoning-gym`` and split by template.

``reasoning_gym.create_dataset("gsm_symbolic", size, seed)`` draws each problem from one of 85 GSM8K-derived
templates (``ds.task_indices[i]``). ``test`` comes from 15 templates never seen in training (new problem
structures, not recall of a template with new numbers); ``val`` (for the LR choice) and ``test_iid`` are unseen
problems from the training templates. Writes ``{train,val,test_iid,test}.jsonl`` (question, cot, answer,
template) to a folder; nothing is committed.

    pip install reasoning-gym==0.1.25        # in any venv: it needs no torch
    python experiments/gsm_data.py DIR [--train 8000 --val 100 --test-iid 200 --test 200]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def template_split(templates: list[int], n_test: int, seed: int = 1234) -> dict[str, set[int]]:
    """Disjoint train / test template sets, drawn once with a fixed seed (independent of training seeds)."""
    if n_test >= len(templates):
        raise ValueError(f"{n_test} test templates leave none of {len(templates)} for training")
    order = sorted(templates)
    random.Random(seed).shuffle(order)
    return {"test": set(order[:n_test]), "train": set(order[n_test:])}


def generate(out: Path, n_train: int, n_val: int, n_test_iid: int, n_test: int, test_templates: int,
             seed: int = 0) -> dict[str, int]:
    """Draw problems until every split is full. ``test`` comes from held-out templates; ``val`` and ``test_iid``
    are new problems (unseen questions) from the training templates; no question appears twice."""
    import reasoning_gym
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_need_fix, tasks_ok

    usable = [t for t in tasks_ok if t not in tasks_need_fix]
    owner = {t: s for s, ts in template_split(usable, test_templates).items() for t in ts}
    want = {"val": n_val, "test_iid": n_test_iid, "train": n_train, "test": n_test}
    rows: dict[str, list[dict]] = {s: [] for s in want}
    seen: set[str] = set()
    size = 4 * sum(want.values())
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    for i in range(size):
        if all(len(rows[s]) >= want[s] for s in want):
            break
        template = ds.task_indices[i]
        candidates = ["test"] if owner[template] == "test" else ["val", "test_iid", "train"]
        split = next((s for s in candidates if len(rows[s]) < want[s]), None)
        if split is None:
            continue
        item = ds[i]
        if item["question"] in seen:
            continue
        seen.add(item["question"])
        rows[split].append({"question": item["question"], "cot": item["metadata"]["answer_cot"],
                            "answer": item["answer"], "template": template})
    out.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        if len(items) < want[split]:
            raise RuntimeError(f"only {len(items)} {split} problems for {want[split]} wanted; raise the draw size")
        with open(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
    counts = {s: len(v) for s, v in rows.items()}
    print(f"{out}: {counts}; templates train {len(usable) - test_templates}, test {test_templates}")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--val", type=int, default=100, help="LR choice: new problems from the training templates")
    ap.add_argument("--test-iid", type=int, default=200, help="new problems from the training templates")
    ap.add_argument("--test", type=int, default=200, help="problems from the held-out templates")
    ap.add_argument("--test-templates", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    generate(a.out, a.train, a.val, a.test_iid, a.test, a.test_templates, a.seed)


if __name__ == "__main__":
    main()
