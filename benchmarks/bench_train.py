"""Training step time and peak memory, nlora vs HF PEFT: LLaMA-style layers of 7B dims, bf16 base, r=128 on all linears.

One step = forward + backward + AdamW step (fused by default). ``--head lm`` (default): ``LlamaForCausalLM``,
random bf16 input embeddings, next-token cross-entropy on random labels through the (frozen) LM head;
``--head none``: the decoder stack only, loss = mean of the outputs times a fixed random target. The floor is the same frozen model with gradients flowing to the
input only (no adapters, no optimizer). Every variant runs on the same model object in the same process;
the list is run ``--rounds`` times to show the spread. ``--profile`` writes torch.profiler tables;
``--compile`` repeats some variants under ``torch.compile``; ``--graph`` captures whole steps (forward, backward,
capturable fused AdamW) in CUDA graphs, whose replays cost no host time: the GPU's own step time.
Each eager row also reports the host time to enqueue one step, measured while the GPU is held busy
(``torch.cuda._sleep``): where it exceeds the GPU's step time, the step is host-bound.

    python benchmarks/bench_train.py --layers 2 --rounds 2 --profile --compile
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

import torch
from torch import nn

import nlora
from nlora.layer import NLoRALinear
from _common import (build_llama, cpu_step_times, cuda_step_times, free_memory, llama_config, machine_info, results_dir, summary,
                     table, write_json)

_TARGET: dict = {}


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    """Mean of the outputs against a fixed random target (LLaMA's final RMSNorm makes mean(out^2) ~ constant,
    so a squared loss would give near-zero, pure-rounding-noise gradients)."""
    t = _TARGET.get(out.shape)
    if t is None:
        t = _TARGET[out.shape] = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(7),
                                             device=out.device, dtype=out.dtype)
    return (out * t).float().mean()


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _unfused_forward(self: NLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """nlora's forward as of commit a8d7078 (before the fused addmm_ path), kept here for the before/after row."""
    y = self.base(x)
    for name in self.active_adapters:
        if name not in self.merged_adapters:
            y = y + self.adapters[name](x).to(y.dtype)
    return y


@contextlib.contextmanager
def op_by_op():
    """nlora's eager path as of commit e638000: the adapter branch as separate casts/matmuls/addmm_ autograd nodes
    instead of one ``_AdapterBranch`` node (``nlora.layer.FUSED_FUNCTION``, kept for this before/after row)."""
    saved = nlora.layer.FUSED_FUNCTION
    nlora.layer.FUSED_FUNCTION = False
    try:
        yield
    finally:
        nlora.layer.FUSED_FUNCTION = saved


@contextlib.contextmanager
def unfused():
    saved = NLoRALinear.forward
    NLoRALinear.forward = _unfused_forward
    try:
        yield
    finally:
        NLoRALinear.forward = saved


def variants(rank: int) -> dict:
    """name -> (kind, options). kind: floor | nlora | peft."""
    return {
        "floor": ("floor", {}),
        "peft-lora (fp32 adapters, default)": ("peft", {"autocast_adapter_dtype": True}),
        "peft-lora (bf16 adapters)": ("peft", {"autocast_adapter_dtype": False}),
        "nlora-lora": ("nlora", {"init": "lora"}),
        "nlora-slora": ("nlora", {"init": "slora"}),
        "nlora-nystrom": ("nlora", {"init": "nystrom"}),
        "nlora-inttune": ("nlora", {"init": "nystrom", "train": "middle"}),
        "nlora-lora (e638000 op-by-op)": ("nlora", {"init": "lora", "op_by_op": True}),
        "nlora-slora (e638000 op-by-op)": ("nlora", {"init": "slora", "op_by_op": True}),
        "nlora-nystrom (e638000 op-by-op)": ("nlora", {"init": "nystrom", "op_by_op": True}),
        "nlora-inttune (e638000 op-by-op)": ("nlora", {"init": "nystrom", "train": "middle", "op_by_op": True}),
        "nlora-nystrom (unfused a8d7078 fwd)": ("nlora", {"init": "nystrom", "unfused": True}),
        "nlora-inttune (unfused a8d7078 fwd)": ("nlora", {"init": "nystrom", "train": "middle", "unfused": True}),
        "nlora-nystrom (fp32 compute)": ("nlora", {"init": "nystrom", "compute_dtype": torch.float32}),
        "nlora-nystrom (bf16 params)": ("nlora", {"init": "nystrom", "adapter_dtype": torch.bfloat16}),
    }


class Setup:
    """Attach one variant's adapters to ``model``; ``close()`` takes them off again."""

    def __init__(self, model: nn.Module, kind: str, opts: dict, rank: int):
        self.model, self.kind, self.opts = model, kind, dict(opts)
        self.ctx = (unfused() if self.opts.pop("unfused", False) else
                    op_by_op() if self.opts.pop("op_by_op", False) else contextlib.nullcontext())
        self.ctx.__enter__()
        self.run_model = model
        if kind == "nlora":
            nlora.inject(model, "all-linear", rank=rank, seed=0, **self.opts)
        elif kind == "peft":
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=LINEARS, lora_dropout=0.0)
            self.run_model = get_peft_model(model, cfg, autocast_adapter_dtype=self.opts["autocast_adapter_dtype"])
        self.params = [p for p in self.run_model.parameters() if p.requires_grad]
        self.adapter_dtypes = sorted({str(p.dtype) for p in self.params})

    def close(self) -> None:
        if self.kind == "nlora":
            nlora.unload(self.model)
        elif self.kind == "peft":
            self.run_model.unload()
            if hasattr(self.model, "peft_config"):
                del self.model.peft_config
        self.ctx.__exit__(None, None, None)
        self.model.requires_grad_(False)


_CONF = {"labels": None, "fused": True}


def _loss(fwd, x: torch.Tensor) -> torch.Tensor:
    labels = _CONF["labels"]
    if labels is not None:  # LlamaForCausalLM: HF's shifted cross-entropy over the vocabulary
        return fwd(inputs_embeds=x, labels=labels).loss
    return loss_fn(fwd(inputs_embeds=x).last_hidden_state)


def make_step(setup: Setup, x: torch.Tensor, fwd, capturable: bool = False):
    """One training step as a closure: forward, backward, AdamW (floor: forward, backward to the input).
    ``capturable``: AdamW keeps its step count on the GPU, so that the step can be captured in a CUDA graph."""
    if setup.kind == "floor":
        xg = x.detach().clone().requires_grad_(True)

        def step():
            xg.grad = None
            _loss(fwd, xg).backward()

        return step
    opt = torch.optim.AdamW(setup.params, lr=1e-5, fused=_CONF["fused"] and x.device.type == "cuda",
                            capturable=capturable)

    def step():
        opt.zero_grad(set_to_none=True)
        _loss(fwd, x).backward()
        opt.step()

    return step


def host_enqueue_ms(step, samples: int = 8, sleep_cycles: int = 200_000_000) -> list[float]:
    """Host milliseconds to enqueue one ``step`` while the GPU is held busy by a sleep kernel (~100 ms), so that the
    host never waits for the device: the step's host cost alone. A host synchronisation inside the step would show
    up as the whole sleep."""
    out = []
    for _ in range(samples):
        torch.cuda.synchronize()
        torch.cuda._sleep(sleep_cycles)
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return out


def measure(setup: Setup, x: torch.Tensor, warmup: int, iters: int, fwd=None, host: bool = False) -> dict:
    step = make_step(setup, x, setup.run_model if fwd is None else fwd)
    for _ in range(warmup):
        step()
    if x.device.type == "cpu":  # smoke runs only
        return {"ms": summary(cpu_step_times(step, 0, iters)), "peak_gib": float("nan"), "steady_gib": float("nan")}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    times = cuda_step_times(step, 0, iters)
    peak = torch.cuda.max_memory_allocated()
    res = {"ms": summary(times), "peak_gib": peak / 2**30, "steady_gib": before / 2**30}
    if host:
        res["host_ms"] = summary(host_enqueue_ms(step))
    del step
    return res


def measure_graphed(setup: Setup, x: torch.Tensor, warmup: int, iters: int) -> dict:
    """The whole step captured once in a CUDA graph (after warm-up steps on a side stream, as the CUDA-graph docs
    show), then replayed: per-replay CUDA-event times are the GPU's step time with no host overhead."""
    step = make_step(setup, x, setup.run_model, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = cuda_step_times(graph.replay, warmup, iters)
    peak = torch.cuda.max_memory_allocated()
    del graph, step
    return {"ms": summary(times), "peak_gib": peak / 2**30}


def profile(setup: Setup, x: torch.Tensor, steps: int = 3) -> str:
    from torch.profiler import ProfilerActivity, profile as tprofile

    step = make_step(setup, x, setup.run_model)
    for _ in range(3):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    n_kernels = sum(e.count for e in kernels) / steps
    dev_total = sum(getattr(e, "self_device_time_total", 0) for e in kernels) / steps / 1e3
    head = f"kernels/step {n_kernels:.0f}, summed kernel time/step {dev_total:.2f} ms\n"
    return head + events.table(sort_by="self_device_time_total", row_limit=28, max_name_column_width=60)


def check_fused(model: nn.Module, x: torch.Tensor, rank: int) -> dict:
    """The current eager path against the e638000 op-by-op one and the a8d7078 unfused one on this device:
    outputs and gradients of one step (relative differences of the current path to each)."""
    got = []
    for ctx in (contextlib.nullcontext(), op_by_op(), unfused()):
        with ctx:
            nlora.inject(model, "all-linear", rank=rank, init="slora", seed=0)
            torch.manual_seed(1)
            with torch.no_grad():  # non-zero B so that every factor gets a gradient
                for layer in nlora.model.adapter_layers(model).values():
                    layer.lora_B.normal_(std=0.02)
            out = model(inputs_embeds=x).last_hidden_state if _CONF["labels"] is None else \
                model(inputs_embeds=x).logits
            loss_fn(out).backward()
            layers = list(nlora.model.adapter_layers(model).values())
            got.append([out.detach().float()] + [getattr(layers[i], f"lora_{m}").grad.float()
                                                  for i in (0, -1) for m in "ANB"])
            nlora.unload(model)
            model.requires_grad_(False)
    rel = {name: [((a - b).norm() / b.norm()).item() for a, b in zip(got[0], other)]
           for name, other in (("op_by_op_e638000", got[1]), ("unfused_a8d7078", got[2]))}
    return {"max_rel_diff_output_and_grads": {k: max(v) for k, v in rel.items()}, "rel": rel}


def against_floor(rows: list[dict], label: str, ratio: str) -> None:
    """Add ``x_floor`` / ``mem_x_floor`` to the measured rows of a compiled or graphed pass (against that pass's own
    floor row) and print its table; rows that were skipped or failed show why."""
    floor = [c for c in rows if c["variant"] == "floor" and "ms" in c]
    for c in rows:
        if floor and "ms" in c:
            c["x_floor"] = c["ms"]["median"] / floor[0]["ms"]["median"]
            c["mem_x_floor"] = c["peak_gib"] / floor[0]["peak_gib"]
    print(table([[c["variant"], f"{c['ms']['median']:.2f}" if "ms" in c else c.get("skipped") or c.get("failed"),
                  f"{c.get('x_floor', 0):.3f}", f"{c.get('peak_gib', 0):.3f}"] for c in rows],
                [label, "ms/step", ratio, "peak GiB"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    p.add_argument("--profile", nargs="*", default=None,
                   help="profile these variants (no names: floor, peft bf16, nlora-nystrom, nlora-inttune)")
    p.add_argument("--compile", nargs="*", default=None,
                   help="torch.compile these variants (no names: floor, peft bf16, nlora-nystrom, nlora-inttune)")
    p.add_argument("--compile-budget", type=float, default=150.0, help="seconds; later compile rows are skipped")
    p.add_argument("--graph", nargs="*", default=None,
                   help="CUDA-graph these variants' whole steps (no names: floor, peft bf16, nlora-nystrom, "
                        "nlora-inttune)")
    p.add_argument("--no-host", action="store_true", help="skip the host-enqueue timing of each eager row")
    p.add_argument("--head", default="lm", choices=["lm", "none"])
    p.add_argument("--foreach-adam", action="store_true", help="AdamW foreach instead of fused")
    p.add_argument("--name", default="train_7b_cuda")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small dims, for a smoke run of the script itself")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    device = args.device
    t0 = time.perf_counter()
    tiny = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=4) if args.tiny else {}
    model = build_llama(llama_config("7b", args.layers, **tiny), device, torch.bfloat16, causal_lm=args.head == "lm")
    x = torch.randn(args.batch, args.seq, model.config.hidden_size, device=device, dtype=torch.bfloat16)
    _CONF["fused"] = not args.foreach_adam
    if args.head == "lm":
        _CONF["labels"] = torch.randint(model.config.vocab_size, (args.batch, args.seq), device=device,
                                        generator=torch.Generator(device).manual_seed(3))
    check = check_fused(model, x, args.rank)
    print("current eager path vs older ones (bf16 output and fp32 grads): max relative difference "
          + ", ".join(f"{k} {v:.2e}" for k, v in check["max_rel_diff_output_and_grads"].items()))
    all_variants = variants(args.rank)
    chosen = {k: v for k, v in all_variants.items() if args.only is None or k in args.only}
    rounds: dict[str, list[dict]] = {k: [] for k in chosen}
    meta = {}
    for r in range(args.rounds):
        for name, (kind, opts) in chosen.items():
            free_memory()
            setup = Setup(model, kind, opts, args.rank)
            meta[name] = {"kind": kind, "options": {k: str(v) for k, v in opts.items()},
                          "trainable_params": sum(q.numel() for q in setup.params),
                          "trainable_dtypes": setup.adapter_dtypes}
            res = measure(setup, x, args.warmup, args.iters, host=device == "cuda" and not args.no_host)
            setup.close()
            rounds[name].append(res)
            host = f"  host {res['host_ms']['median']:.3f} ms" if "host_ms" in res else ""
            print(f"round {r} {name:40s} {res['ms']['median']:8.3f} ms  peak {res['peak_gib']:.3f} GiB{host}",
                  flush=True)
    records = []
    for name, rs in rounds.items():
        ms = statistics.mean(q["ms"]["median"] for q in rs)
        floor_ms = statistics.mean(q["ms"]["median"] for q in rounds["floor"]) if "floor" in rounds else None
        floor_peak = rounds["floor"][0]["peak_gib"] if "floor" in rounds else None
        rec = {"variant": name, **meta[name], "ms_per_step": ms, "round_medians_ms": [q["ms"]["median"] for q in rs],
               "peak_gib": max(q["peak_gib"] for q in rs), "rounds": rs,
               "x_floor": ms / floor_ms if floor_ms else None,
               "mem_x_floor": max(q["peak_gib"] for q in rs) / floor_peak if floor_peak else None}
        if all("host_ms" in q for q in rs):
            rec["host_ms_per_step"] = statistics.mean(q["host_ms"]["median"] for q in rs)
        records.append(rec)
    rows = [[r["variant"], f"{r['ms_per_step']:.2f}", "/".join(f"{v:.2f}" for v in r["round_medians_ms"]),
             f"{r['x_floor']:.3f}" if r["x_floor"] else "", f"{r['peak_gib']:.3f}",
             f"{r['mem_x_floor']:.3f}" if r["mem_x_floor"] else "", r["trainable_params"],
             f"{r['host_ms_per_step']:.2f}" if "host_ms_per_step" in r else ""] for r in records]
    print(table(rows, ["variant", "ms/step", "per round", "x floor", "peak GiB", "mem x floor", "trainable",
                       "host ms/step"]))

    default4 = ["floor", "peft-lora (bf16 adapters)", "nlora-nystrom", "nlora-inttune"]
    prof_text = []
    if args.profile is not None:
        for name in args.profile or default4:
            kind, opts = all_variants[name]
            setup = Setup(model, kind, opts, args.rank)
            prof_text.append(f"===== {name} =====\n" + profile(setup, x))
            setup.close()
            free_memory()
        (results_dir() / f"{args.name}_profile.txt").write_text("\n\n".join(prof_text))
        print(f"wrote {results_dir() / f'{args.name}_profile.txt'}")
        print("\n".join(t.splitlines()[0] + "  <- " + t.splitlines()[1] for t in
                        [s.split("\n", 1)[0] + "\n" + s.split("\n", 2)[1] for s in prof_text]))

    compiled = []
    if args.compile is not None:
        t_c = time.perf_counter()
        for name in args.compile or default4:
            if time.perf_counter() - t_c > args.compile_budget:
                compiled.append({"variant": name, "skipped": "compile budget spent"})
                continue
            kind, opts = all_variants[name]
            torch._dynamo.reset()
            setup = Setup(model, kind, opts, args.rank)
            fwd = torch.compile(setup.run_model)
            tc = time.perf_counter()
            res = measure(setup, x, 3, args.iters, fwd=fwd)
            res["compile_and_measure_s"] = time.perf_counter() - tc
            setup.close()
            del fwd
            free_memory()
            compiled.append({"variant": name, **res})
            print(f"compiled {name:40s} {res['ms']['median']:8.3f} ms  peak {res['peak_gib']:.3f} GiB "
                  f"({res['compile_and_measure_s']:.0f} s)", flush=True)
        against_floor(compiled, "compiled variant", "x floor")
    graphed = []
    if args.graph is not None:
        for name in args.graph or default4:
            kind, opts = all_variants[name]
            free_memory()
            setup = Setup(model, kind, opts, args.rank)
            try:
                res = measure_graphed(setup, x, args.warmup, args.iters)
            except Exception as e:  # report what could not be captured, keep measuring the rest
                res = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            setup.close()
            graphed.append({"variant": name, **res})
            print(f"graphed {name:40s} " + (f"{res['ms']['median']:8.3f} ms  peak {res['peak_gib']:.3f} GiB"
                                           if "ms" in res else res["failed"]), flush=True)
        against_floor(graphed, "CUDA-graphed variant", "x graphed floor")
    payload = {"benchmark": "train_step", "shape": "7b", "layers": args.layers, "head": args.head,
               "optimizer": "AdamW foreach" if args.foreach_adam else "AdamW fused", "batch": args.batch, "seq": args.seq,
               "rank": args.rank, "base_dtype": "bfloat16", "machine": machine_info(device), "args": vars(args),
               "results": records, "compiled": compiled, "graphed": graphed, "fused_check": check, "total_seconds": time.perf_counter() - t0,
               "notes": "ms/step = mean over rounds of the median of per-step CUDA-event times after warm-up; "
                        "peak = torch.cuda.max_memory_allocated over the timed steps (weights, optimizer state, "
                        "activations); floor = frozen model, gradient to the input embeddings only; host_ms_per_step = "
                        "host time to enqueue one step while the GPU sleeps (mean over rounds of the median of 8); "
                        "graphed = whole step replayed from a CUDA graph (no host work), x its own graphed floor."}
    write_json(args.name, payload)


if __name__ == "__main__":
    main()
