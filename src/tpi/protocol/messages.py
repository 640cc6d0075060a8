"""Every message that crosses a process boundary: one frozen dataclass per kind, registered
with `@message(kind, channel, origin)` (codec.py carries them)."""
from __future__ import annotations

from typing import Any

import torch

from tpi.protocol.codec import Message, message

# --- handshake: Hello -> Challenge -> AuthResponse -> Welcome | Error (docs/protocol.md)

@message(1, "handshake", "worker")
class Hello(Message):
    version: int
    nonce: str                      # client nonce (hex); the hub proves the token over it
    name: str = ""
    purpose: str = "join"           # "join" the group, or "ring" = a ring link to a successor
    want_rank: int | None = None    # join: requested rank; ring: the sender's rank
    generation: int = 0             # ring: which ring build this link belongs to


@message(2, "handshake", "hub")
class Challenge(Message):
    nonce: str                      # hub nonce (hex), 32 random bytes


@message(3, "handshake", "worker")
class AuthResponse(Message):
    mac: str                        # hex HMAC-SHA256(token, "tpi-join", hub nonce, client nonce)


@message(4, "handshake", "hub")
class Welcome(Message):
    rank: int
    world_size: int
    allreduce: str                  # "star" | "ring" | "gloo"
    wire_dtype: str                 # dtype partial sums travel in, e.g. "float32"
    proof: str                      # hex HMAC-SHA256(token, "tpi-hub", c, s, the fields above
                                    # and data_port): none can be altered on the way
    data_port: int = 0              # star: the hub's data port (comm/dataplane.py); 0 = none


@message(5, "control", "any")
class Error(Message):
    code: str                       # "auth" | "version" | "full" | "rank_taken" | "protocol" | ...
    message: str


# --- collectives (header step = collective step, part = hop)

@message(10, "collective", "worker")
class Partial(Message):
    tensor: torch.Tensor            # a worker's addend, in the wire dtype


@message(11, "collective", "hub")
class Reduced(Message):
    tensor: torch.Tensor            # the sum, in the wire dtype


@message(12, "collective", "any")
class RingChunk(Message):
    tensor: torch.Tensor            # one 1-D chunk of the flattened tensor


@message(13, "collective", "hub")
class Abort(Message):
    reason: str                     # header step = (failed epoch << 32); that epoch is dead


# --- collective setup

@message(20, "setup", "worker")
class PeerInfo(Message):
    ring_url: str                   # where this worker accepts its ring predecessor


@message(21, "setup", "hub")
class RingSetup(Message):
    generation: int
    peers: dict[str, str]           # str(rank) -> ring_url, workers only (rank 0 = hub url)


@message(22, "setup", "hub")
class GlooSetup(Message):
    port: int                       # TCPStore port on the master
    host: str | None = None         # None: the host of the hub URL
    timeout: float = 30.0


@message(23, "setup", "worker")
class SetupDone(Message):
    generation: int
    ok: bool = True
    detail: str = ""


# --- engine control (header step = collective step the receiver is at after reading it)

@message(30, "control", "hub")
class Assignment(Message):
    rank: int
    world_size: int
    store: str                      # the store's path on the master (a worker may see the volume)
    store_id: str                   # its name, for the shard server
    options: dict[str, Any]         # tpi.settings.RuntimeOptions.to_json(), checked by from_json
    shards_url: str | None = None   # the master's shard server, for workers without the volume
    host_share: int = 1             # cluster processes on the worker's machine (tpi.host.host_shares)


@message(31, "control", "hub")
class ForwardStep(Message):
    seq: int
    slots: list[int]                # KV-cache slot of each batch row
    starts: list[int]               # position of each row's first token in `hidden`
    hidden: torch.Tensor            # (batch, tokens, hidden)
    every_position: bool = False    # output-head candidates for every position, not just the last


@message(33, "control", "hub")
class Shutdown(Message):
    reason: str = ""


@message(34, "control", "worker")
class Reply(Message):
    seq: int
    ok: bool = True
    error: str = ""                             # why not ok
    memory: dict[str, int | None] | None = None # the worker's memory: rss_bytes, peak_rss_bytes and
                                                # its shard's (tpi.model.shard.ShardRunner.memory_status)
    breakdown: dict[str, float] | None = None   # the step's compute_s, comm_s, disk_wait_s
    tensor: torch.Tensor | None = None


@message(35, "control", "hub")
class CollectiveDrill(Message):
    """Run `reps` all-reduces of seeded random tensors (tpi.comm.drill; tests, bench)."""
    seq: int
    reps: int
    shape: list[int]
    seed: int = 0
    dtype: str = "float32"
    exact: bool = False             # all_reduce(..., exact=True): float32 whatever the wire dtype


@message(36, "control", "worker")
class DrillReport(Message):
    """A worker's answer to CollectiveDrill: its median all-reduce time and CPU per all-reduce."""
    seq: int
    median_s: float
    cpu_s: float
    tensor: torch.Tensor | None = None          # the last all-reduce's result


# --- link measurement: answered on the receiver's event loop, through its emulated uplink

@message(40, "link", "hub")
class Ping(Message):
    nonce: int


@message(41, "link", "worker")
class Pong(Message):
    nonce: int                      # the Ping's
