"""A hand-driven peer for the hub's tests: a real WebSocket that joins like a worker (the
product's own handshake arithmetic) and then sends whatever a test wants: well-formed and
sealed, unsealed, forged or garbage."""
from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tpi.comm import auth, dataplane
from tpi.comm.session import Session
from tpi.protocol import VERSION, AuthResponse, Hello, Welcome, decode, encode


class RawPeer:
    def __init__(self, ws, url: str):
        self.ws, self.url = ws, url
        self.session: Session | None = None
        self.welcome: Welcome | None = None
        self.key: bytes | None = None

    @classmethod
    async def open(cls, url: str) -> RawPeer:
        return cls(await connect(url, compression=None, max_size=None, proxy=None), url)

    async def join(self, token: str, **hello) -> Welcome:
        nonce = auth.new_nonce()
        await self.ws.send(encode(Hello(version=VERSION, nonce=nonce, **hello)))
        challenge = decode(await self.ws.recv()).msg
        await self.ws.send(encode(AuthResponse(mac=auth.join_mac(token, challenge.nonce,
                                                                 nonce))))
        self.welcome = decode(await self.ws.recv()).msg
        assert isinstance(self.welcome, Welcome), self.welcome
        self.key = auth.session_key(token, nonce, challenge.nonce)
        self.session = Session(self.key, accepting=False)
        return self.welcome

    async def send(self, frame, seal: bool = True) -> None:
        sealed = seal and self.session is not None and not isinstance(frame, str)
        await self.ws.send(self.session.seal(frame) if sealed else frame)

    async def recv_all(self, timeout: float = 10.0) -> list:
        """Every message until the hub closes the connection."""
        got = []
        try:
            while True:
                data = await asyncio.wait_for(self.ws.recv(), timeout)
                if self.session is not None:
                    try:
                        data = bytes(self.session.open(data))
                    except Exception:  # noqa: BLE001 - an unsealed refusal after a bad frame
                        pass
                got.append(decode(data).msg)
        except ConnectionClosed:
            pass
        return got

    def data_connection(self, timeout: float = 5.0) -> dataplane.DataSocket:
        """This peer's data connection (star), opened and proven like a worker's."""
        return dataplane.connect(urlsplit(self.url).hostname, self.welcome.data_port,
                                 self.welcome.rank, self.key, timeout, 1 << 20)

    async def close(self) -> None:
        await self.ws.close()
