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
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
GiB, MiB = 1 << 30, 1 << 20
LLAMA2_7B_8L = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
)
PROMPT = [1] + [(7919 * i) % 31000 + 500 for i in range(1, 32)]   # 32 token ids < vocab


# --- the model ---------------------------------------------------------------------------

def make_model(out: Path, seed: int = 0) -> None:
    """Random-weight Llama-2-7B shape, 8 layers, bfloat16, one safetensors file per layer
    (written tensor by tensor: never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    c = LLAMA2_7B_8L
    H, I, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    files, weight_map = [], {}
    parts = [("head", {"model.embed_tokens.weight": lambda: rand(V, H), "model.norm.weight": lambda: torch.ones(H, dtype=torch.bfloat16),
                       "lm_head.weight": lambda: rand(V, H)})]
    for i in range(L):
        p = f"model.layers.{i}."
        parts.append((f"layer{i}", {
            p + "input_layernorm.weight": lambda: torch.ones(H, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": lambda: torch.ones(H, dtype=torch.bfloat16),
            **{p + f"self_attn.{n}_proj.weight": (lambda: rand(H, H)) for n in "qkvo"},
            p + "mlp.gate_proj.weight": lambda: rand(I, H), p + "mlp.up_proj.weight": lambda: rand(I, H),
            p + "mlp.down_proj.weight": lambda: rand(H, I),
        }))
    for k, (_, tensors) in enumerate(parts):
        fname = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({name: make() for name, make in tensors.items()}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        files.append(fname)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(c, indent=1))
    # A tokenizer for tpi's engine (the benchmark feeds token ids; the text is not read).
    from tpi.weights.sources import resolve_model

    smol = resolve_model("smollm2")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((smol / f).read_bytes())
    print(f"wrote {out}: {sum((out / f).stat().st_size for f in files) / 1e9:.2f} GB in {len(files)} files")


# --- cgroups and processes ------------------------------------------------------------------

def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


_CGROUPS = iter(range(1 << 30))


def make_cgroup(name: str, limit: int | None) -> Path:
    cg = CGROUP_ROOT / f"{name}-{os.getpid()}-{next(_CGROUPS)}"  # never reuse a name
    cg.mkdir()
    if limit is not None:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
    return cg


def remove_cgroup(cg: Path) -> None:
    """Kill what is left in the cgroup (only this benchmark's processes are put there), remove it."""
    for _ in range(50):
        pids = [int(p) for p in (cg / "cgroup.procs").read_text().split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            cg.rmdir()
            return
        except OSError:
            time.sleep(0.2)
    print(f"warning: could not remove {cg}", file=sys.stderr)


def cgroup_peak(cg: Path) -> int:
    return int((cg / "memory.max_usage_in_bytes").read_text())


def oom_killed(cg: Path) -> bool:
    try:
        text = (cg / "memory.oom_control").read_text()
    except OSError:
        return False
    return any(line.split() == ["oom_kill", str(n)] and n > 0 for line in text.splitlines()
               for n in [int(line.split()[1]) if line.startswith("oom_kill ") else 0])


def spawn_in(cg: Path, argv: list[str], log: Path) -> subprocess.Popen:
    def enter():  # runs in the child before exec: the process starts inside its cgroup
        (cg / "cgroup.procs").write_text(str(os.getpid()))

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("BENCH_THREADS", "1"))
    return subprocess.Popen(argv, preexec_fn=enter, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.send_signal(signal.SIGKILL)
            codes.append(-9)
    return codes


# --- one TPI device process -------------------------------------------------------------------

def device_main(args) -> None:
    """One device: rank 0 also reads the embedding rows and drives generation (as the master does)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    import torch.distributed as dist

    from tpi.comm.gloo import GlooCommunicator, make_store
    from tpi.engine import RuntimeOptions, build_runner, open_embedding
    from tpi.memory import peak_rss_bytes, rss_bytes
    from tpi.weights.store import ShardStore

    rank, world = args.rank, args.world
    tcp = make_store("127.0.0.1", args.port, world, rank == 0, 120.0)
    comm = GlooCommunicator(rank, world, tcp, 120.0, wire_dtype=torch.float32)
    idle_rss = rss_bytes()
    opts = RuntimeOptions(**json.loads(args.opts))
    store = ShardStore(args.store)
    embedder = open_embedding(store, opts.torch_compute_dtype()) if rank == 0 else None
    t0 = time.perf_counter()
    runner = build_runner(store, rank, opts)
    build_s = time.perf_counter() - t0
    after_build_rss = rss_bytes()
    H = store.config.hidden_size
    result: dict = {"rank": rank, "idle_rss": idle_rss, "build_s": build_s, "after_build_rss": after_build_rss}

    def step(x, slots, starts):
        ctrl = torch.tensor([x.shape[0], x.shape[1], starts[0], 1], dtype=torch.int64)
        dist.broadcast(ctrl, 0)
        dist.broadcast(x.float().contiguous(), 0)
        return runner.step(x, comm, slots, starts)

    if rank == 0:
        from tpi.cluster import Cluster
        from tpi.generate import Generator
        from tpi.model.sampling import SamplingParams

        class Bench(Cluster):
            world_size = world

            def forward(self, x, slots, starts):
                return step(x, slots, starts)

            def breakdowns(self):
                return [runner.last]

        gen = Generator(store.config, embedder, Bench(), None, opts.max_seq)
        gen.generate(PROMPT, SamplingParams(max_new_tokens=2))               # warm-up
        r = gen.generate(PROMPT, SamplingParams(max_new_tokens=args.tokens))
        dist.broadcast(torch.tensor([0, 0, 0, 0], dtype=torch.int64), 0)    # stop
        result.update(ttft_s=r.ttft_s, token_latency_s=r.token_latency_s, step_times_s=r.step_times_s,
                      tokens=r.tokens, breakdown=r.breakdowns[0].to_json())
    else:
        steps = 0
        total = None
        while True:
            ctrl = torch.empty(4, dtype=torch.int64)
            dist.broadcast(ctrl, 0)
            if ctrl[3].item() == 0:
                break
            B, T, start = (int(v) for v in ctrl[:3])
            x = torch.empty(B, T, H, dtype=torch.float32)
            dist.broadcast(x, 0)
            runner.step(x, comm, list(range(B)), [start] * B)
            steps += 1
        result["steps"] = steps
    describe = getattr(runner.blocks, "describe", None)
    result.update(peak_rss=peak_rss_bytes(), kv_bytes=runner.cache.nbytes,
                  blocks=describe() if describe else None,
                  largest_block=max(store.files[f].bytes for f in store.block_files(rank)),
                  head_bytes=0)  # the output head is in every device's slice; the master holds no table
    Path(args.result).write_text(json.dumps(result))
    runner.blocks.close()
    comm.close()


def run_tpi(name: str, store: Path, world: int, opts: dict, limits: list[int | None], tokens: int,
            workdir: Path) -> dict:
    port = free_port()
    procs, cgs = [], []
    drop_caches()
    for rank in range(world):
        cg = make_cgroup(f"tpi-bench-{rank}", limits[rank])
        cgs.append(cg)
        argv = [sys.executable, __file__, "device", "--rank", str(rank), "--world", str(world), "--port", str(port),
                "--store", str(store), "--opts", json.dumps(opts), "--tokens", str(tokens),
                "--result", str(workdir / f"{name}-{rank}.json")]
        procs.append(spawn_in(cg, argv, workdir / f"{name}-{rank}.log"))
        if rank == 0:
            time.sleep(1.0)  # the TCP store is hosted by rank 0
    codes = wait_all(procs, 1800)
    out = {"system": name, "kind": "tpi", "opts": opts, "limits": limits, "exit_codes": codes, "devices": []}
    for rank, cg in enumerate(cgs):
        dev = {"rank": rank, "cgroup_peak": cgroup_peak(cg), "oom_killed": oom_killed(cg)}
        res = workdir / f"{name}-{rank}.json"
        if res.is_file():
            dev.update(json.loads(res.read_text()))
            res.unlink()
        out["devices"].append(dev)
        remove_cgroup(cg)
    d0 = out["devices"][0]
    out.update(ttft_s=d0.get("ttft_s"), token_latency_s=d0.get("token_latency_s"))
    return out


# --- the Hugging Face baselines ------------------------------------------------------------

def hf_main(args) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from transformers import AutoModelForCausalLM

    from tpi.memory import peak_rss_bytes, rss_bytes

    idle = rss_bytes()
    kw = dict(dtype=torch.bfloat16)
    if args.offload:
        kw.update(device_map="auto", max_memory={"cpu": args.max_memory}, offload_folder=args.offload_folder)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kw).eval()
    ids = torch.tensor([PROMPT])
    gen = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    def timed(n):
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen)
        return time.perf_counter() - t

    with torch.no_grad():
        timed(2)                                   # warm-up
        first = timed(1)
        total = timed(args.tokens)
    Path(args.result).write_text(json.dumps({
        "idle_rss": idle, "peak_rss": peak_rss_bytes(), "ttft_s": first,
        "token_latency_s": (total - first) / (args.tokens - 1),
        "device_map": sorted(set(map(str, getattr(model, "hf_device_map", {}).values()))),
    }))


def run_hf(name: str, model: Path, limit: int | None, offload: bool, max_memory: int, tokens: int, workdir: Path) -> dict:
    drop_caches()
    cg = make_cgroup("tpi-bench-hf", limit)
    argv = [sys.executable, __file__, "hf", "--model", str(model), "--tokens", str(tokens),
            "--result", str(workdir / f"{name}.json")]
    if offload:
        argv += ["--offload", "--max-memory", str(max_memory), "--offload-folder", str(workdir / "offload")]
    env_threads = os.environ.get("BENCH_HF_THREADS", "2")
    os.environ["BENCH_THREADS"], saved = env_threads, os.environ.get("BENCH_THREADS")
    try:
        proc = spawn_in(cg, argv, workdir / f"{name}.log")
    finally:
        if saved is None:
            os.environ.pop("BENCH_THREADS")
        else:
            os.environ["BENCH_THREADS"] = saved
    code = wait_all([proc], 3600)[0]
    out = {"system": name, "kind": "hf", "limits": [limit], "max_memory": max_memory if offload else None,
           "exit_codes": [code], "devices": [{"rank": 0, "cgroup_peak": cgroup_peak(cg), "oom_killed": oom_killed(cg)}]}
    res = workdir / f"{name}.json"
    if res.is_file():
        r = json.loads(res.read_text())
        out["devices"][0].update(r)
        out.update(ttft_s=r["ttft_s"], token_latency_s=r["token_latency_s"])
        res.unlink()
    remove_cgroup(cg)
    return out


# --- the matrix ------------------------------------------------------------------------------

def slice_info(store_dir: Path, world: int) -> dict:
    from tpi.engine import RuntimeOptions, kv_cache_bytes
    from tpi.weights.store import ShardStore

    store = ShardStore(store_dir)
    sizes = [[store.files[f].bytes for f in store.block_files(r)] for r in range(world)]
    return {"slice": max(sum(s) for s in sizes), "largest": max(max(s) for s in sizes),
            "head": 0, "sizes": sizes, "store": store,
            "kv": lambda opts: max(kv_cache_bytes(store, r, RuntimeOptions(**opts)) for r in range(world))}


def systems(args, info: dict) -> list[tuple[str, dict]]:
    """(name, spec) for every system of the matrix."""
    L, head, slc, big = args.limit, info["head"], info["slice"], info["largest"]
    base = dict(dtype="bfloat16", compute_dtype="bfloat16", max_seq=args.max_seq)  # zero-copy: compute in the storage dtype
    kv = info["kv"](base)
    tpi_limits = [L + head] + [L] * (args.world - 1)        # device 0 also holds the head
    out = [
        ("tpi scheduler off", dict(opts=dict(base, scheduler=False), limits=[None] * args.world, store="bfloat16")),
        ("tpi budget holds slice", dict(opts=dict(base, memory_budget=kv + slc), limits=[None] * args.world,
                                        store="bfloat16")),
        ("tpi window 2", dict(opts=dict(base, window=2, memory_budget=kv + 2 * big), limits=tpi_limits, store="bfloat16")),
        ("tpi window 4", dict(opts=dict(base, window=4, memory_budget=kv + 4 * big), limits=tpi_limits, store="bfloat16")),
    ]
    for frac in (0.25, 0.5, 0.75):
        out.append((f"tpi retention {int(frac * 100)}%", dict(
            opts=dict(base, window=2, memory_budget=kv + 2 * big + int(frac * slc)), limits=tpi_limits, store="bfloat16")))
    out += [
        ("tpi default budget", dict(opts=dict(base), limits=tpi_limits, store="bfloat16")),
        ("tpi int8", dict(opts=dict(base, dtype="int8", compute_dtype="bfloat16"), limits=tpi_limits, store="int8")),
        ("tpi int4", dict(opts=dict(base, dtype="int4", compute_dtype="bfloat16"), limits=tpi_limits, store="int4")),
        ("accelerate disk offload", dict(hf=True, offload=True, limit=L)),
        ("transformers whole model", dict(hf=True, offload=False, limit=None)),
    ]
    only = set(args.only.split(",")) if args.only else None
    return [(n, s) for n, s in out if only is None or any(o in n for o in only)]


def cmd_run(args) -> None:
    from tpi.weights.scheduler import parse_size

    args.limit = parse_size(args.limit)
    stores = Path(args.stores)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = slice_info(stores / "bfloat16", args.world)
    matrix = systems(args, info)
    results = []
    for rnd in range(args.rounds):
        for name, spec in matrix:
            t = time.time()
            if spec.get("hf"):
                r = run_hf(name, Path(args.model), spec["limit"], spec["offload"], args.limit, args.tokens, workdir)
            else:
                r = run_tpi(name.replace(" ", "_").replace("%", ""), stores / spec["store"], args.world, spec["opts"],
                            spec["limits"], args.tokens, workdir)
                r["system"] = name
            r.update(round=rnd, wall_s=time.time() - t, loadavg=os.getloadavg())
            results.append(r)
            peaks = [d.get("peak_rss") for d in r["devices"]]
            print(f"[round {rnd}] {name}: ttft {r.get('ttft_s')} s, {r.get('token_latency_s')} s/token, "
                  f"peak rss {[p and round(p / MiB) for p in peaks]} MiB, exit {r['exit_codes']}", flush=True)
            Path(args.json).write_text(json.dumps(meta(args, info) | {"runs": results}, indent=1))


def meta(args, info) -> dict:
    import torch

    return {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": {"platform": platform.platform(), "cpu": _cpu(), "cores": os.cpu_count(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
                    "torch": torch.__version__, "python": platform.python_version()},
        "model": "random Llama-2-7B shape, 8 layers, bfloat16", "world": args.world, "tokens": args.tokens,
        "prompt_tokens": len(PROMPT), "limit": args.limit, "max_seq": args.max_seq,
        "slice_bytes": info["slice"], "largest_block": info["largest"], "head_bytes": info["head"],
    }


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# --- splitting ---------------------------------------------------------------------------------

def cmd_split(args) -> None:
    """Split the model into the stores the matrix uses, each in a cgroup, recording peaks."""
    from tpi.weights.scheduler import parse_size

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for dtype in args.dtypes.split(","):
        drop_caches()
        cg = make_cgroup("tpi-bench-split", parse_size(args.limit))
        code = ("import json,sys,time; from tpi.engine import prepare_store; from tpi.memory import peak_rss_bytes;"
                f"t=time.time(); prepare_store({args.model!r}, [1.0]*{args.world}, {dtype!r}, {str(out / dtype)!r});"
                "print(json.dumps({'seconds': time.time()-t, 'peak_rss': peak_rss_bytes()}))")
        log = out / f"split-{dtype}.log"
        proc = spawn_in(cg, [sys.executable, "-c", code], log)
        rc = wait_all([proc], 3600)[0]
        last = log.read_text().strip().splitlines()[-1] if log.read_text().strip() else "{}"
        rec = {"dtype": dtype, "exit_code": rc, "cgroup_limit": parse_size(args.limit), "cgroup_peak": cgroup_peak(cg),
               **(json.loads(last) if last.startswith("{") else {"error": last})}
        remove_cgroup(cg)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    (out / "split-results.json").write_text(json.dumps(records, indent=1))


# --- plotting --------------------------------------------------------------------------------

def cmd_plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.json).read_text())
    names = list(dict.fromkeys(r["system"] for r in data["runs"]))
    med = {}
    for n in names:
        runs = [r for r in data["runs"] if r["system"] == n and r.get("token_latency_s")]
        if not runs:
            continue
        med[n] = (statistics.median(r["token_latency_s"] for r in runs),
                  statistics.median(r["ttft_s"] for r in runs),
                  max(max((d.get("peak_rss") or 0) for d in (r["devices"][1:] or r["devices"])) for r in runs) / GiB)
    names = list(med)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    colors = ["#888888" if "accelerate" in n or "transformers" in n else "#1f77b4" for n in names]
    for ax, k, label in zip(axes, range(3), ["ms / token (decode, median)", "TTFT s (median)", "peak RSS GiB, devices 1-3 (device 0: + head)"]):
        vals = [med[n][k] * (1000 if k == 0 else 1) for n in names]
        ax.barh(names, vals, color=colors)
        ax.set_title(label)
        ax.invert_yaxis()
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.0f}" if k == 0 else f" {v:.2f}", va="center", fontsize=8)
    fig.suptitle(f"{data['model']}, {data['world']} devices, per-device limit {data['limit'] / GiB:.2f} GiB "
                 f"(+head on device 0), {data['tokens']} new tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


def cmd_report(args) -> None:
    """Markdown table of medians and the target checks, from one or more result files."""
    runs, data = [], None
    for f in args.json:
        d = json.loads(Path(f).read_text())
        data = data or d
        runs += d["runs"]
    names = list(dict.fromkeys(r["system"] for r in runs))
    fmt = lambda b: "-" if not b else f"{b / GiB:.2f}"
    rows, med = [], {}
    print("| system | limit per device (GiB) | TTFT s | ms/token | ms/token runs | peak RSS per device (GiB) | cgroup peak per device (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        rs = [r for r in runs if r["system"] == n]
        ok = [r for r in rs if r.get("token_latency_s")]
        lim = rs[0]["limits"]
        limit = "none" if all(x is None for x in lim) else " / ".join(fmt(x) if x else "none" for x in lim[:2]) + (" ..." if len(lim) > 2 else "")
        if not ok:
            codes = [r["exit_codes"] for r in rs]
            print(f"| {n} | {limit} | failed {codes} (OOM: {[any(d['oom_killed'] for d in r['devices']) for r in rs]}) | | | | |")
            continue
        tok = statistics.median(r["token_latency_s"] for r in ok)
        ttft = statistics.median(r["ttft_s"] for r in ok)
        peaks = [max((r["devices"][i].get("peak_rss") or 0) for r in ok) for i in range(len(ok[0]["devices"]))]
        cgp = [max(r["devices"][i]["cgroup_peak"] for r in ok) for i in range(len(ok[0]["devices"]))]
        med[n] = dict(tok=tok, ttft=ttft, peaks=peaks, run=ok[0])
        each = ", ".join(str(round(r["token_latency_s"] * 1000)) for r in ok)
        print(f"| {n} | {limit} | {ttft:.1f} | {tok * 1000:.0f} | {each} "
              f"| {' / '.join(fmt(p) for p in peaks)} | {' / '.join(fmt(p) for p in cgp)} |")
    print()
    for w in (2, 4):
        n = f"tpi window {w}"
        if n not in med:
            continue
        for dev in med[n]["run"]["devices"]:
            bound = dev["idle_rss"] + (w + 1) * dev["largest_block"] + dev["kv_bytes"] + dev.get("head_bytes", 0)
            peak = med[n]["peaks"][dev["rank"]]
            print(f"- window {w}, device {dev['rank']}: peak {fmt(peak)} GiB <= idle {fmt(dev['idle_rss'])} + "
                  f"{w + 1} x {dev['largest_block'] / MiB:.0f} MiB + KV {dev['kv_bytes'] / MiB:.1f} MiB"
                  + (f" + head {dev['head_bytes'] / MiB:.0f} MiB" if dev.get("head_bytes") else "")
                  + f" = {fmt(bound)} GiB: {'yes' if peak <= bound else 'NO'}")
    acc = med.get("accelerate disk offload")
    if acc:
        for n in ("tpi default budget", "tpi window 2", "tpi retention 75%", "tpi int8", "tpi int4"):
            if n in med:
                print(f"- Accelerate / {n}: {acc['tok'] / med[n]['tok']:.2f}x (target >= 5x)")
    if "tpi scheduler off" in med and "tpi budget holds slice" in med:
        print(f"- budget holding the slice / scheduler off: {med['tpi budget holds slice']['tok'] / med['tpi scheduler off']['tok']:.2f}x (target <= 1.2x)")


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
