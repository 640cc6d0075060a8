"""Both sides of the join handshake (auth.py has the cryptography, protocol.py the frames).

    worker                                   hub
      Hello(version, nonce=c, purpose) ----->
      <----------------------------------- Challenge(nonce=s)
      AuthResponse(HMAC(token, s, c)) ---->  verify (compare_digest)
      <---- Welcome(rank, world, allreduce, dtype, data_port,
                    proof=HMAC(token, c, s, those fields))     or Error + close 1008

Then both sides seal every frame with the session key HMAC(token, c, s) (session.py).
Until the token is verified a peer may send only HANDSHAKE_MAX_BYTES per frame, and a hub
or ring listener runs at most MAX_HANDSHAKES handshakes at once (more are refused "busy").
Every wait has a timeout. A refusal is an Error frame with a clear message, then close.
"""
from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

from websockets.exceptions import ConnectionClosed

from tpi.comm import auth
from tpi.comm.base import CommError
from tpi.comm.conn import HANDSHAKE_MAX_BYTES, Conn
from tpi.comm.session import Session
from tpi.protocol import (VERSION, AuthResponse, Challenge, Error, Frame, Hello,
                          ProtocolError, Welcome, decode, encode)

log = logging.getLogger("tpi.comm")
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
MAX_HANDSHAKES = 16


class JoinRefused(CommError):
    """The other side refused the handshake (wrong token, group full, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Accepted(NamedTuple):
    hello: Hello
    hub_nonce: str


async def _recv(conn: Conn, expect: type, timeout: float) -> Frame:
    try:
        data = await asyncio.wait_for(conn.recv(), timeout)
    except asyncio.TimeoutError:  # TimeoutError itself from 3.11 on
        raise JoinRefused("timeout", f"no {expect.__name__} within {timeout:g}s") from None
    return decode(data, max_bytes=HANDSHAKE_MAX_BYTES, expect=(expect, Error))


async def refuse(conn: Conn, code: str, message: str) -> None:
    """Tell the peer why, then close the connection."""
    try:
        conn.put(encode(Error(code=code, message=message)))
        await conn.close(POLICY_VIOLATION, message)
    except ConnectionClosed:
        pass


async def accept(conn: Conn, token: str, timeout: float, gate: asyncio.Semaphore) -> Accepted:
    """Hub (or ring listener) side, up to verifying the token. The caller then admits the
    peer (`admit`) or refuses it. `gate` caps the handshakes in progress.

    Raises JoinRefused (already sent to the peer and closed) or ConnectionClosed."""
    if gate.locked():
        await conn.close(TRY_AGAIN_LATER, "busy: too many handshakes in progress")
        raise JoinRefused("busy", f"{MAX_HANDSHAKES} handshakes already in progress")
    async with gate:
        return await _accept(conn, token, timeout)


async def _accept(conn: Conn, token: str, timeout: float) -> Accepted:
    try:
        hello = (await _recv(conn, Hello, timeout)).msg
        if isinstance(hello, Error):
            raise ProtocolError(f"peer sent Error before Hello: {hello.message}")
        if hello.version != VERSION:
            raise JoinRefused("version", f"protocol version {hello.version} not supported "
                                         f"(hub speaks {VERSION})")
        nonce = auth.new_nonce()
        conn.put(encode(Challenge(nonce=nonce)))
        answer = (await _recv(conn, AuthResponse, timeout)).msg
        if isinstance(answer, Error):
            raise ProtocolError(f"peer sent Error instead of AuthResponse: {answer.message}")
        if not auth.verify(auth.join_mac(token, nonce, hello.nonce), answer.mac):
            raise JoinRefused("auth", "join token rejected: this worker's token does not "
                                      "match the master's")
        return Accepted(hello, nonce)
    except JoinRefused as e:
        await refuse(conn, e.code, str(e))
        raise
    except ProtocolError as e:
        await refuse(conn, "protocol", f"handshake: {e}")
        raise JoinRefused("protocol", f"handshake: {e}") from None


def _proof_fields(w: Welcome) -> tuple[str, ...]:
    return (str(w.rank), str(w.world_size), w.allreduce, w.wire_dtype, str(w.data_port))


def admit(conn: Conn, token: str, acc: Accepted, rank: int, world_size: int, allreduce: str,
          wire_dtype: str, max_bytes: int, data_port: int = 0, step: int = 0) -> bytes:
    """Send Welcome (its fields covered by the proof) and seal the connection from here on.
    Returns the session key (the data connection proves it too)."""
    w = Welcome(rank=rank, world_size=world_size, allreduce=allreduce, wire_dtype=wire_dtype,
                data_port=data_port, proof="")
    proof = auth.hub_proof(token, acc.hello.nonce, acc.hub_nonce, *_proof_fields(w))
    conn.put(encode(Welcome(**{**w.__dict__, "proof": proof}), step=step))
    key = auth.session_key(token, acc.hello.nonce, acc.hub_nonce)
    conn.authenticated(Session(key, accepting=True), max_bytes)
    return key


async def join(conn: Conn, token: str, hello: Hello, timeout: float,
               max_bytes: int) -> tuple[Frame, bytes]:
    """Worker side: the Welcome frame (its step is where the hub's collectives are) and the
    session key; the connection is sealed from here on.

    Raises JoinRefused with the hub's message, or if the hub cannot prove the token."""
    conn.put(encode(hello))
    challenge = (await _recv(conn, Challenge, timeout)).msg
    if isinstance(challenge, Error):
        raise JoinRefused(challenge.code, f"hub refused: {challenge.message}")
    conn.put(encode(AuthResponse(mac=auth.join_mac(token, challenge.nonce, hello.nonce))))
    frame = await _recv(conn, Welcome, timeout)
    w = frame.msg
    if isinstance(w, Error):
        raise JoinRefused(w.code, f"hub refused: {w.message}")
    if not auth.verify(auth.hub_proof(token, hello.nonce, challenge.nonce,
                                      *_proof_fields(w)), w.proof):
        await refuse(conn, "auth", "hub could not prove it holds the join token")
        raise JoinRefused("auth", "hub could not prove it holds the join token "
                                  "(wrong token on one side, not a tpi master, or a Welcome "
                                  "altered on the way)")
    key = auth.session_key(token, hello.nonce, challenge.nonce)
    conn.authenticated(Session(key, accepting=False), max_bytes)
    return frame, key
