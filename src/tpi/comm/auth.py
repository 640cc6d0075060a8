"""Join-token challenge-response. The token itself never crosses the wire.

Worker -> hub: Hello(nonce=c)       hub -> worker: Challenge(nonce=s)
Worker -> hub: AuthResponse(mac = HMAC-SHA256(token, "tpi-join" + s))
Hub -> worker: Welcome(proof = HMAC-SHA256(token, "tpi-hub" + c)) or Error("auth", ...)

The two MACs use different labels, so one side's answer can never be replayed as the other's.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

NONCE_BYTES = 32
_JOIN = b"tpi-join"
_HUB = b"tpi-hub"


def new_nonce() -> str:
    """32 random bytes, hex."""
    return secrets.token_hex(NONCE_BYTES)


def _mac(token: str, label: bytes, nonce: str) -> str:
    if not token:
        raise ValueError("the join token must not be empty")
    return hmac.new(token.encode(), label + nonce.encode(), hashlib.sha256).hexdigest()


def join_mac(token: str, hub_nonce: str) -> str:
    """The worker's answer to the hub's challenge."""
    return _mac(token, _JOIN, hub_nonce)


def hub_proof(token: str, client_nonce: str) -> str:
    """The hub's proof, sent in Welcome, that it holds the same token."""
    return _mac(token, _HUB, client_nonce)


def verify(expected: str, got: str) -> bool:
    """Constant-time comparison of two hex MACs."""
    return hmac.compare_digest(expected.encode(), got.encode())
