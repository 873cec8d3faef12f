"""Training step of the redesigned nlora against the code before the redesign (4c30724), in one process (GPU).

``benchmarks/train_step.py``'s model, loop and defaults (8 LLaMA-2-7B layers with the 32,000-token LM head, r = alpha
= 128 on all 7 projections, bf16, interleaved rounds), with NLoRA, SLoRA and IntTune from both codes, the frozen floor
and PEFT LoRA bf16. The old package is read from a directory (``--old``), imported as ``nlora_old``:

  git archive 4c30724 nlora | tar -x -C /tmp/old
  python3 -m experiments.step_vs_old --old /tmp/old/nlora [--shapes 4x2048 2x1024] [--rounds 5]

Writes ``experiments/results/step_vs_old.json`` and ``.png`` (``--out`` to change).
"""

import argparse
import importlib.util
import sys
from pathlib import Path

from benchmarks import train_step

OLD = {"old NLoRA": dict(init="nystrom"), "old SLoRA": dict(init="slora"),
       "old IntTune": dict(init="nystrom", train="middle")}


def load_old(path: Path):
    """The package at ``path`` imported as ``nlora_old`` (its relative imports resolve inside it)."""
    spec = importlib.util.spec_from_file_location("nlora_old", path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = sys.modules["nlora_old"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="the old nlora package's directory")
    args, rest = p.parse_known_args()  # the rest goes to train_step.py
    old = load_old(args.old)
    new_build, write = train_step.build, train_step.write

    def build(name, cfg, rank, device, dtype):
        if name not in OLD:
            return new_build(name, cfg, rank, device, dtype)
        model, _ = new_build("floor", cfg, rank, device, dtype)
        old.inject(model, "all-linear", rank=rank, alpha=rank, **OLD[name])
        return model, train_step.optimizer(model, device)

    train_step.VARIANTS.update(OLD)
    train_step.build = build
    train_step.write = lambda result, out, name, plot: write(result, out, name.replace("train_step", "step_vs_old"),
                                                             plot)
    sys.argv = [sys.argv[0], *rest, "--variants", "floor", "nlora NLoRA", "old NLoRA", "nlora SLoRA", "old SLoRA",
                "nlora IntTune", "old IntTune", "PEFT LoRA bf16"]
    if "--out" not in rest:
        sys.argv += ["--out", str(Path(__file__).resolve().parent / "results")]
    train_step.main()


if __name__ == "__main__":
    main()
