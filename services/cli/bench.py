"""`tpi bench testbed|baselines|report`: the flags, made into the harness's typed settings
(tpi.bench.sweep.Sweep, tpi.bench.baselines.Baselines) here; the work is in tpi.bench."""
from __future__ import annotations

import argparse
from pathlib import Path

from tpi.bench.testbed import PROMPT, RESULTS


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True)

    t = sub.add_parser("testbed", help="run emulated edge clusters over a sweep; one results JSON per run")
    t.add_argument("--runner", choices=["docker", "local"], default="docker",
                   help="docker: containers from --image with limits; local: `tpi generate --transport ws` processes")
    t.add_argument("--devices", default="1,2,4", help="device counts, e.g. 1,2,4")
    t.add_argument("--latencies", default="0", help="one-way link latencies in ms, e.g. 0,1,5,20")
    t.add_argument("--bandwidths", default=None, help="link bandwidths, e.g. 300mbit,20mbit (default: unlimited)")
    t.add_argument("--allreduce", default="star", help="star, ring or star,ring")
    t.add_argument("--window", default="2", help="scheduler windows, e.g. 2,4")
    t.add_argument("--budget", default=None, help="per-device memory budgets, e.g. none,138MiB (none: derived)")
    t.add_argument("--scheduler", default="on", help="on, off or on,off (off: every block resident)")
    t.add_argument("--no-scheduler", action="store_true", help="same as --scheduler off")
    t.add_argument("--dtype", default="bfloat16", help="storage dtypes, e.g. bfloat16,int8")
    t.add_argument("--compute-dtype", default=None)
    t.add_argument("--mem-limit", default=None, help="docker: memory limits per container, e.g. 1g or 1g,none")
    t.add_argument("--master-mem-limit", default=None,
                   help="docker: the master's limit when --mem-limit applies (it also holds the head), e.g. 1536m")
    t.add_argument("--max-seq", type=int, default=None, help="context length (KV cache size)")
    t.add_argument("--repeats", type=int, default=1, help="runs per configuration, interleaved")
    t.add_argument("--cpus", type=float, default=None, help="docker: CPUs per container, e.g. 0.5")
    t.add_argument("--tokens", type=int, default=16, help="new tokens per run (greedy)")
    t.add_argument("--prompt", default=PROMPT)
    t.add_argument("--model", default=None)
    t.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    t.add_argument("--out", default=str(RESULTS))

    b = sub.add_parser("baselines", help="Hugging Face transformers on the same model, prompt and tokens")
    b.add_argument("--dtype", default="float32,bfloat16")
    b.add_argument("--tokens", type=int, default=16)
    b.add_argument("--prompt", default=PROMPT)
    b.add_argument("--model", default=None)
    b.add_argument("--rounds", type=int, default=3, help="median over this many rounds")
    b.add_argument("--systems", default="whole", help="whole (transformers), offload (+ Accelerate disk offload), "
                                                       "or whole,offload")
    b.add_argument("--offload", action="store_true", help="same as adding offload to --systems")
    b.add_argument("--max-memory", default="1GiB", help="offload: Accelerate's max_memory (the per-device budget)")
    b.add_argument("--limit", default=None, help="offload: the cgroup memory limit (default: --max-memory)")
    b.add_argument("--offload-dir", default=None, help="offload: where the offload folder goes (default: /tmp)")
    b.add_argument("--timeout", type=float, default=1800.0, help="seconds per system")
    b.add_argument("--out", default=str(RESULTS))

    r = sub.add_parser("report", help="regenerate docs/benchmarks.md and its plots from the results")
    r.add_argument("--results", default=str(RESULTS))
    r.add_argument("--out", default="docs/benchmarks.md")


def _list(text: str | None, item=str, none_words: bool = False) -> tuple:
    """'1,2,4' -> (1, 2, 4); with none_words, 'none'/'default'/'' items become None; None -> (None,)."""
    if text is None:
        return (None,)
    return tuple(None if none_words and x.lower() in ("none", "default", "") else item(x) for x in text.split(","))


def sweep_from_args(args):
    from tpi.bench.sweep import Sweep

    return Sweep(runner=args.runner, devices=_list(args.devices, int), latencies_ms=_list(args.latencies, float),
                 bandwidths=_list(args.bandwidths), allreduce=_list(args.allreduce), windows=_list(args.window, int),
                 budgets=_list(args.budget, none_words=True),
                 schedulers=("off",) if args.no_scheduler else _list(args.scheduler),
                 dtypes=_list(args.dtype), mem_limits=_list(args.mem_limit, none_words=True),
                 compute_dtype=args.compute_dtype, master_mem_limit=args.master_mem_limit, cpus=args.cpus,
                 max_seq=args.max_seq, tokens=args.tokens, prompt=args.prompt, model=args.model,
                 repeats=args.repeats, timeout=args.timeout, out=Path(args.out))


def baselines_from_args(args):
    from tpi.bench.baselines import Baselines
    from tpi.weights.budget import parse_size

    systems = _list(args.systems)
    if args.offload and "offload" not in systems:
        systems += ("offload",)
    return Baselines(dtypes=_list(args.dtype), systems=systems, tokens=args.tokens, prompt=args.prompt,
                     model=args.model, rounds=args.rounds, max_memory=parse_size(args.max_memory),
                     limit=parse_size(args.limit) if args.limit else None, offload_dir=args.offload_dir,
                     timeout=args.timeout, out=Path(args.out))


def run(args) -> int:
    if args.bench_command == "testbed":
        from tpi.bench.testbed import run_sweep

        return run_sweep(sweep_from_args(args))
    if args.bench_command == "baselines":
        from tpi.bench.baselines import run_baselines

        return run_baselines(baselines_from_args(args))
    from tpi.bench.report import write_report

    return write_report(Path(args.results), Path(args.out))
