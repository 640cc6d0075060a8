"""TLS contexts for wss:// (optional; plain ws:// when no certificate is given)."""
from __future__ import annotations

import ssl


def server_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """The hub's context: its certificate chain and private key (PEM)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def client_context(cafile: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """A worker's context. `cafile` trusts a private CA or a self-signed hub certificate;
    `verify=False` skips verification (the join token still authenticates both ends, but a
    man in the middle could then read the traffic)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
