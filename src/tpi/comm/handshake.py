"""Both sides of the join handshake (auth.py has the cryptography, protocol.py the frames).

    worker                                   hub
      Hello(version, nonce=c, purpose) ----->
      <----------------------------------- Challenge(nonce=s)
      AuthResponse(HMAC(token, s)) ------->  verify (compare_digest)
      <------------------ Welcome(rank, ..., proof=HMAC(token, c))   or Error + close 1008

Every wait has a timeout. A refusal is an Error frame with a clear message, then close.
"""
from __future__ import annotations

import asyncio
import logging

from websockets.exceptions import ConnectionClosed

from tpi.comm import auth
from tpi.comm.base import CommError
from tpi.comm.conn import Conn
from tpi.protocol import (VERSION, AuthResponse, Challenge, Error, Frame, Hello,
                          ProtocolError, Welcome, decode, encode)

log = logging.getLogger("tpi.comm")
POLICY_VIOLATION = 1008


class JoinRefused(CommError):
    """The other side refused the handshake (wrong token, group full, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


async def _recv(conn: Conn, expect: type, timeout: float, max_bytes: int) -> Frame:
    try:
        data = await asyncio.wait_for(conn.ws.recv(), timeout)
    except asyncio.TimeoutError:  # TimeoutError itself from 3.11 on
        raise JoinRefused("timeout", f"no {expect.__name__} within {timeout:g}s") from None
    return decode(data, max_bytes=max_bytes, expect=(expect, Error))


async def refuse(conn: Conn, code: str, message: str) -> None:
    """Tell the peer why, then close the connection."""
    try:
        conn.put(encode(Error(code=code, message=message)))
        await conn.close(POLICY_VIOLATION, message)
    except ConnectionClosed:
        pass


async def accept(conn: Conn, token: str, timeout: float, max_bytes: int) -> Hello:
    """Hub side, up to verifying the token. The caller answers Welcome or refuses.

    Raises JoinRefused (already sent to the peer and closed) or ConnectionClosed."""
    try:
        hello = (await _recv(conn, Hello, timeout, max_bytes)).msg
        if isinstance(hello, Error):
            raise ProtocolError(f"peer sent Error before Hello: {hello.message}")
        if hello.version != VERSION:
            raise JoinRefused("version", f"protocol version {hello.version} not supported "
                                         f"(hub speaks {VERSION})")
        nonce = auth.new_nonce()
        conn.put(encode(Challenge(nonce=nonce)))
        answer = (await _recv(conn, AuthResponse, timeout, max_bytes)).msg
        if isinstance(answer, Error):
            raise ProtocolError(f"peer sent Error instead of AuthResponse: {answer.message}")
        if not auth.verify(auth.join_mac(token, nonce), answer.mac):
            raise JoinRefused("auth", "join token rejected: this worker's token does not "
                                      "match the master's")
        return hello
    except JoinRefused as e:
        await refuse(conn, e.code, str(e))
        raise
    except ProtocolError as e:
        await refuse(conn, "protocol", f"handshake: {e}")
        raise JoinRefused("protocol", f"handshake: {e}") from None


def welcome(token: str, hello: Hello, rank: int, world_size: int, allreduce: str,
            wire_dtype: str) -> Welcome:
    """The hub's (or a ring listener's) answer once the token is verified."""
    return Welcome(rank=rank, world_size=world_size, allreduce=allreduce,
                   wire_dtype=wire_dtype, proof=auth.hub_proof(token, hello.nonce))


async def join(conn: Conn, token: str, hello: Hello, timeout: float,
               max_bytes: int) -> Frame:
    """Worker side: returns the Welcome frame (its step is where the hub's collectives are).

    Raises JoinRefused with the hub's message, or if the hub cannot prove the token."""
    conn.put(encode(hello))
    challenge = (await _recv(conn, Challenge, timeout, max_bytes)).msg
    if isinstance(challenge, Error):
        raise JoinRefused(challenge.code, f"hub refused: {challenge.message}")
    conn.put(encode(AuthResponse(mac=auth.join_mac(token, challenge.nonce))))
    frame = await _recv(conn, Welcome, timeout, max_bytes)
    if isinstance(frame.msg, Error):
        raise JoinRefused(frame.msg.code, f"hub refused: {frame.msg.message}")
    if not auth.verify(auth.hub_proof(token, hello.nonce), frame.msg.proof):
        await refuse(conn, "auth", "hub could not prove it holds the join token")
        raise JoinRefused("auth", "hub could not prove it holds the join token "
                                  "(wrong token on one side, or not a tpi master)")
    return frame
