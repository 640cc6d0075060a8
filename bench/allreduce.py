"""All-reduce latency vs payload size, device count and emulated link, for star, ring, gloo.

Every device is a real process on this machine (loopback): rank 0 is this process (the hub),
the others start from a forkserver with torch preloaded; each uses one torch thread. All
devices run the same loop of all-reduces of seeded tensors (tpi.comm.drill); the figure is
rank 0's median (and 90th percentile) time per all_reduce. With an emulated link (tpi's
transport-level emulation: every message a process sends is delayed), the physical floor is
hops x latency: star 2 hops, ring 2(N-1); gloo has no emulation (its own TCP transport).

    python bench/allreduce.py                                  # the full table
    python bench/allreduce.py --modes star --devices 4 --links none --sizes 576
Not a test: prints a Markdown table (and the command and machine) to paste into docs/.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import torch

from tpi.comm.drill import run_master, worker_main
from tpi.comm.hub import StarHub
from tpi.comm.link import LinkSpec, wire_bytes
from tpi.protocol import Shutdown

TOKEN = "bench-token"
SIZES = {                     # elements (float32) -> what it is
    576: "SmolLM2 hidden, 1 token",
    4096: "Llama-2-7B hidden, 1 token",
    8192: "Llama-2-70B hidden, 1 token",
    73728: "SmolLM2, 128-token prefill",
    1179648: "SmolLM2, 2048-token prefill",
}


def hops(mode: str, n: int) -> int:
    return 2 if mode == "star" else 2 * (n - 1)


def floor_s(mode: str, n: int, numel: int, spec: LinkSpec, itemsize: int = 4) -> float:
    """Physical lower bound under an emulated link: serialization on each sender's uplink
    plus latency per hop. Star: the workers' partials leave in parallel, then the hub sends
    N-1 sums one after another on its uplink. Ring: 2(N-1) hops of one chunk each."""
    def ser(nbytes: int) -> float:
        return wire_bytes(nbytes) * 8 / spec.bandwidth if spec.bandwidth else 0.0

    if mode == "star":
        return n * ser(numel * itemsize + 40) + 2 * spec.latency
    return 2 * (n - 1) * (ser(numel * itemsize // n + 40) + spec.latency)


def reps_for(numel: int, link: LinkSpec | None, mode: str, n: int, budget: float) -> int:
    """Enough repetitions for a stable median within about `budget` seconds."""
    guess = 5e-4 * hops(mode, n) + numel * 4 * 2 * hops(mode, n) / 2e9
    if link is not None:
        guess += link.latency * hops(mode, n)
    return int(max(5, min(300, budget / guess)))


def run_config(ctx, mode: str, n: int, link: str | None, sizes: list[int], wire: str,
               budget: float) -> list[tuple[int, float, float, float, float]]:
    """Per size: (numel, median s, p90 s, rank 0 CPU s, mean worker CPU s) per all_reduce."""
    spec = LinkSpec.parse(link)
    hub = StarHub(n, TOKEN, allreduce=mode, wire_dtype=wire, link=spec, timeout=30.0,
                  max_bytes=256 << 20)
    procs = [ctx.Process(target=worker_main, args=(hub.url, TOKEN), daemon=True,
                         kwargs={"want_rank": r, "link": link, "timeout": 30.0,
                                 "max_bytes": 256 << 20})
             for r in range(1, n)]
    try:
        for p in procs:
            p.start()
        hub.wait_for_workers(timeout=120)
        comm = hub.communicator(timeout=120)
        run_master(hub, comm, reps=10, shape=[576], reply_timeout=60)     # warm-up
        rows = []
        for i, numel in enumerate(sizes):
            reps = reps_for(numel, spec, mode, n, budget)
            r = run_master(hub, comm, reps=reps, shape=[numel], seq=i + 1, reply_timeout=120)
            err = r.max_error() / max(1e-12, float(r.expected.abs().max()))
            if wire == "float32" and err > 1e-5:
                raise SystemExit(f"{mode} N={n}: wrong sum (relative error {err:.2e})")
            ts = sorted(r.master_times)
            rows.append((numel, statistics.median(ts), ts[int(0.9 * (len(ts) - 1))],
                         r.master_cpu, r.worker_cpu))
        hub.broadcast(Shutdown(reason="bench done"))
        return rows
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        hub.close()


def _echo_server(port_q) -> None:
    import asyncio

    from websockets.asyncio.server import serve

    async def echo(ws):
        async for m in ws:
            await ws.send(m)

    async def main():
        async with serve(echo, "127.0.0.1", 0, compression=None) as server:
            port_q.put(server.sockets[0].getsockname()[1])
            await asyncio.sleep(3600)

    asyncio.run(main())


def calibrate(ctx, n: int = 2000) -> float:
    """Median round trip of a 2.3 KB message between two processes with plain websockets
    (asyncio, no threads, no tpi): what this machine's loopback and Python do right now."""
    import asyncio

    from websockets.asyncio.client import connect

    q = ctx.Queue()
    p = ctx.Process(target=_echo_server, args=(q,), daemon=True)
    p.start()
    port = q.get(timeout=60)

    async def run() -> float:
        async with connect(f"ws://127.0.0.1:{port}", compression=None, proxy=None) as ws:
            data, ts = b"x" * 2340, []
            for i in range(n + 100):
                t0 = time.perf_counter()
                await ws.send(data)
                await ws.recv()
                if i >= 100:
                    ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

    try:
        return asyncio.run(run())
    finally:
        p.kill()


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if s < 0.1 else f"{s * 1e3:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="star,ring,gloo")
    ap.add_argument("--devices", default="2,3,4,5")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)),
                    help="float32 elements per all-reduce")
    ap.add_argument("--links", default="none",
                    help="';'-separated link specs, e.g. 'none;latency=1ms;latency=5ms'")
    ap.add_argument("--link-sizes", default="576,8192",
                    help="sizes measured under an emulated link (default: decode sizes)")
    ap.add_argument("--wire", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--budget", type=float, default=1.5, help="seconds per measured point")
    args = ap.parse_args()

    torch.set_num_threads(1)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tpi.comm.client", "tpi.comm.drill"])
    modes = args.modes.split(",")
    itemsize = 4 if args.wire == "float32" else 2
    devices = [int(x) for x in args.devices.split(",")]
    links = [None if x.strip().lower() in ("", "none") else x.strip()
             for x in args.links.split(";")]

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at start")
    print(f"wire dtype: {args.wire}; figures: rank 0 median (p90) ms per all_reduce; "
          f"≥ the physical floor of the emulated link")
    print(f"calibration: plain websockets echo round trip between two processes, 2.3 KB: "
          f"{calibrate(ctx) * 1e3:.3f} ms median\n")
    for link in links:
        sizes = [int(x) for x in (args.sizes if link is None else args.link_sizes).split(",")]
        spec = LinkSpec.parse(link)
        print(f"### {'loopback, no emulation' if link is None else 'emulated link ' + link}\n")
        head = "| mode | N | " + " | ".join(f"{s} floats" for s in sizes) + " |"
        if spec is None:
            head += f" CPU µs per call, {sizes[0]} floats: rank 0 / worker |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for mode in modes:
            if mode == "gloo" and link is not None:
                continue  # gloo runs on its own transport: no emulation
            for n in devices:
                t0 = time.monotonic()
                rows = run_config(ctx, mode, n, link, sizes, args.wire, args.budget)
                cells = [f"{fmt_ms(m)} ({fmt_ms(p)})"
                         + (f" ≥{fmt_ms(floor_s(mode, n, s, spec, itemsize))}" if spec else "")
                         for s, m, p, _, _ in rows]
                line = f"| {mode} | {n} | " + " | ".join(cells) + " |"
                if spec is None:
                    line += f" {rows[0][3] * 1e6:.0f} / {rows[0][4] * 1e6:.0f} |"
                print(line, flush=True)
                print(f"<!-- {mode} N={n} took {time.monotonic() - t0:.0f}s -->",
                      file=sys.stderr)
        print()
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
