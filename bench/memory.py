"""Memory benchmark: TPI's sliding-window scheduler, retention and quantized stores against
Transformers (whole model) and Accelerate disk offload, each device in its own cgroup.

    python bench/memory.py make-model --out /var/tmp/tpi-bench/llama2-7b-8l
    python bench/memory.py split --model /var/tmp/tpi-bench/llama2-7b-8l --out /var/tmp/tpi-bench/stores
    python bench/memory.py run --model ... --stores ... --limit 1GiB --rounds 3 --json docs/benchmarks-memory.json
    python bench/memory.py plot --json docs/benchmarks-memory.json --png docs/benchmarks-memory.png

Devices are separate processes (torch.distributed gloo all-reduce on localhost), one cgroup
(v1) each with its memory limit; caches are dropped before every run (see
/work/shared/BENCHMARKING.md). Needs root. Not a test.
"""
# The command line only; each command's work is in its own file beside this one:
#   memory_model.py   the model (make-model) and its shard stores (split)
#   memory_matrix.py  the systems compared and the rounds over them (run)
#   memory_run.py     starting one system's processes, each in a cgroup, and reading their figures
#   memory_device.py  one TPI device (device), memory_hf.py the Hugging Face baseline (hf)
#   memory_report.py  the table of medians and target checks (report), the bar chart (plot)
from __future__ import annotations

import argparse
from pathlib import Path

from memory_device import device_main
from memory_hf import hf_main
from memory_matrix import cmd_run
from memory_model import cmd_split, make_model
from memory_report import cmd_plot, cmd_report

GiB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--out", required=True)
    s = sub.add_parser("split")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--world", type=int, default=4)
    s.add_argument("--dtypes", default="bfloat16,int8,int4")
    s.add_argument("--limit", default="1.5GiB", help="cgroup limit for the splitter")
    s.add_argument("--max-block-size", default=None, metavar="SIZE",
                   help="cut blocks bigger than this into pieces (default: the product's, "
                        "tpi.weights.slicing.DEFAULT_MAX_BLOCK_BYTES)")
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--stores", required=True)
    r.add_argument("--world", type=int, default=4)
    r.add_argument("--limit", default="1GiB", help="per-device cgroup limit (device 0: + the head)")
    r.add_argument("--tokens", type=int, default=16)
    r.add_argument("--max-seq", type=int, default=256)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--only", default=None, help="comma-separated substrings of system names")
    r.add_argument("--json", required=True)
    r.add_argument("--workdir", default="/var/tmp/tpi-bench/work")
    p = sub.add_parser("plot")
    p.add_argument("--json", required=True)
    p.add_argument("--png", required=True)
    rep = sub.add_parser("report")
    rep.add_argument("--json", nargs="+", required=True)
    d = sub.add_parser("device")
    for a in ("--rank", "--world", "--port", "--tokens"):
        d.add_argument(a, type=int, required=True)
    for a in ("--store", "--opts", "--result"):
        d.add_argument(a, required=True)
    h = sub.add_parser("hf")
    h.add_argument("--model", required=True)
    h.add_argument("--tokens", type=int, required=True)
    h.add_argument("--result", required=True)
    h.add_argument("--offload", action="store_true")
    h.add_argument("--max-memory", type=int, default=GiB)
    h.add_argument("--offload-folder", default=None)
    args = ap.parse_args()
    {"make-model": lambda a: make_model(Path(a.out)), "split": cmd_split, "run": cmd_run, "plot": cmd_plot, "report": cmd_report,
     "device": device_main, "hf": hf_main}[args.cmd](args)


if __name__ == "__main__":
    main()
