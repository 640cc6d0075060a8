"""Memory at 70B scale: a random-weight model with the shape of Llama-3.1-70B (hidden 8192,
64 heads, 8 KV heads, MLP 28672, vocabulary 128256) truncated to a few layers, served by the
product path on 8 devices (`tpi master` + 7 `tpi worker` processes over loopback WebSockets),
each process in its own cgroup (v1) with a memory limit, default flags (each device's budget
is derived from its limit); peak memory per device against the limit.

    python bench/memory70b.py make-model --out /dev/shm/tpi70b-src/llama31-70b-2l
    python bench/memory70b.py split --model /dev/shm/tpi70b-src/llama31-70b-2l --out /dev/shm/tpi70b-store --delete-source
    python bench/memory70b.py run --store /dev/shm/tpi70b-store --limit 1GB --json docs/benchmarks-memory-70b.json
    python bench/memory70b.py generate --store /dev/shm/tpi70b-store --json docs/benchmarks-memory-70b-generate.json

`run` starts the master and workers itself, each in a cgroup; `generate` runs
`tpi generate --transport ws --devices 8` (which starts its own workers, so no cgroup per
device: no limit, every block resident) and reads each device's peak RSS from its --json.

(The source, 7.6 GB, and the store, 7.6 GB, need ~15 GB side by side unless --delete-source;
on the shared CI machine they were put on tmpfs for lack of disk: see docs/benchmarks-memory.md.)

Needs root (cgroups, drop_caches). Not a test. See docs/benchmarks-memory.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_run import cold_start, free_port, proc_status, stop_all  # noqa: E402
from tpi.bench.cgroup import Cgroup  # noqa: E402

MiB, GB = 1 << 20, 10**9
LLAMA31_70B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192, intermediate_size=28672,
    num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
)
PROMPT = [128000] + [(7919 * i) % 120000 + 1000 for i in range(1, 16)]   # 16 token ids


# --- the model: written tensor by tensor, chunk by chunk ---------------------------------

def _write_file(path: Path, tensors: list[tuple[str, tuple[int, ...], str]], seed: int) -> int:
    """A bfloat16 safetensors file of `tensors` (name, shape, "rand" | "ones"), generated and
    written 16 MiB at a time, its pages dropped from the cache: the writer never holds a
    tensor (an MLP projection is 470 MB, the embedding 2.1 GB)."""
    import torch

    header, offset = {}, 0
    for name, shape, _ in tensors:
        n = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    g = torch.Generator().manual_seed(seed)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, kind in tensors:
            cols = shape[-1]
            rows = 1 if len(shape) == 1 else shape[0]
            step = max(1, (16 * MiB) // (2 * cols))
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                if kind == "ones":
                    chunk = torch.ones(n, cols, dtype=torch.bfloat16)             # (n, cols)
                else:
                    chunk = (torch.randn(n, cols, generator=g) * 0.02).to(torch.bfloat16)  # (n, cols)
                f.write(chunk.view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.replace(tmp, path)
    return 8 + len(raw) + offset


def word_tokenizer(out: Path, vocab: int, bos: int, eos: int) -> None:
    """A word-level tokenizer of `vocab` tokens "t0" ... so that every id of a random model decodes."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": f"t{bos}", "eos_token": f"t{eos}"}))


def make_model(out: Path, layers: int) -> None:
    """Random weights, Llama-3.1-70B shape, `layers` layers, bfloat16; a word-level tokenizer
    with the model's 128256 tokens ("t0" ... "t128255") so that every id decodes."""
    out.mkdir(parents=True, exist_ok=True)
    c = dict(LLAMA31_70B, num_hidden_layers=layers)
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = H // c["num_attention_heads"] * c["num_key_value_heads"]          # 1024
    files = {"model-head.safetensors": [("model.embed_tokens.weight", (V, H), "rand"),
                                        ("model.norm.weight", (H,), "ones"),
                                        ("lm_head.weight", (V, H), "rand")]}
    for i in range(layers):
        p = f"model.layers.{i}."
        files[f"model-layer{i:02d}.safetensors"] = [
            (p + "input_layernorm.weight", (H,), "ones"), (p + "post_attention_layernorm.weight", (H,), "ones"),
            (p + "self_attn.q_proj.weight", (H, H), "rand"), (p + "self_attn.k_proj.weight", (kv, H), "rand"),
            (p + "self_attn.v_proj.weight", (kv, H), "rand"), (p + "self_attn.o_proj.weight", (H, H), "rand"),
            (p + "mlp.gate_proj.weight", (I, H), "rand"), (p + "mlp.up_proj.weight", (I, H), "rand"),
            (p + "mlp.down_proj.weight", (H, I), "rand")]
    total, weight_map = 0, {}
    for k, (fname, tensors) in enumerate(files.items()):
        t = time.time()
        total += _write_file(out / fname, tensors, seed=k)
        weight_map.update({name: fname for name, _, _ in tensors})
        print(f"wrote {fname} in {time.time() - t:.0f} s", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(c, indent=1))
    word_tokenizer(out, V, bos=c["bos_token_id"], eos=c["eos_token_id"])
    print(f"wrote {out}: {total / 1e9:.2f} GB", flush=True)


# --- splitting ----------------------------------------------------------------------------

def cmd_split(args) -> None:
    """Split for `--world` devices. With --delete-source, each source file is deleted as soon
    as the splitter has written everything made from it (the head file once every device's
    head pieces exist, a layer's file once its blocks exist): source + store never need to
    fit side by side (the machine's disk or tmpfs could not hold both)."""
    out, model = Path(args.out), Path(args.model)
    code = ("import json,sys,time; from tpi.engine import prepare_store; from tpi.host import peak_rss_bytes;"
            f"t=time.time(); s=prepare_store({args.model!r}, [1.0]*{args.world}, 'bfloat16', {str(out)!r});"
            "print(json.dumps({'seconds': time.time()-t, 'peak_rss': peak_rss_bytes(), "
            "'bytes': sum(f.bytes for f in s.files.values())}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if args.delete_source:
        from tpi.config import load_model_config
        from tpi.plan import make_plan
        from tpi.weights.slicing import DEFAULT_MAX_BLOCK_BYTES, block_pieces
        from tpi.weights.store import block_path

        cfg = load_model_config(model)
        wmap = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
        plan = make_plan(cfg, [1.0] * args.world)
        # the pieces prepare_store cuts (its default cap): a source is deleted once all exist
        pieces = {s.rank: block_pieces(cfg, s, "bfloat16", DEFAULT_MAX_BLOCK_BYTES) for s in plan.shards}

        def files(layer: int, kinds) -> list[Path]:
            return [out / block_path(r, layer, k, p if len(pieces[r][k]) > 1 else None)
                    for r in pieces for k in kinds for p in range(len(pieces[r][k]))]

        pending = [(model / wmap["lm_head.weight"], files(cfg.num_layers, ["head"]))]
        pending += [(model / wmap[f"model.layers.{i}.mlp.down_proj.weight"], files(i, ["attn", "mlp"]))
                    for i in range(cfg.num_layers)]
        while proc.poll() is None and pending:
            src, made = pending[0]
            if all(f.is_file() for f in made):
                src.unlink()
                print(f"deleted {src.name}: everything made from it is written", flush=True)
                pending.pop(0)
            time.sleep(0.5)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(stderr[-3000:])
    rec = json.loads(stdout.strip().splitlines()[-1])
    (out / "split-result.json").write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec), flush=True)


# --- the run ----------------------------------------------------------------------------------

IDLE_WORKER = "import torch, tpi.engine, tpi.comm.client, tpi.protocol, tpi_worker.main"
IDLE_MASTER = IDLE_WORKER + ", tpi.comm.hub, tpi_master.main, tpi_master.http_api, tpi.cluster.manager"


def idle_rss(imports: str, tokenizer_dir: Path | None = None) -> int:
    """RSS of a process that has imported what a worker (or the master) imports and loaded no
    weights; the master's also holds the tokenizer (128256 entries here), which it needs
    before any weight."""
    code = imports + "; from tpi.host import rss_bytes"
    if tokenizer_dir is not None:
        code += f"; from tpi.tokenizer import ChatTokenizer; t = ChatTokenizer({str(tokenizer_dir)!r})"
    code += "; print(rss_bytes())"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=env).stdout.split()[-1])


def start_product_cluster(store: Path, cgs: list[Cgroup], workdir: Path, tag: str, procs: list[subprocess.Popen],
                          master_args: list[str]) -> str:
    """`tpi master` (rank 0) and `tpi worker`s over loopback, device r in cgs[r], appended to
    `procs` (master first) as they start; waits for /healthz and returns the HTTP API's URL."""
    token, hub_port, http_port = secrets.token_hex(16), free_port(), free_port()
    common = ["--join-token", token, "--timeout", "900"]
    t0 = time.time()
    for r in range(1, len(cgs)):
        procs.append(cgs[r].spawn([sys.executable, "-m", "tpi_cli", "worker", "--master", f"ws://127.0.0.1:{hub_port}",
                                   "--rank", str(r), "--name", f"w{r}", "--once", *common],
                                  workdir / f"{tag}worker-{r}.log", dict(os.environ)))
    procs.insert(0, cgs[0].spawn([sys.executable, "-m", "tpi_cli", "master", "--model", str(store),
                                  "--devices", str(len(cgs)), "--listen", f"127.0.0.1:{hub_port}",
                                  "--http", f"127.0.0.1:{http_port}", "--start-timeout", "900", *master_args,
                                  *common], workdir / f"{tag}master.log", dict(os.environ)))
    url = f"http://127.0.0.1:{http_port}"
    while True:
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a device exited: {[p.poll() for p in procs]}; see {workdir}")
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                return url
        except requests.RequestException:
            pass
        if time.time() - t0 > 1800:
            raise SystemExit("the cluster did not come up in 30 minutes")
        time.sleep(1)


def cmd_run(args) -> None:
    from tpi.settings import RuntimeOptions
    from tpi.engine import kv_cache_bytes
    from tpi.weights.retention import block_costs
    from tpi.weights.budget import parse_size
    from tpi.weights.store import ShardStore

    store = ShardStore(args.store)
    world, cfg = store.plan.world_size, store.config
    limit = parse_size(args.limit)
    opts = RuntimeOptions(num_slots=4)   # what `tpi master` runs with its default flags (4 slots)
    largest = [max(block_costs(store, r, opts.torch_compute_dtype())) for r in range(world)]
    # one request: one KV slot allocated (tpi.model.kvcache), the other slots' room holds weights
    kv = [kv_cache_bytes(store, r, opts) // opts.num_slots for r in range(world)]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    idle = {"worker": idle_rss(IDLE_WORKER), "master": idle_rss(IDLE_MASTER, store.model_dir)}
    print(f"idle RSS: {idle}; largest piece {max(largest) / MiB:.1f} MiB; KV {max(kv) / MiB:.1f} MiB", flush=True)

    cold_start()
    cgs = [Cgroup(f"tpi70b-{r}", limit) for r in range(world)]
    procs: list[subprocess.Popen] = []
    t0 = time.time()
    try:
        url = start_product_cluster(store.root, cgs, workdir, "", procs, [])  # default flags: no dtype, budget or window
        ready_s = time.time() - t0
        t1 = time.time()
        resp = requests.post(url + "/v1/completions", timeout=3600, json={
            "model": str(store.root), "prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0,
            "ignore_eos": True})
        resp.raise_for_status()
        body = resp.json()
        gen_s = time.time() - t1
        status = [proc_status(p.pid) for p in procs]
        cluster = requests.get(url + "/api/cluster", timeout=30).json()
        peaks = [(cg.peak(), cg.oom_kills() > 0) for cg in cgs]
    finally:
        stop_all(procs)
        for cg in cgs:   # also when a device failed to start: no cgroup is left behind
            cg.remove()
    devices = []
    for r in range(world):
        role = "master" if r == 0 else "worker"
        peak = status[r]["VmHWM"]
        # With default flags the budget is the limit's (limit - RSS - headroom): the device holds
        # resident what fits, so its bound is the limit itself (not idle + window + KV, the bound
        # of a streaming-only budget flag), and an 80-layer model's KV would come out of the
        # same budget (fewer resident pieces), not on top of this peak.
        devices.append({
            "rank": r, "role": role, "idle_rss": idle[role], "peak_rss": peak, "rss_end": status[r]["VmRSS"],
            "cgroup_peak": peaks[r][0], "oom_killed": peaks[r][1], "limit": limit,
            "largest_piece": largest[r], "kv_bytes": kv[r], "bound": limit, "within_bound": peak <= limit,
            "within_limit": max(peak, peaks[r][0]) <= limit,
        })
    import torch

    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)},
        "loadavg_end": os.getloadavg(), "model": f"random Llama-3.1-70B shape, {cfg.num_layers} layers, bfloat16",
        "world": world, "window": opts.window, "max_seq": opts.max_seq, "limit": limit, "flags": "defaults",
        "pieces": store.pieces(1), "store_bytes": sum(f.bytes for f in store.files.values()),
        "tokens": body["choices"][0]["text"], "usage": body.get("usage"), "ready_s": ready_s,
        "generation_s": gen_s, "cluster": cluster, "devices": devices,
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    for d in devices:
        print(f"device {d['rank']} ({d['role']}): idle {d['idle_rss'] / MiB:.0f} MiB, peak RSS {d['peak_rss'] / MiB:.0f} "
              f"MiB, cgroup peak {d['cgroup_peak'] / MiB:.0f} MiB, limit {limit / MiB:.0f} MiB "
              f"({'within' if d['within_limit'] else 'OVER'})", flush=True)


def cmd_generate(args) -> None:
    """`tpi generate --model STORE --devices N --transport ws` with default flags, caches dropped;
    each device's peak RSS as the product's --json reports it."""
    from tpi.weights.store import ShardStore

    store = ShardStore(args.store)
    world = store.plan.world_size
    prompt = " ".join(f"t{i}" for i in PROMPT)
    argv = [sys.executable, "-m", "tpi_cli", "generate", "--model", str(store.root), "--devices", str(world),
            "--transport", "ws", "--prompt", prompt, "--max-new-tokens", str(args.tokens), "--json"]
    cold_start()
    t0 = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"tpi generate exited {proc.returncode}: {proc.stderr[-3000:]}")
    body = json.loads(proc.stdout)
    devices = [{"rank": d["rank"], "role": "master" if d["rank"] == 0 else "worker", "peak_rss": d.get("peak_rss_bytes"),
                "within_1GB": (d.get("peak_rss_bytes") or 0) <= GB} for d in body["devices"]]
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv),
              "product_command": "tpi " + " ".join(argv[3:]), "seconds": time.time() - t0,
              "model": f"random Llama-3.1-70B shape, {store.config.num_layers} layers, bfloat16, tpi generate --transport ws",
              "loadavg_end": os.getloadavg(), "world": world, "flags": "defaults", "tokens": body["tokens"],
              "ttft_s": body["ttft_s"], "token_latency_s": body["token_latency_s"], "devices": devices}
    Path(args.json).write_text(json.dumps(result, indent=1))
    for d in devices:
        print(f"device {d['rank']}: peak RSS {d['peak_rss'] / MiB:.0f} MiB ({d['peak_rss'] / GB:.3f} GB, "
              f"{'<= 1 GB' if d['within_1GB'] else 'OVER 1 GB'})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--out", required=True)
    m.add_argument("--layers", type=int, default=2)
    s = sub.add_parser("split")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--world", type=int, default=8)
    s.add_argument("--delete-source", action="store_true",
                   help="delete each source file as soon as the splitter no longer needs it")
    r = sub.add_parser("run")
    r.add_argument("--store", required=True)
    r.add_argument("--limit", default="1GB", help="per-device cgroup limit")
    r.add_argument("--tokens", type=int, default=8)
    r.add_argument("--json", required=True)
    r.add_argument("--workdir", default="/var/tmp/tpi-bench/work70b")
    g = sub.add_parser("generate")
    g.add_argument("--store", required=True)
    g.add_argument("--tokens", type=int, default=8)
    g.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.cmd == "make-model":
        if shutil.disk_usage(Path(args.out).parent).free < 18 * GB:
            print("warning: less than 18 GB free; the model (7.6 GB) and its store (7.6 GB) need ~15 GB",
                  file=sys.stderr)
        make_model(Path(args.out), args.layers)
    else:
        {"split": cmd_split, "run": cmd_run, "generate": cmd_generate}[args.cmd](args)


if __name__ == "__main__":
    main()
