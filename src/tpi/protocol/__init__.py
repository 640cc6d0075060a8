"""Every message that crosses a process boundary, and the one codec that carries them.

A frame is one binary WebSocket message:

    offset  size        field
    0       4           magic  b"TPIW"
    4       1           version (VERSION)
    5       1           kind   (message type code, bound to one dataclass below)
    6       1           dtype  (0 = no tensor; else DTYPE_CODES)
    7       1           ndim   (<= MAX_NDIM)
    8       8           step   u64: collective step (epoch << 32 | counter) the frame belongs to
    16      4           part   u32: chunk / hop index inside the step (ring), else 0
    20      4           meta   u32: byte length of the JSON body
    24      4*ndim      shape  u32 each
    ...     meta        JSON object with the message's non-tensor fields (absent if none)
    ...     rest        tensor bytes, raw little-endian, C order (absent if dtype 0)

Tensors are never pickled. The JSON body is strict: unknown or missing fields and values of
the wrong type are ProtocolError, and so are NaN or infinite numbers, integers outside the
signed 64-bit range and JSON nested too deep to parse. A frame whose byte length disagrees
with its shape and dtype, or whose shape could not be allocated within the frame limit, is
ProtocolError. Whatever the bytes, `decode` raises nothing but ProtocolError (a fuzz test
holds it to that). Text frames are not part of the protocol. After the join handshake every
frame also carries a 16-byte authentication tag (tpi.comm.session), checked before decoding.

Adding a message: declare a dataclass with `@message(kind, channel, origin)`; at most one
field may be a tensor (annotated `torch.Tensor` or `torch.Tensor | None`).
"""
from tpi.protocol.codec import *  # noqa: F401,F403 - the public API of the package
from tpi.protocol.codec import __all__ as _codec_all
from tpi.protocol.messages import (Abort, Assignment, AuthResponse, Challenge, CollectiveDrill,
                                   DrillReport, Error, ForwardStep, GlooSetup, Hello, PeerInfo,
                                   Ping, Pong, Reduced, Partial, Reply, RingChunk, RingSetup,
                                   SetupDone, Shutdown, Welcome)

__all__ = [*_codec_all, "Hello", "Challenge", "AuthResponse", "Welcome", "Error", "Partial",
           "Reduced", "RingChunk", "Abort", "PeerInfo", "RingSetup", "GlooSetup", "SetupDone",
           "Assignment", "ForwardStep", "Shutdown", "Reply", "CollectiveDrill", "DrillReport",
           "Ping", "Pong"]
