"""Every MAC keyed by the join token, in one place, and the check that refuses weak tokens.

The join handshake (handshake.py), the shard server's bearer and manifest proof
(shard_delivery.py) and the registry's signed records (registry.py) all call `mac` with
their own label, so a MAC made for one purpose is never valid for another.

Join handshake (the token itself never crosses the wire):
Worker -> hub: Hello(nonce=c)       hub -> worker: Challenge(nonce=s)
Worker -> hub: AuthResponse(mac = HMAC-SHA256(token, "tpi-join" + s + c))
Hub -> worker: Welcome(rank, world, allreduce, dtype,
                       proof = HMAC-SHA256(token, "tpi-hub" + c + s + those fields))
Both sides then derive the session key HMAC-SHA256(token, "tpi-session" + c + s), which
authenticates every later frame of that connection (session.py).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

NONCE_BYTES = 32
MIN_SECRET_CHARS = 16
_JOIN = b"tpi-join"
_HUB = b"tpi-hub"
_SESSION = b"tpi-session"


class WeakSecret(ValueError):
    """A default or short secret, refused unless the operator says --insecure."""


def new_nonce() -> str:
    """32 random bytes, hex."""
    return secrets.token_hex(NONCE_BYTES)


def mac(token: str, label: bytes, *parts: bytes | str) -> str:
    """Hex HMAC-SHA256(token, label + parts joined by NUL). The one HMAC of the project."""
    if not token:
        raise ValueError("the join token must not be empty")
    msg = label + b"\x00".join(p.encode() if isinstance(p, str) else p for p in parts)
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def verify(expected: str | bytes, got: str | bytes) -> bool:
    """Constant-time comparison of two MACs (or bearer strings)."""
    e = expected.encode() if isinstance(expected, str) else expected
    g = got.encode() if isinstance(got, str) else got
    return hmac.compare_digest(e, g)


def join_mac(token: str, hub_nonce: str, client_nonce: str = "") -> str:
    """The worker's answer to the hub's challenge."""
    return mac(token, _JOIN, hub_nonce, client_nonce)


def hub_proof(token: str, client_nonce: str, hub_nonce: str = "", *fields: str) -> str:
    """The hub's proof, sent in Welcome, that it holds the same token; it covers the fields
    the worker acts on (rank, world size, all-reduce, wire dtype), so none can be altered."""
    return mac(token, _HUB, client_nonce, hub_nonce, *fields)


def session_key(token: str, client_nonce: str, hub_nonce: str) -> bytes:
    """The key that authenticates every frame after the handshake (session.py)."""
    return bytes.fromhex(mac(token, _SESSION, client_nonce, hub_nonce))


def check_secret(value: str, what: str, insecure: bool = False) -> None:
    """Refuse a shipped default (`change-me-...`) or a secret shorter than 16 characters:
    anyone who sniffs one handshake, shard bearer or registry record can guess such a token
    offline. `insecure` (the `--insecure` flag) lets it run, for tests and demos on one host."""
    if insecure:
        return
    if not value:
        raise WeakSecret(f"{what} is empty")
    if value.lower().startswith("change-me"):
        raise WeakSecret(f"{what} is the shipped default {value!r}: set a random one "
                         f"(e.g. `openssl rand -hex 24`), or pass --insecure for a local demo")
    if len(value) < MIN_SECRET_CHARS:
        raise WeakSecret(f"{what} has {len(value)} characters, fewer than {MIN_SECRET_CHARS}: "
                         f"it could be guessed offline from one sniffed handshake; use a longer "
                         f"random one, or pass --insecure for a local demo")
