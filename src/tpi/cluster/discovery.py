"""Finding the master on the LAN: DNS-SD over multicast DNS (python-zeroconf).

The master advertises its all-reduce hub as one instance of the service type `_tpi._tcp`:

    SRV + A/AAAA   the hub's port and this host's addresses (or the --advertise host's)
    TXT            scheme=ws|wss, protocol=<tpi.protocol.VERSION>

so the hub's URL is `scheme://ADDRESS:PORT`. `tpi worker --join-token T` with neither
--master nor --registry browses for the service and tries the masters it finds.

An mDNS answer is NOT authenticated: anything on the LAN can advertise `_tpi._tcp`. A worker
trusts a found master only after the join handshake, in which the master proves it holds the
join token (Welcome.proof, comm/handshake.py); the worker sends only an HMAC of a nonce the
master chose, never the token. A master that cannot prove the token is refused and the
worker looks for another. (Plain ws:// is still readable on the LAN; use --tls-cert for wss://.)
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass

from tpi.protocol import VERSION

log = logging.getLogger("tpi.discovery")

SERVICE_TYPE = "_tpi._tcp.local."
SETTLE_S = 0.5      # after the first answer, wait this long for other masters to answer too


@dataclass(frozen=True)
class FoundMaster:
    name: str       # the DNS-SD instance name, e.g. "tpi master pi-4 29500._tpi._tcp.local."
    url: str        # the hub: ws://ADDRESS:PORT (wss:// when the master has a certificate)


class Advertisement:
    """The master's hub, announced until close(): on the interfaces of `host` when one is
    given (a hub on 127.0.0.1 is announced on loopback only, where only this machine hears
    it), else on every interface."""

    def __init__(self, port: int, *, tls: bool = False, host: str | None = None):
        from zeroconf import InterfaceChoice, ServiceInfo, Zeroconf

        hostname = socket.gethostname()
        addresses = host_addresses(host)
        if not addresses:
            raise ValueError(f"no address to advertise the hub on (host {host!r})")
        self.info = ServiceInfo(
            SERVICE_TYPE, f"tpi master {hostname} {port}.{SERVICE_TYPE}", port=port,
            addresses=[socket.inet_pton(_family(a), a) for a in addresses],
            properties={"scheme": "wss" if tls else "ws", "protocol": str(VERSION)},
            server=f"{hostname}.local.")
        self._zc = Zeroconf(interfaces=addresses if host else InterfaceChoice.All)
        try:
            self._zc.register_service(self.info, allow_name_change=True)
        except BaseException:
            self._zc.close()
            raise
        log.info("advertising the hub on the LAN as %r (%s, port %d; mDNS, turn off with --no-mdns)",
                 self.info.name, ", ".join(addresses), port)

    def close(self) -> None:
        try:
            self._zc.unregister_service(self.info)  # a goodbye packet: browsers forget us now
        finally:
            self._zc.close()


def host_addresses(host: str | None = None) -> list[str]:
    """The addresses to advertise: those `host` resolves to, else every address of this
    machine's interfaces but loopback and link-local ones."""
    if host:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
    return sorted(str(i.ip) for i in _interfaces() if not (i.ip.is_loopback or i.ip.is_link_local))


def _interfaces() -> list:
    """This machine's interface addresses with their prefixes (ipaddress.ip_interface, e.g.
    192.168.1.7/24: the address, and through .network the hosts on the same link)."""
    import ifaddr

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0].split("%")[0]  # IPv6: (addr, flow, scope)
            found.append(ipaddress.ip_interface(f"{address}/{ip.network_prefix}"))
    return found


def _nearest_first(addresses: list[str]) -> list[str]:
    """A master's addresses, those on a network this machine is on first, then IPv4 first: a
    master also on a Docker bridge or a VPN advertises those addresses too."""
    nets = [i.network for i in _interfaces()]

    def key(a: str):
        ip = ipaddress.ip_address(a)
        return (not any(ip in n for n in nets), ip.version, a)
    return sorted(addresses, key=key)


def find_masters(timeout: float = 3.0, interface: str | None = None) -> list[FoundMaster]:
    """Browse the LAN (or only the interface with address `interface`, e.g. 127.0.0.1) for up
    to `timeout` seconds; returns the masters that answered (each resolved to a URL),
    SETTLE_S after the first one, or [] when none did. Masters that speak another protocol
    version are left out (and logged)."""
    from zeroconf import InterfaceChoice, ServiceBrowser, ServiceStateChange, Zeroconf

    names: list[str] = []
    seen = threading.Event()

    def on_change(zeroconf, service_type, name, state_change):
        if state_change is ServiceStateChange.Added and name not in names:
            names.append(name)
            seen.set()

    zc = Zeroconf(interfaces=[interface] if interface else InterfaceChoice.All)
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        deadline = time.monotonic() + timeout
        if seen.wait(timeout):
            time.sleep(max(0.0, min(SETTLE_S, deadline - time.monotonic())))
        browser.cancel()
        found = []
        for name in list(names):
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=2000)
            master = _to_master(name, info) if info is not None else None
            if master is not None:
                found.append(master)
        return found
    finally:
        zc.close()


def _to_master(name: str, info) -> FoundMaster | None:
    """A resolved service -> FoundMaster; None if it has no address, or another protocol."""
    props = {k.decode(): (v or b"").decode() for k, v in (info.properties or {}).items()}
    addresses = _nearest_first(info.parsed_addresses())
    if not addresses or not info.port:
        return None
    scheme = props.get("scheme", "ws")
    if scheme not in ("ws", "wss"):
        log.warning("ignoring %r on the LAN: unknown scheme %r", name, scheme)
        return None
    if props.get("protocol") != str(VERSION):
        log.warning("ignoring %r on the LAN: protocol %r, this worker speaks %d", name,
                    props.get("protocol"), VERSION)
        return None
    host = f"[{addresses[0]}]" if ":" in addresses[0] else addresses[0]
    return FoundMaster(name=name, url=f"{scheme}://{host}:{info.port}")


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET
