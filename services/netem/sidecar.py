"""The appliance's link-emulation sidecar: shapes the network of every tpi device container.

It finds the containers of its own Compose project (or Swarm stack) whose service is in
NETEM_SERVICES (default "master,worker"), including those started later (`--scale`, restarts:
it follows Docker's container start events and re-checks every NETEM_RESYNC_S), and applies
the link profile EDGE_LINK ("latency=5ms,bandwidth=300mbit,jitter=1ms,loss=0") to each one's
network interface. It runs `tc` in a short-lived helper container that joins the target's
network namespace (`network_mode: container:<id>`, cap NET_ADMIN, root, this same image), so
the devices themselves stay unprivileged and need no capability.

Who emulates what: the tpi transport can delay what a process sends (`tpi worker --link`,
per message, on every kernel). The sidecar reads each target's own command line:
  * delay and jitter: left to the transport when the target runs with a `--link` that has a
    latency, else applied with netem in the kernel (never both: that would double it);
  * rate: the kernel, always (tbf, or netem's rate when netem is there), so it covers all the
    device's traffic: shard downloads and registry heartbeats as well as the all-reduces;
  * loss: the kernel (netem only).
When the kernel has no netem (e.g. the CI machine: "Specified qdisc kind is unknown") it
applies tbf for the rate and logs, per container, what nobody emulates. It never does
nothing silently. Every decision is logged and written to NETEM_STATUS (JSON; the
healthcheck reads its mtime).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import docker
from docker.errors import APIError, DockerException, NotFound

from tpi.comm.link import LinkSpec

log = logging.getLogger("tpi.netem")

PROJECT_LABELS = ("com.docker.compose.project", "com.docker.stack.namespace")
SERVICE_LABELS = ("com.docker.compose.service", "com.docker.swarm.service.name")
HELPER_LABEL = "tpi.netem.helper"
IFACE_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")


def parse_link(text: str | None) -> LinkSpec:
    """EDGE_LINK or a `--link` value -> LinkSpec (the transport's own parser, so both accept
    the same specs); '' or 'none' -> no shaping."""
    return LinkSpec.parse(text) or LinkSpec()


def report(link: LinkSpec) -> dict:
    """The parts of `link` that are set, as the status file names them."""
    parts = {"latency_s": link.latency, "jitter_s": link.jitter, "rate_bps": link.bandwidth,
             "loss_pct": link.loss}
    return {k: v for k, v in parts.items() if v}


def transport_link(args: list[str]) -> LinkSpec:
    """The link a tpi process emulates itself: its `--link X` / `--link=X` argument."""
    for i, a in enumerate(args):
        if a == "--link" and i + 1 < len(args):
            return parse_link(args[i + 1])
        if a.startswith("--link="):
            return parse_link(a.split("=", 1)[1])
    return LinkSpec()


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:g}ms"


def bits(rate_bps: float) -> str:
    return f"{rate_bps / 1e3:g}kbit"


def tbf_burst_bytes(rate_bps: float) -> int:
    """tbf's bucket: at least one 4 ms timer tick of traffic (HZ=250) and a few full frames."""
    return max(int(rate_bps / 8 / 250), 16 * 1514)


@dataclass
class Decision:
    """What one container gets, and who emulates each part of the link."""
    qdisc: list[str]          # tc arguments after "qdisc replace dev IFACE root", or [] to clear
    kernel: dict
    transport: dict
    missing: list[str]        # parts of EDGE_LINK nobody emulates (logged as errors)


def decide(link: LinkSpec, own: LinkSpec, netem: bool) -> Decision:
    """Split `link` between the kernel and the target's own transport emulation `own`."""
    kernel: dict = {}
    missing: list[str] = []
    transport = report(own)
    want_delay = link.latency > 0 or link.jitter > 0
    kernel_delay = want_delay and own.latency == 0 and own.jitter == 0
    if netem:
        args = ["netem"]
        if kernel_delay:
            # netem's default jitter is uniform, like the transport's (no distribution table)
            args += ["delay", ms(link.latency)] + ([ms(link.jitter)] if link.jitter else [])
            kernel.update(latency_s=link.latency, jitter_s=link.jitter)
        if link.loss:
            args += ["loss", f"{link.loss:g}%"]
            kernel["loss_pct"] = link.loss
        if link.bandwidth:
            args += ["rate", bits(link.bandwidth)]
            kernel["rate_bps"] = link.bandwidth
        if kernel_delay and link.bandwidth:
            args += ["limit", "10000"]
        qdisc = args if len(args) > 1 else []
    else:
        qdisc = []
        if link.bandwidth:
            qdisc = ["tbf", "rate", bits(link.bandwidth), "burst", str(tbf_burst_bytes(link.bandwidth)),
                     "latency", "400ms"]
            kernel["rate_bps"] = link.bandwidth
        if kernel_delay:
            missing.append(f"delay {ms(link.latency)} (jitter {ms(link.jitter)}): the kernel has no netem "
                           "and the process does not emulate it (start it with --link)")
        if link.loss:
            missing.append(f"loss {link.loss:g}%: the kernel has no netem")
    if kernel:
        kernel["qdisc"] = qdisc[0]
    return Decision(qdisc=qdisc, kernel=kernel, transport=transport, missing=missing)


class Sidecar:
    def __init__(self, client: docker.DockerClient, link: LinkSpec, services: set[str], iface: str,
                 status_path: str):
        if not IFACE_RE.match(iface):
            raise ValueError(f"NETEM_IFACE {iface!r} is not an interface name")
        self.client, self.link, self.services, self.iface = client, link, services, iface
        self.status_path = status_path
        me = self._own_container()
        labels = me.labels if me is not None else {}
        self.project = os.environ.get("NETEM_PROJECT") or next(
            (labels[k] for k in PROJECT_LABELS if labels.get(k)), None)
        if not self.project:
            raise SystemExit("netem: cannot tell my Compose project (no com.docker.compose.project label on this "
                             "container): set NETEM_PROJECT")
        self.image = os.environ.get("NETEM_IMAGE") or (me.image.id if me is not None else None)
        if not self.image:
            raise SystemExit("netem: cannot tell my own image: set NETEM_IMAGE")
        self.netem: bool | None = None
        self.applied: dict[str, dict] = {}     # container id -> what was applied, for its StartedAt
        self.lock = threading.Lock()

    def _own_container(self):
        try:
            return self.client.containers.get(socket.gethostname())
        except (NotFound, APIError):
            return None

    # --- targets ------------------------------------------------------------------------
    def service_of(self, container) -> str | None:
        labels = container.labels or {}
        if not any(labels.get(k) == self.project for k in PROJECT_LABELS):
            return None
        for key in SERVICE_LABELS:
            name = labels.get(key, "")
            if key == "com.docker.swarm.service.name":   # "<stack>_<service>"
                name = name[len(self.project) + 1:] if name.startswith(self.project + "_") else ""
            if name in self.services:
                return name
        return None

    def targets(self) -> list:
        found = {}
        for key in PROJECT_LABELS:
            for c in self.client.containers.list(filters={"label": f"{key}={self.project}", "status": "running"}):
                if self.service_of(c):
                    found[c.id] = c
        return list(found.values())

    # --- tc through a helper container in the target's network namespace ----------------------
    def tc(self, network_mode: str, script: str) -> tuple[int, str]:
        helper = self.client.containers.create(
            self.image, entrypoint=["/bin/sh", "-c"], command=[script], user="0", cap_drop=["ALL"],
            cap_add=["NET_ADMIN"], security_opt=["no-new-privileges:true"], pids_limit=16, read_only=True,
            network_mode=network_mode, labels={HELPER_LABEL: self.project}, detach=True)
        try:
            helper.start()
            rc = helper.wait(timeout=60)["StatusCode"]
            out = helper.logs(stdout=True, stderr=True).decode(errors="replace").strip()
            return rc, out
        finally:
            helper.remove(force=True)

    def probe_netem(self) -> bool:
        """Whether this kernel has the netem qdisc (tried on a throwaway namespace's loopback)."""
        rc, out = self.tc("none", "tc qdisc add dev lo root netem delay 1ms")
        if rc == 0:
            log.info("the kernel has netem: delay, jitter and loss can be emulated in the kernel")
            return True
        log.warning("the kernel has no netem qdisc (%s): rate is shaped with tbf; delay and jitter must come "
                    "from the devices' own transport (--link), loss cannot be emulated", out or f"tc exit {rc}")
        return False

    def shape(self, container) -> None:
        container.reload()
        started = container.attrs["State"].get("StartedAt")
        service = self.service_of(container)
        if not service or container.status != "running":
            return
        with self.lock:
            if self.applied.get(container.id, {}).get("started_at") == started:
                return
            if self.netem is None:
                self.netem = self.probe_netem()
            own = transport_link(list(container.attrs.get("Args") or []))
            d = decide(self.link, own, self.netem)
            dev = self.iface
            if d.qdisc:
                cmd = f"tc qdisc replace dev {dev} root {shlex.join(d.qdisc)} && tc qdisc show dev {dev}"
            else:
                cmd = f"tc qdisc del dev {dev} root 2>/dev/null; tc qdisc show dev {dev}"
            rc, out = self.tc(f"container:{container.id}", cmd)
            entry = {"name": container.name, "service": service, "started_at": started, "ok": rc == 0,
                     "kernel": d.kernel, "transport": d.transport, "missing": d.missing,
                     "tc": "tc qdisc replace dev %s root %s" % (dev, shlex.join(d.qdisc)) if d.qdisc else "(none)",
                     "qdisc_show": out, "at": time.time()}
            self.applied[container.id] = entry
        if rc != 0:
            log.error("%s: tc failed (exit %d): %s", container.name, rc, out)
        else:
            log.info("%s: kernel %s; transport %s; now: %s", container.name,
                     describe(d.kernel) or "nothing", describe(d.transport) or "nothing", out.replace("\n", " | "))
        for gap in d.missing:
            log.error("%s: NOT EMULATED: %s", container.name, gap)
        self.write_status()

    def shape_all(self) -> None:
        live = set()
        for c in self.targets():
            live.add(c.id)
            try:
                self.shape(c)
            except (APIError, NotFound) as e:   # it stopped meanwhile
                log.warning("%s: %s", c.name, e)
        with self.lock:
            for cid in set(self.applied) - live:
                del self.applied[cid]
        self.write_status()

    def write_status(self) -> None:
        with self.lock:
            status = {"project": self.project, "services": sorted(self.services), "link": report(self.link),
                      "netem": self.netem, "iface": self.iface, "updated": time.time(),
                      "containers": dict(self.applied)}
        tmp = self.status_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(status, f, indent=1)
        os.replace(tmp, self.status_path)

    # --- loops ------------------------------------------------------------------------------
    def watch_events(self, stop: threading.Event) -> None:
        """Shape each target as it starts (also after a restart: a new namespace, no qdisc)."""
        while not stop.is_set():
            try:
                events = self.client.events(decode=True, filters={"type": "container", "event": "start"})
                for ev in events:
                    if stop.is_set():
                        break
                    attrs = ev.get("Actor", {}).get("Attributes", {})
                    if attrs.get(HELPER_LABEL):
                        continue
                    try:
                        c = self.client.containers.get(ev.get("id"))
                        if self.service_of(c):
                            self.shape(c)
                    except (NotFound, APIError) as e:
                        log.warning("container %s: %s", str(ev.get("id"))[:12], e)
            except DockerException as e:
                log.warning("lost the Docker event stream (%s); reconnecting", e)
                stop.wait(2.0)

    def run(self, resync_s: float) -> None:
        log.info("project %r, services %s, interface %s, link %s", self.project, sorted(self.services),
                 self.iface, describe(report(self.link)) or "none (clearing shaping)")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        threading.Thread(target=self.watch_events, args=(stop,), name="events", daemon=True).start()
        while not stop.is_set():
            try:
                self.shape_all()
            except DockerException as e:
                log.warning("resync failed: %s", e)
            stop.wait(resync_s)
        log.info("stopping; shaping stays in place on the running containers")


def describe(parts: dict) -> str:
    out = []
    for k, v in parts.items():
        if k in ("latency_s", "jitter_s") and v:
            out.append(f"{k[:-2]} {ms(v)}")
        elif k == "rate_bps" and v:
            out.append(f"rate {v / 1e6:g} Mbit/s")
        elif k == "loss_pct" and v:
            out.append(f"loss {v:g}%")
        elif k == "qdisc":
            out.append(f"({v})")
    return ", ".join(out)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    link = parse_link(os.environ.get("EDGE_LINK", ""))
    services = {s.strip() for s in os.environ.get("NETEM_SERVICES", "master,worker").split(",") if s.strip()}
    client = docker.from_env()
    sidecar = Sidecar(client, link, services, os.environ.get("NETEM_IFACE", "eth0"),
                      os.environ.get("NETEM_STATUS", "/tmp/netem-status.json"))
    sidecar.run(float(os.environ.get("NETEM_RESYNC_S", "30")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
