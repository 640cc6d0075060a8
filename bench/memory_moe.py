"""A mixture of experts on weak devices: a random-weight model of Qwen3-30B-A3B's shape (hidden
2048, 32 query and 4 KV heads of 128, 128 experts of width 768, 8 chosen per token,
vocabulary 151936) truncated to 2 layers, served by the product (`tpi master` + 3 `tpi worker`
over loopback WebSockets, default flags) on 4 devices, each process in its own 1 GiB memory
cgroup; beside it a dense Qwen3 of the same total size (MLP width 128 x 768) on the same cluster.
Per device: cgroup peak against the limit, and the bytes its scheduler read per generated token
(`bytes_read` in /api/cluster, after a warm-up request: the difference between a 1-token and a
(1 + N)-token request of the same prompt, over N); the greedy text against an unlimited run of the same processes.

    python bench/memory_moe.py make-model --kind moe --out /dev/shm/tpi-moe-src
    python bench/memory_moe.py split --model /dev/shm/tpi-moe-src --out /dev/shm/tpi-moe-store --delete-source
    python bench/memory_moe.py run --store /dev/shm/tpi-moe-store --json bench/results/memory-moe.json

(The store, 3.7 GB, is on tmpfs for lack of disk on the shared machine: its pages are charged to
the splitter, not to the devices' cgroups.) Needs root (cgroups, drop_caches). Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory70b import _write_file, start_product_cluster, word_tokenizer  # noqa: E402
from memory_run import cold_start, stop_all  # noqa: E402
from tpi.bench.cgroup import Cgroup  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
    decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, bos_token_id=151643,
    eos_token_id=151645, torch_dtype="bfloat16",
)
PROMPT = [151643] + [(7919 * i) % 150000 + 1000 for i in range(1, 16)]   # 16 token ids


def model_config(kind: str, layers: int) -> dict:
    c = dict(QWEN3_30B_A3B, num_hidden_layers=layers)
    if kind == "dense":  # the same parameters as one dense MLP of all the experts' columns
        c.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                 intermediate_size=c["num_experts"] * c["moe_intermediate_size"])
        for k in ("moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob",
                  "decoder_sparse_step", "mlp_only_layers"):
            c.pop(k)
    return c


def make_model(out: Path, kind: str, layers: int) -> None:
    """bfloat16 random weights, one safetensors file per layer (and one for the embedding and
    head), written chunk by chunk; a word-level tokenizer so every id decodes."""
    out.mkdir(parents=True, exist_ok=True)
    c = model_config(kind, layers)
    H, V, hd = c["hidden_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    files = {"model-head.safetensors": [("model.embed_tokens.weight", (V, H), "rand"),
                                        ("model.norm.weight", (H,), "ones"), ("lm_head.weight", (V, H), "rand")]}
    for i in range(layers):
        p = f"model.layers.{i}."
        t = [(p + "input_layernorm.weight", (H,), "ones"), (p + "post_attention_layernorm.weight", (H,), "ones"),
             (p + "self_attn.q_proj.weight", (q, H), "rand"), (p + "self_attn.k_proj.weight", (kv, H), "rand"),
             (p + "self_attn.v_proj.weight", (kv, H), "rand"), (p + "self_attn.o_proj.weight", (H, q), "rand"),
             (p + "self_attn.q_norm.weight", (hd,), "ones"), (p + "self_attn.k_norm.weight", (hd,), "ones")]
        if kind == "moe":
            w = c["moe_intermediate_size"]
            t.append((p + "mlp.gate.weight", (c["num_experts"], H), "rand"))
            for e in range(c["num_experts"]):
                x = f"{p}mlp.experts.{e}."
                t += [(x + "gate_proj.weight", (w, H), "rand"), (x + "up_proj.weight", (w, H), "rand"),
                      (x + "down_proj.weight", (H, w), "rand")]
        else:
            w = c["intermediate_size"]
            t += [(p + "mlp.gate_proj.weight", (w, H), "rand"), (p + "mlp.up_proj.weight", (w, H), "rand"),
                  (p + "mlp.down_proj.weight", (H, w), "rand")]
        files[f"model-layer{i:02d}.safetensors"] = t
    total, weight_map = 0, {}
    for k, (fname, tensors) in enumerate(files.items()):
        total += _write_file(out / fname, tensors, seed=k)
        weight_map.update({name: fname for name, _, _ in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(c, indent=1))
    word_tokenizer(out, V, bos=c["bos_token_id"], eos=c["eos_token_id"])
    print(f"wrote {out}: {total / 1e9:.2f} GB", flush=True)


def cmd_split(args) -> None:
    code = ("import json,time; from tpi.engine import prepare_store; from tpi.host import peak_rss_bytes;"
            f"t=time.time(); s=prepare_store({args.model!r}, [1.0]*{args.world}, 'bfloat16', {args.out!r});"
            "print(json.dumps({'seconds': time.time()-t, 'peak_rss': peak_rss_bytes(), "
            "'bytes': sum(f.bytes for f in s.files.values())}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    print(out.stdout.strip().splitlines()[-1], flush=True)
    if args.delete_source:
        shutil.rmtree(args.model)


def read_bytes(url: str) -> list[int]:
    """Bytes each device's scheduler has read from the store so far, as the master reports them."""
    devices = requests.get(url + "/api/cluster", timeout=30).json()["devices"]
    return [d["memory"]["bytes_read"] for d in sorted(devices, key=lambda d: d["rank"])]


def serve(store: Path, world: int, limit: int | None, tokens: int, workdir: Path, tag: str) -> dict:
    """The product's processes, default flags, each in its own cgroup (no limit: unlimited);
    a warm-up, a 1-token and a (1 + tokens)-token greedy request of PROMPT."""
    cold_start()
    cgs = [Cgroup(f"tpi-moe-{tag}-{r}", limit) for r in range(world)]
    procs: list[subprocess.Popen] = []
    try:
        url = start_product_cluster(store, cgs, workdir, f"{tag}-", procs, [])
        reads, texts, seconds = [], [], []
        for n in (1, 1, 1 + tokens):
            t1 = time.time()
            resp = requests.post(url + "/v1/completions", timeout=3600, json={
                "model": str(store), "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True})
            resp.raise_for_status()
            seconds.append(time.time() - t1)
            texts.append(resp.json()["choices"][0]["text"])
            reads.append(read_bytes(url))
        seconds = seconds[1:]   # reads[0]: after the warm-up
    finally:
        stop_all(procs)
    devices = []
    for r in range(world):
        one, more = reads[1][r] - reads[0][r], reads[2][r] - reads[1][r]
        devices.append({"rank": r, "cgroup_peak": cgs[r].peak(), "oom_killed": cgs[r].oom_kills() > 0,
                        "limit": limit, "within_limit": limit is None or cgs[r].peak() <= limit,
                        "read_bytes_1_token": one, "read_bytes_per_token": (more - one) / tokens})
        cgs[r].remove()
    return {"limit": limit, "text": texts[-1], "seconds": seconds, "devices": devices,
            "read_bytes_per_token": sum(d["read_bytes_per_token"] for d in devices)}


def cmd_run(args) -> None:
    from tpi.weights.budget import parse_size
    from tpi.weights.store import ShardStore

    store = ShardStore(args.store)
    cfg, world = store.config, store.plan.world_size
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    limited = serve(store.root, world, parse_size(args.limit), args.tokens, workdir, "limited")
    unlimited = serve(store.root, world, None, args.tokens, workdir, "unlimited")
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv), "loadavg_end": os.getloadavg(),
        "model": f"random {cfg.architecture} of Qwen3-30B-A3B's shape, {cfg.num_layers} layers, bfloat16",
        "store_bytes": sum(f.bytes for f in store.files.values()), "world": world, "tokens": args.tokens,
        "limited": limited, "unlimited": unlimited, "same_text": limited["text"] == unlimited["text"],
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    for d in limited["devices"]:
        print(f"device {d['rank']}: cgroup peak {d['cgroup_peak'] / MiB:.0f} MiB of {d['limit'] / MiB:.0f} "
              f"({'ok' if d['within_limit'] and not d['oom_killed'] else 'OVER'}), "
              f"{d['read_bytes_per_token'] / 1e6:.1f} MB read per token", flush=True)
    print(f"read per token, all devices: {limited['read_bytes_per_token'] / 1e6:.1f} MB; "
          f"text equal to the unlimited run: {result['same_text']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--out", required=True)
    m.add_argument("--kind", choices=["moe", "dense"], default="moe")
    m.add_argument("--layers", type=int, default=2)
    s = sub.add_parser("split")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--world", type=int, default=4)
    s.add_argument("--delete-source", action="store_true", help="delete the source once the store is whole")
    r = sub.add_parser("run")
    r.add_argument("--store", required=True)
    r.add_argument("--limit", default="1GiB", help="per-device cgroup limit")
    r.add_argument("--tokens", type=int, default=8)
    r.add_argument("--json", required=True)
    r.add_argument("--workdir", default="/var/tmp/tpi-bench/work-moe")
    args = ap.parse_args()
    if args.cmd == "make-model":
        make_model(Path(args.out), args.kind, args.layers)
    else:
        {"split": cmd_split, "run": cmd_run}[args.cmd](args)


if __name__ == "__main__":
    main()
