"""`tpi bench testbed`: run clusters over a sweep of configurations and write one results JSON
per run under bench/results/.

Two runners, one workload (prompt, new tokens, greedy):
  docker  a master container + N-1 worker containers from tpi:latest on a fresh bridge network,
          each with its own mem_limit and nano_cpus, one named volume for the model (copied in
          once), the shard store and TPI_CACHE; the link is emulated in the transport (--link),
          because this kernel has no netem. The workload goes through the master's HTTP API
          (streamed /v1/completions, temperature 0, ignore_eos); peak memory is each
          container's cgroup v1 memory.max_usage_in_bytes (page cache included) and the
          largest VmHWM of its processes.
  local   `tpi generate --transport ws --json`: a master and N-1 worker processes on loopback,
          no per-device memory limit (peak RSS per process instead).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from tpi.bench import machine
from tpi.host import drop_page_cache

RESULTS = Path("bench/results")
PROMPT = "The history of the printing press begins"


@dataclass(frozen=True)
class RunConfig:
    runner: str                  # "docker" | "local"
    devices: int
    latency_ms: float = 0.0      # one-way, every message each device sends
    bandwidth: str | None = None  # e.g. "300mbit"
    allreduce: str = "star"
    window: int = 2
    memory_budget: str | None = None
    no_scheduler: bool = False
    dtype: str = "bfloat16"
    compute_dtype: str | None = None
    mem_limit: str | None = None  # docker: per container, e.g. "1g"
    master_mem_limit: str | None = None  # docker: the master's container (it also holds the head); default mem_limit
    cpus: float | None = None     # docker: per container
    tokens: int = 16
    prompt: str = PROMPT
    model: str | None = None
    max_seq: int | None = None    # context length (KV cache size); default: the engine's

    @property
    def link(self) -> str | None:
        parts = []
        if self.latency_ms:
            parts.append(f"latency={self.latency_ms:g}ms")
        if self.bandwidth:
            parts.append(f"bandwidth={self.bandwidth}")
        return ",".join(parts) or None

    @property
    def bandwidth_bytes_s(self) -> float | None:
        if not self.bandwidth:
            return None
        m = re.fullmatch(r"([\d.]+)\s*([kmg]?)bit", self.bandwidth.lower())
        if not m:
            return None
        return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8

    def name(self) -> str:
        s = f"{self.runner}-n{self.devices}-{self.allreduce}-lat{self.latency_ms:g}ms"
        if self.bandwidth:
            s += f"-bw{self.bandwidth}"
        s += f"-{self.dtype}-w{self.window}"
        if self.memory_budget:
            s += f"-budget{self.memory_budget}"
        if self.no_scheduler:
            s += "-nosched"
        if self.mem_limit:
            s += f"-mem{self.mem_limit}"
        if self.master_mem_limit:
            s += f"-master{self.master_mem_limit}"
        return f"{model_slug(self.model)}-{s}"

    def engine_flags(self) -> list[str]:
        f = ["--dtype", self.dtype, "--window", str(self.window), "--allreduce", self.allreduce]
        if self.compute_dtype:
            f += ["--compute-dtype", self.compute_dtype]
        if self.memory_budget:
            f += ["--memory-budget", self.memory_budget]
        if self.no_scheduler:
            f += ["--no-scheduler"]
        if self.max_seq:
            f += ["--max-seq", str(self.max_seq)]
        return f


def model_slug(model: str | None) -> str:
    """A short name for a model source: 'smollm2' or a directory's name."""
    return Path(model).name if model else "smollm2"


# ---------------------------------------------------------------------------------------
# local runner

def run_local(cfg: RunConfig, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "tpi_cli", "generate", "--transport", "ws", "--devices", str(cfg.devices),
           "--json", "--greedy", "--prompt", cfg.prompt, "--max-new-tokens", str(cfg.tokens), *cfg.engine_flags()]
    if cfg.model:
        cmd += ["--model", cfg.model]
    if cfg.link:
        cmd += ["--link", cfg.link]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"tpi generate failed ({out.returncode}): {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    devices = [{"rank": d["rank"], "peak_rss_bytes": d["peak_rss_bytes"], "per_token": d["per_token"]}
               for d in r["devices"]]
    for d in devices:
        d["per_token"].pop("layers", None)
    return {"ttft_s": r["ttft_s"], "token_latency_s": r["token_latency_s"], "tokens": len(r["tokens"]),
            "prompt_tokens": r["prompt_tokens"], "text": r["text"], "devices": devices, "wall_s": wall,
            "engine_command": " ".join(cmd[2:]).replace("tpi_cli", "tpi", 1)}


# ---------------------------------------------------------------------------------------
# docker runner

def _http(url: str, body: dict | None = None, timeout: float = 10.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def stream_completion(base: str, prompt: str, tokens: int, timeout: float, sample_steps: bool = False) -> dict:
    """Streamed greedy completion: TTFT = first text chunk; ms/token from the chunks after it.

    With `sample_steps`, a thread polls /api/cluster (each device's timers of its last forward
    step) while the tokens stream; the distinct samples taken after the second chunk are
    decode steps, and their per-device means are returned as `step_samples`."""
    import threading

    with _http(f"{base}/v1/models", timeout=30) as r:
        model = json.load(r)["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    samples, done = [], threading.Event()

    def poll():
        while not done.wait(0.25):
            try:
                with _http(f"{base}/api/cluster", timeout=10) as resp:
                    devs = json.load(resp).get("devices", [])
                samples.append((time.perf_counter() - t0, [d.get("last_forward") for d in devs]))
            except Exception:  # noqa: BLE001 - a missed sample is only a missed sample
                pass

    t0 = time.perf_counter()
    poller = threading.Thread(target=poll, daemon=True) if sample_steps else None
    if poller:
        poller.start()
    times, text, usage = [], [], None
    try:
        with _http(f"{base}/v1/completions", body, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[5:])
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj.get("choices") or []:
                    if ch.get("text"):
                        times.append(time.perf_counter() - t0)
                        text.append(ch["text"])
    finally:
        done.set()
        if poller:
            poller.join(timeout=15)
    n = (usage or {}).get("completion_tokens") or len(times)
    ttft = times[0] if times else float("nan")
    per = (times[-1] - times[0]) / (n - 1) if n > 1 and len(times) > 1 else float("nan")
    out = {"ttft_s": ttft, "token_latency_s": per, "tokens": n,
           "prompt_tokens": (usage or {}).get("prompt_tokens"), "text": "".join(text), "chunks": len(times)}
    if sample_steps:
        out["step_samples"] = decode_step_means(samples, times[1] if len(times) > 1 else float("inf"))
    return out


def decode_step_means(samples: list[tuple[float, list]], after: float) -> dict:
    """Per device, the mean of the distinct last-step timers seen after `after` seconds."""
    distinct = []
    for t, steps in samples:
        if t > after and all(steps) and (not distinct or steps != distinct[-1]):
            distinct.append(steps)
    if not distinct:
        return {"steps": 0, "devices": []}
    keys = ("compute_s", "comm_s", "disk_wait_s")
    devices = [{k: sum(s[i][k] or 0.0 for s in distinct) / len(distinct) for k in keys}
               for i in range(len(distinct[0]))]
    return {"steps": len(distinct), "devices": devices}


def _container_memory(container) -> dict:
    code, out = container.exec_run(["sh", "-c", "cat /sys/fs/cgroup/memory/memory.max_usage_in_bytes; "
                                    "grep -h VmHWM /proc/[0-9]*/status 2>/dev/null"])
    lines = out.decode().split("\n")
    hwm = [int(x.split()[1]) * 1024 for x in lines[1:] if x.startswith("VmHWM")]
    return {"cgroup_max_usage_bytes": int(lines[0]) if lines[0].strip().isdigit() else None,
            "peak_rss_bytes": max(hwm) if hwm else None}


VOLUME = "tpi-bench-data"  # shared by every device of a run: the models, the shard stores, TPI_CACHE


def prepare_volume(client, model_dir: str, image: str, cfg: RunConfig) -> str:
    """Copy the model into the named volume once (the host's copy may be readable by root
    only), owned by the image's user, and split the stores the master will ask for (its
    1-device probe and the N-device plan) in a separate container without a limit, so a
    run's memory peaks do not include the splitter. Returns the model's path in the volume."""
    import hashlib

    slug = model_slug(model_dir) + "-" + hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:8]
    dst = f"/data/models/{slug}"
    split = (f"from tpi.engine import prepare_store; [prepare_store({dst!r}, [1.0] * n, {cfg.dtype!r}, "
             f"root='/data/store') for n in sorted({{1, {cfg.devices}}})]")
    client.containers.run(
        image, entrypoint=["sh", "-c"], user="0", remove=True,
        command=[f"test -f {dst}/config.json || {{ mkdir -p {dst}.tmp && cp -r /src/. {dst}.tmp/ "
                 f"&& mv {dst}.tmp {dst}; }}; chown -R 10001:10001 /data"],
        volumes={VOLUME: {"bind": "/data", "mode": "rw"}, model_dir: {"bind": "/src", "mode": "ro"}})
    client.containers.run(
        image, entrypoint=["python", "-c"], command=[split], remove=True, environment={"TPI_CACHE": "/data/cache"},
        volumes={VOLUME: {"bind": "/data", "mode": "rw"}})
    return dst


def _oom_note(containers) -> str:
    """Which containers the kernel killed for memory, as the reason a run failed."""
    killed = []
    for rank, c in enumerate(containers):
        try:
            c.reload()
            if c.attrs["State"].get("OOMKilled"):
                killed.append(f"device {rank}")
        except Exception:  # noqa: BLE001 - already gone
            pass
    return f" [OOM-killed: {', '.join(killed)}]" if killed else ""


def run_docker(cfg: RunConfig, timeout: float, image: str = "tpi:latest") -> dict:
    import docker

    from tpi.weights.sources import resolve_model

    client = docker.from_env()
    tag = secrets.token_hex(3)
    token = secrets.token_hex(16)
    model_dir = str(resolve_model(cfg.model))
    model_in_volume = prepare_volume(client, model_dir, image, cfg)
    dropped = drop_page_cache()
    net = client.networks.create(f"tpibench-{tag}", driver="bridge")
    common = dict(image=image, detach=True, network=net.name, init=True,
                  environment={"TPI_CACHE": "/data/cache"},
                  volumes={VOLUME: {"bind": "/data", "mode": "rw"}}, labels={"tpi.bench": tag})
    limits, master_limits = {}, {}
    if cfg.mem_limit:
        limits.update(mem_limit=cfg.mem_limit, memswap_limit=cfg.mem_limit)
    if cfg.master_mem_limit or cfg.mem_limit:
        m = cfg.master_mem_limit or cfg.mem_limit
        master_limits.update(mem_limit=m, memswap_limit=m)
    if cfg.cpus:
        limits["nano_cpus"] = master_limits["nano_cpus"] = int(cfg.cpus * 1e9)
    link = ["--link", cfg.link] if cfg.link else []
    containers = []
    try:
        t_start = time.perf_counter()
        master = client.containers.run(
            command=["master", "--model", model_in_volume, "--listen", "0.0.0.0:29500", "--http", "0.0.0.0:8000",
                     "--devices", str(cfg.devices), "--join-token", token, "--store", "/data/store", "--slots", "1",
                     *cfg.engine_flags(), *link],
            name=f"tpibench-{tag}-master", **common, **master_limits)
        containers.append(master)
        for rank in range(1, cfg.devices):
            containers.append(client.containers.run(
                command=["worker", "--master", f"ws://tpibench-{tag}-master:29500", "--join-token", token,
                         "--rank", str(rank), "--name", f"dev-{rank}", *link],
                name=f"tpibench-{tag}-w{rank}", **common, **limits))
        master.reload()
        ip = master.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
        base = f"http://{ip}:8000"
        deadline = time.time() + timeout
        while True:
            try:
                with _http(f"{base}/healthz", timeout=5) as r:
                    if json.load(r).get("devices") == cfg.devices:
                        break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            master.reload()
            if master.status == "exited" or time.time() > deadline:
                raise RuntimeError(f"master not ready: {master.logs(tail=30).decode()}")
            time.sleep(2)
        startup = time.perf_counter() - t_start
        stream_completion(base, cfg.prompt, 2, timeout)  # warm-up
        r = stream_completion(base, cfg.prompt, cfg.tokens, timeout, sample_steps=True)
        with _http(f"{base}/api/cluster", timeout=30) as resp:
            status = json.load(resp)
        devices = []
        for rank, c in enumerate(containers):
            d = {"rank": rank, **_container_memory(c)}
            st = next((x for x in status.get("devices", []) if x.get("rank") == rank), {})
            d["last_forward"] = st.get("last_forward")
            sampled = r["step_samples"]["devices"]
            if rank < len(sampled):  # the mean of the decode steps sampled while streaming
                d["per_token"] = sampled[rank]
            d["memory_status"] = st.get("memory")
            devices.append(d)
        r.update(devices=devices, startup_s=startup, cluster_transport=status.get("transport"), caches_dropped=dropped)
        return r
    except Exception as e:
        raise RuntimeError(f"{e}{_oom_note(containers)}") from e
    finally:
        for c in containers:
            try:
                c.remove(force=True)
            except Exception:  # noqa: BLE001
                pass
        try:
            net.remove()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------------------
# the sweep

def check_prompt(model_dir: Path, prompt: str, vocab_size: int) -> None:
    """A random-weight model may carry a borrowed tokenizer (bench/memory.py's carries
    SmolLM2's): the prompt is usable only if its ids fit the model's vocabulary."""
    from tpi.tokenizer import ChatTokenizer

    ids = ChatTokenizer(model_dir).encode(prompt)
    if max(ids) >= vocab_size:
        raise SystemExit(f"tpi bench: the prompt's token ids reach {max(ids)}, beyond the vocabulary of "
                         f"{vocab_size} of {model_dir}: choose a prompt whose tokens fit (--prompt)")


def progress(i: int, total: int, started: float) -> str:
    """`[####------] 4/10, 3m12s left` from the mean time per run so far."""
    done = i - 1
    bar = "#" * round(10 * done / total) + "-" * (10 - round(10 * done / total))
    if not done:
        return f"[{bar}] {i}/{total}"
    left = (time.perf_counter() - started) / done * (total - done)
    return f"[{bar}] {i}/{total}, ~{int(left // 60)}m{int(left % 60):02d}s left"


def run_sweep(sweep) -> int:
    """Run every configuration of `sweep` (tpi.bench.sweep.Sweep); one results JSON each."""
    from tpi.bench.bounds import bounds, machine_capability
    from tpi.bench.sweep import configs
    from tpi.config import load_model_config
    from tpi.weights.sources import resolve_model

    configs = configs(sweep) * sweep.repeats  # repeats interleaved: round 1 of every config, then round 2
    out_dir = Path(sweep.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_model = load_model_config(resolve_model(sweep.model))
    check_prompt(resolve_model(sweep.model), sweep.prompt, cfg_model.vocab_size)
    print(f"[bench] measuring the machine (load {os.getloadavg()[0]:.1f}) ...", flush=True)
    cap = machine_capability(readers=max(c.devices for c in configs))
    print(f"[bench] {cap['capability']['gflops']:.1f} GFLOP/s, {cap['capability']['disk_mbps']:.0f} MB/s disk "
          f"({cap['disk_parallel_mbps']:.0f} MB/s with {cap['disk_readers']} readers), "
          f"{cap['mem_bandwidth_gbs']:.1f} GB/s memory; {len(configs)} run(s)", flush=True)
    failures = 0
    started = time.perf_counter()
    for i, cfg in enumerate(configs, 1):
        print(f"[bench {progress(i, len(configs), started)}] {cfg.name()} ...", flush=True)
        before = machine.snapshot()
        t = time.perf_counter()
        record = {"kind": "testbed", "config": {**asdict(cfg), "link": cfg.link}, "command": machine.command_line(),
                  "model": model_slug(sweep.model), "machine": before, "machine_capability": cap}
        try:
            r = run_docker(cfg, sweep.timeout) if cfg.runner == "docker" else run_local(cfg, sweep.timeout)
            record["result"] = r
            record["bounds"] = bounds(cfg_model, {**asdict(cfg), "bandwidth_bytes_s": cfg.bandwidth_bytes_s}, cap)
            msg = (f"TTFT {r['ttft_s']:.2f} s, {r['token_latency_s'] * 1e3:.0f} ms/token "
                   f"(bound {record['bounds']['bound_ms']:.0f})")
        except Exception as e:  # noqa: BLE001 - record the failure and go on with the sweep
            failures += 1
            record["error"] = f"{type(e).__name__}: {e}"
            msg = f"FAILED: {record['error'][:200]}"
        record["machine_after"] = machine.snapshot()
        path = out_dir / f"{cfg.name()}-{time.strftime('%Y%m%dT%H%M%S')}.json"
        path.write_text(json.dumps(record, indent=1))
        print(f"[bench {i}/{len(configs)}] {cfg.name()}: {msg}  [{time.perf_counter() - t:.0f} s, "
              f"load {before['loadavg'][0]:.1f}] -> {path}", flush=True)
    return 1 if failures == len(configs) else 0
