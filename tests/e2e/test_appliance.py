"""The appliance end to end: compose.yaml on this machine's Docker engine, as a user runs it.

    docker compose -p <unique> up -d --scale worker=4     (fresh secrets, free host ports)

then, through the web UI's backend (POST /api/chat relays to the master):
  * "What is the capital of France?" -> "Paris";
  * the API key, join token and Redis password from the environment are in force;
  * the emulated edge link is in force between the workers and the master: the sidecar shaped
    every device, a bulk TCP transfer worker -> master runs at the link's rate, and a decode
    step takes at least the all-reduces' share of the link latency (or the master's reported
    link RTT, when it reports one);
  * a worker killed in the middle of a streamed reply does not break the reply;
  * a fifth worker started with --scale joins the plan without waiting for a request;
  * every container runs under its memory and CPU limit, without capabilities, with
    no-new-privileges and a pids cap (read-only root where compose.yaml says); the peak memory
    of each is recorded;
then `down -v`. Figures go to artifacts/e2e-appliance.json, every container's log to
artifacts/e2e-logs/<project>.log.

Skipped only when `docker info` fails. Builds tpi:latest first (scripts/build-image.sh, seconds
when cached; TPI_E2E_BUILD=0 skips it). TPI_E2E_COMPOSE_FILES (colon-separated) adds compose
files after compose.yaml, e.g. to try a local override. 2-8 minutes on 2 cores (docs/appliance.md).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import datetime, timezone

import pytest
import requests

from appliance import LAYERS, LINK, QUESTION, REPO, UP_TIMEOUT_S, WORKERS, Appliance, docker_info_error

_DOCKER_ERROR = docker_info_error()
pytestmark = [
    pytest.mark.skipif(_DOCKER_ERROR is not None, reason=f"no Docker engine (`docker info`: {_DOCKER_ERROR})"),
    pytest.mark.timeout(1800),
]


@pytest.fixture(scope="module")
def app():
    a = Appliance()
    t0 = time.monotonic()
    if os.environ.get("TPI_E2E_BUILD", "1") != "0":
        r = subprocess.run(["bash", "scripts/build-image.sh"], cwd=REPO, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, f"scripts/build-image.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    a.figures["timings_s"]["build"] = round(time.monotonic() - t0, 1)
    try:
        t0 = time.monotonic()
        a.compose("up", "-d", "--scale", f"worker={WORKERS}", timeout=UP_TIMEOUT_S)
        a.figures["timings_s"]["compose_up"] = round(time.monotonic() - t0, 1)
        a.wait_ready(WORKERS)
        a.figures["timings_s"]["until_ready"] = round(time.monotonic() - t0, 1)
        yield a
    finally:
        try:
            a.dump_logs()
            a.write_figures()
        finally:
            a.down()


def test_chat_through_the_web_ui_says_paris(app):
    reply = app.chat(QUESTION, max_tokens=16)
    app.figures["chat"] = reply
    app.figures["master_process"] = {"after_first_request": app.cluster().get("process")}
    assert not reply["errors"], reply
    assert reply["done"], reply
    assert "Paris" in reply["text"], reply


def test_secrets_from_the_environment_are_in_force(app):
    # The API key: the master refuses without it, accepts with it (the web UI holds it).
    assert requests.get(app.api + "/v1/models", timeout=10).status_code == 401
    ok = requests.get(app.api + "/v1/models", timeout=10,
                      headers={"Authorization": f"Bearer {app.secrets['TPI_API_KEY']}"})
    assert ok.status_code == 200, ok.text
    # The Redis password: refused without it, PONG with it.
    redis = app.one("redis")
    rc, out = redis.exec_run(["redis-cli", "ping"])
    assert b"NOAUTH" in out, out
    assert "PONG" in app.exec(redis, ["sh", "-c", 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli ping'])
    # Neither default secret reached a container.
    for c in app.containers():
        env = "\n".join(c.attrs["Config"].get("Env") or []) + " ".join(c.attrs.get("Args") or [])
        assert "change-me" not in env, f"{c.name} got a default secret"


def test_the_edge_link_is_in_force(app):
    # 1. The sidecar shaped the master and every worker (and says what it did).
    status = json.loads(app.exec(app.one("netem"), ["cat", "/tmp/netem-status.json"]))
    shaped = {v["name"]: v for v in status["containers"].values()}
    devices = app.containers("master") + app.containers("worker")
    link_report = {"netem_in_kernel": status["netem"], "per_container": {}}
    for c in devices:
        entry = shaped.get(c.name)
        assert entry and entry["ok"], f"{c.name} not shaped: {status}"
        assert entry["kernel"].get("rate_bps") == LINK["rate_bps"], entry
        delay_by = "kernel" if entry["kernel"].get("latency_s") else "transport"
        assert (entry["kernel"] if delay_by == "kernel" else entry["transport"]).get("latency_s") == LINK["latency_s"]
        if not status["netem"]:
            assert delay_by == "transport", entry
        link_report["per_container"][c.name] = {"delay_by": delay_by, "tc": entry["tc"]}

    # 2. Rate: a bulk TCP transfer worker -> master runs at about the shaped rate.
    master, worker = app.one("master"), app.containers("worker")[0]
    size = 24 * 2**20
    sink = ("import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            "s.bind(('0.0.0.0', 29599)); s.listen(1); c, _ = s.accept()\n"
            "while c.recv(1 << 20): pass")
    master.exec_run(["python", "-c", sink], detach=True)
    time.sleep(1.5)
    send = ("import socket, time; s = socket.create_connection(('master', 29599)); b = bytes(1 << 20); "
            f"t = time.monotonic()\nfor _ in range({size >> 20}): s.sendall(b)\n"
            "s.shutdown(socket.SHUT_WR); s.recv(1); print(time.monotonic() - t)")
    seconds = float(app.exec(worker, ["python", "-c", send]).strip())
    mbit = size * 8 / seconds / 1e6
    link_report["bulk_worker_to_master_mbit_s"] = round(mbit, 1)
    assert mbit < LINK["rate_bps"] / 1e6 * 1.15, f"{mbit:.0f} Mbit/s: the rate limit is not in force"
    assert mbit > LINK["rate_bps"] / 1e6 * 0.5, f"{mbit:.0f} Mbit/s: far below the configured rate"

    # 3. Latency, directly: an all-reduce of one token's hidden state (1 x 576) between a
    #    process in the master's network namespace and one in a worker's, each emulating the
    #    link its service runs with (its own --link argument), over the shaped network; and
    #    the same without emulation, as the baseline. Star all-reduce = one worker -> master
    #    and one master -> worker message: 2 x latency.
    probes = {}
    for label, with_link in (("edge_link", True), ("no_emulation", False)):
        probes[label] = allreduce_probe(app, master, worker, with_link)
    link_report["allreduce_probe_ms"] = probes
    floor_ms = 2 * (LINK["latency_s"] - LINK["jitter_s"]) * 1e3
    assert probes["edge_link"]["median_ms"] >= floor_ms, probes
    assert probes["edge_link"]["median_ms"] < 2 * (LINK["latency_s"] + LINK["jitter_s"]) * 1e3 + 20, probes

    # 4. The master's measured link RTT when it reports one; and a decode step cannot be
    #    faster than its all-reduces' share of the link: 2 per layer, each a worker -> master
    #    and a master -> worker message of at least latency - jitter.
    cluster = app.cluster()
    rtts = [d["link"]["rtt_ms"] for d in app.worker_devices(cluster) if (d.get("link") or {}).get("rtt_ms")]
    link_report["reported_rtt_ms"] = rtts
    if rtts:
        assert min(rtts) >= 2 * (LINK["latency_s"] - LINK["jitter_s"]) * 1e3 * 0.9, rtts
    steps = [s["wall_s"] for s in cluster["scheduler"]["last_request"]["per_token"] if not s.get("prefill")]
    floor_s = LAYERS * 2 * 2 * (LINK["latency_s"] - LINK["jitter_s"])
    link_report["decode_step_s"] = {"min": min(steps), "mean": sum(steps) / len(steps), "link_floor": floor_s}
    app.figures["link"] = link_report
    assert min(steps) >= floor_s, f"decode steps {steps} faster than the link allows ({floor_s:.3f} s)"


PROBE_HUB = """
import json, sys
from tpi.comm.drill import run_master
from tpi.comm.hub import StarHub
from tpi.protocol import Shutdown
hub = StarHub(2, "probe-token", "0.0.0.0", 29598, link=sys.argv[1] or None, timeout=60)
hub.wait_for_workers(1, timeout=120)
r = run_master(hub, hub.communicator(timeout=60), reps=40, shape=[1, 576], reply_timeout=60)
hub.broadcast(Shutdown(reason="probe over"))
hub.close()
print(json.dumps({"median_ms": r.median * 1e3, "min_ms": min(r.master_times) * 1e3}))
"""
PROBE_WORKER = """
import sys, time
from tpi.comm.base import CommError
from tpi.comm.drill import worker_main
deadline = time.monotonic() + 120
while True:  # the hub side may still be importing torch
    try:
        worker_main("ws://" + sys.argv[2] + ":29598", "probe-token", link=sys.argv[1] or None)
        break
    except (CommError, OSError):
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
"""


def link_arg(container) -> str:
    """The --link value a tpi service container runs with."""
    for a in container.attrs.get("Args") or []:
        if a.startswith("--link="):
            return a.split("=", 1)[1]
    return ""


def allreduce_probe(app, master, worker, with_link: bool) -> dict:
    """Time star all-reduces between helper containers in the master's and a worker's network
    namespaces (outside their memory cgroups, so the recorded peaks stay the services')."""
    image = master.attrs["Config"]["Image"]
    run = dict(entrypoint=["python", "-c"], detach=True, labels={"tpi.e2e.probe": app.project})
    hub = app.client.containers.run(image, command=[PROBE_HUB, link_arg(master) if with_link else ""],
                                    network_mode=f"container:{master.id}", **run)
    client = app.client.containers.run(image, command=[PROBE_WORKER, link_arg(worker) if with_link else "",
                                                       master_ip(master)],
                                       network_mode=f"container:{worker.id}", **run)
    try:
        rc = hub.wait(timeout=240)["StatusCode"]
        out = hub.logs(stdout=True, stderr=False).decode().strip().splitlines()
        assert rc == 0 and out, hub.logs().decode()[-3000:] + client.logs().decode()[-2000:]
        return json.loads(out[-1])
    finally:
        for c in (hub, client):
            c.remove(force=True)


def master_ip(master) -> str:
    master.reload()
    nets = master.attrs["NetworkSettings"]["Networks"]
    return next(iter(nets.values()))["IPAddress"]


def test_a_worker_killed_mid_reply_does_not_break_the_reply(app):
    victim = app.containers("worker")[-1]
    killed: dict = {}

    def kill_after_two_chunks(reply):
        if reply["chunks"] == 2 and not killed:
            killed["name"], killed["at_chunk"], killed["t"] = victim.name, 2, time.monotonic()
            victim.kill()

    reply = app.chat("Write two sentences about Paris.", max_tokens=24, on_content=kill_after_two_chunks)
    victim.reload()
    # `docker kill` counts as a manual stop: the restart policy leaves the device down, the
    # harder case (a crashed process would be restarted and rejoin at the next re-plan).
    killed["status_after"] = victim.status
    app.figures["kill_worker_mid_reply"] = {"killed": killed, "reply": reply}
    assert killed, f"the reply ended before a worker could be killed: {reply}"
    assert not reply["errors"], f"the reply broke when {victim.name} was killed: {reply['errors']}"
    assert reply["done"] and reply["finish_reason"] in ("stop", "length"), reply
    assert reply["chunks"] > 2, reply


def test_a_fifth_worker_joins_the_plan_without_a_request(app):
    # The killed worker stays down (see above); `up --scale` starts it again and adds a fifth.
    before = {c.name for c in app.containers("worker")}
    since = datetime.now(timezone.utc)
    app.compose("up", "-d", "--no-deps", "--no-recreate", "--scale", f"worker={WORKERS + 1}", "worker")
    new = [c for c in app.containers("worker") if c.name not in before]
    running = app.containers("worker")
    # A newcomer registers; the idle master re-plans at once (no request needed).
    app.wait_until("the new workers registered", lambda: all(
        b"registered as" in c.logs(since=since) for c in new), 300)
    app.wait_until("every running worker in the plan",
                   lambda: len(app.worker_devices(app.cluster())) == len(running), 300)
    reply = app.chat(QUESTION, max_tokens=8)
    cluster = app.cluster()
    workers = app.worker_devices(cluster)
    in_plan = cluster.get("devices_in_plan", [])
    app.figures["scale_to_5"] = {"new": [c.name for c in new], "running_workers": len(running),
                                 "plan_workers": len(workers), "world_size": cluster.get("world_size"),
                                 "devices_in_plan": in_plan, "reply": reply}
    assert not reply["errors"] and "Paris" in reply["text"], reply
    assert len(running) == WORKERS + 1, app.status_text()
    assert len(workers) == len(running), f"{len(running)} workers running, {len(workers)} in the plan: {in_plan}"
    if in_plan:  # worker names are "<hostname>-<random>"; the hostname is the container's short id
        missing = [c.name for c in running if not any(n.startswith(c.attrs["Config"]["Hostname"] + "-")
                                                      for n in in_plan)]
        assert not missing, f"running but not in the plan: {missing} (plan: {in_plan})"
    # The netem sidecar shaped the newcomer too.
    status = json.loads(app.exec(app.one("netem"), ["cat", "/tmp/netem-status.json"]))
    names = {v["name"] for v in status["containers"].values() if v["ok"]}
    assert {c.name for c in running} <= names, status


def cgroup(container, name: str) -> int:
    rc, out = container.exec_run(["cat", f"/sys/fs/cgroup/{name}"])
    return int(out) if rc == 0 else -1


def test_every_container_runs_under_its_limits(app):
    config = json.loads(app.compose("config", "--format", "json").stdout)["services"]
    report = {}
    for c in app.containers(all=True):
        c.reload()
        service = c.labels["com.docker.compose.service"]
        limits = config[service]["deploy"]["resources"]["limits"]
        host = c.attrs["HostConfig"]
        entry = {"service": service, "status": c.status, "memory_limit": host["Memory"],
                 "memswap_limit": host["MemorySwap"], "nano_cpus": host["NanoCpus"],
                 "oom_killed": c.attrs["State"]["OOMKilled"]}
        assert host["Memory"] == int(limits["memory"]), (c.name, host["Memory"], limits)
        assert host["NanoCpus"] == round(float(limits["cpus"]) * 1e9), (c.name, host["NanoCpus"], limits)
        assert host["MemorySwap"] == host["Memory"], f"{c.name} may swap"
        # Privileges (compose.yaml's x-hardening): no capability, no setuid gain, a pids cap,
        # and a read-only root for the services that write only to /tmp.
        assert [x.upper() for x in host.get("CapDrop") or []] == ["ALL"] and not host.get("CapAdd"), \
            (c.name, host.get("CapDrop"), host.get("CapAdd"))
        assert "no-new-privileges:true" in (host.get("SecurityOpt") or []), (c.name, host.get("SecurityOpt"))
        assert host["PidsLimit"] == int(limits["pids"]), (c.name, host["PidsLimit"], limits)
        assert host["ReadonlyRootfs"] == (service in ("redis", "webui", "netem")), (c.name, host["ReadonlyRootfs"])
        entry["privileges"] = {"cap_drop": host.get("CapDrop"), "pids_limit": host["PidsLimit"],
                               "read_only_root": host["ReadonlyRootfs"]}
        if c.status == "running":
            entry.update(
                cgroup_limit=cgroup(c, "memory/memory.limit_in_bytes"),
                peak_bytes=cgroup(c, "memory/memory.max_usage_in_bytes"),
                usage_bytes=cgroup(c, "memory/memory.usage_in_bytes"),
                failcnt=cgroup(c, "memory/memory.failcnt"),
                cfs_quota_us=cgroup(c, "cpu/cpu.cfs_quota_us"), cfs_period_us=cgroup(c, "cpu/cpu.cfs_period_us"))
            stat = c.exec_run(["cat", "/sys/fs/cgroup/memory/memory.stat"])[1].decode()
            fields = dict(line.split() for line in stat.splitlines() if line.count(" ") == 1)
            entry.update(rss_bytes=int(fields.get("total_rss", -1)), cache_bytes=int(fields.get("total_cache", -1)))
            assert entry["cgroup_limit"] == host["Memory"], entry
            assert entry["cfs_quota_us"] == host["NanoCpus"] * entry["cfs_period_us"] // 10**9, entry
            assert 0 < entry["peak_bytes"] <= host["Memory"], entry
        if service == "model":
            log = c.logs().decode(errors="replace")
            m = re.search(r"peak RSS (\d+) MiB", log)
            entry["peak_rss_bytes"] = int(m.group(1)) * 2**20 if m else None
            assert c.attrs["State"]["ExitCode"] == 0, log[-2000:]
        assert not entry["oom_killed"], entry
        report[c.name] = entry
    app.figures["containers"] = report
    app.figures.setdefault("master_process", {})["at_the_end"] = app.cluster().get("process")
    worker = config["worker"]["deploy"]["resources"]["limits"]
    assert int(worker["memory"]) == 2**30 and float(worker["cpus"]) == 1.0, "the edge-device default changed"
