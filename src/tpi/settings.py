"""Settings, read once at the entry point (the `tpi` command line or the environment) into
frozen dataclasses and passed down as they are: nothing below the CLI sees an argparse
Namespace or patches a setting.

  ModelSettings    which model, split over which devices, stored how
  RuntimeOptions   how one device computes and holds its shard (the master pushes these to
                   its workers, so they travel as a dict: `to_json` / `from_json`)
  DraftSettings    speculative decoding: the drafter and its draft tokens per step
  HubSettings      the all-reduce hub the master runs and how workers reach it
  MasterSettings   `tpi master`: the model, the runtime, the hub, the HTTP API, the registry
  WorkerSettings   `tpi worker`: where the master is (or nothing: the LAN) and the join token
  WebUISettings    `tpi webui`: where the master's API is and where to serve the page
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch

from tpi.dtypes import FLOAT_DTYPES, float_dtype
from tpi.model.head import DEFAULT_TOPK
from tpi.weights.slicing import DEFAULT_MAX_BLOCK_BYTES


@dataclass(frozen=True)
class ModelSettings:
    """Which model, split over which devices. (Its storage dtype is RuntimeOptions.dtype.)"""
    source: str | None = None                   # GGUF file, HF directory, shard store, 'smollm2' (None) or hub id
    weights: tuple[float, ...] = (1.0,)         # relative work per device (its length: the device count)
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES  # blocks bigger than this are stored in pieces

    def __post_init__(self):
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    @property
    def devices(self) -> int:
        return len(self.weights)

    @property
    def name(self) -> str:
        return self.source or "smollm2"


@dataclass(frozen=True)
class RuntimeOptions:
    dtype: str | None = None            # storage dtype of the shard store (or int8 / int4 / gguf);
                                        # None: the source's own (`for_source`)
    compute_dtype: str | None = None    # default: the store's own precision (bfloat16 for quantized stores)
    max_seq: int = 2048                 # context length (KV cache size)
    num_slots: int = 1                  # sequences that can decode together
    scheduler: bool = True              # stream blocks under a budget (False: all resident)
    window: int = 2                     # streamed blocks in memory at once (in use + being read)
    memory_budget: int | None = None    # bytes per device for layer weights + KV cache;
                                        # None: from the cgroup limit (no limit: all resident)
    kv_dtype: str | None = None         # KV cache dtype (default: the compute dtype)
    head_topk: int = DEFAULT_TOPK       # output-head candidates per device (exact sampling for top-k <= this)

    def for_source(self, source: str | None) -> "RuntimeOptions":
        """These options with the storage dtype settled for model `source`: a GGUF file keeps
        its quantization (gguf), other sources become bfloat16 (tpi.weights.sources.default_dtype)."""
        if self.dtype:    # (an empty --dtype= from compose.yaml also means the source's own)
            return self
        from tpi.weights.sources import default_dtype

        return replace(self, dtype=default_dtype(source))

    def torch_compute_dtype(self) -> torch.dtype:
        """The store's own precision unless asked otherwise: a bfloat16 store multiplies in
        bfloat16 (no upcast copy of any weight: a block costs what it stores), int8 / int4
        stores run their bfloat16 kernels, a gguf store keeps float32 activations (its int4
        kernel forms are the same size in either; bfloat16 activations lose the Paris of
        docs/quantization.md). Where the reference needs float32 the maths accumulates
        in it whatever this dtype (RMSNorm statistics, softmax, the all-reduce sums).
        float32 compute is an explicit choice (`--compute-dtype float32`), the tests' reference."""
        if self.compute_dtype is not None:
            return float_dtype(self.compute_dtype, "compute dtype")
        if self.dtype == "gguf":    # float32: the file's weights exactly (tpi.weights.gguf_exact)
            return torch.float32
        return FLOAT_DTYPES.get(self.dtype, torch.bfloat16)

    @property
    def gguf_exact(self) -> bool:
        """A gguf store told `--compute-dtype float32`: where numba is missing, it multiplies
        its stored forms themselves (tpi.weights.gguf_quant.GroupWeight: the file's weights
        exactly, several times the decode time) instead of the int4 kernel's forms. With
        numba, float32 compute (the default) is exact either way (tpi.weights.gguf_exact)."""
        return self.dtype == "gguf" and self.compute_dtype == "float32"

    def torch_kv_dtype(self) -> torch.dtype:
        if self.kv_dtype is None:
            return self.torch_compute_dtype()
        return float_dtype(self.kv_dtype, "KV cache dtype")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RuntimeOptions":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown runtime options {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class DraftSettings:
    """Speculative decoding on the master (tpi.generation.draft): who proposes draft tokens
    for the cluster to verify in one forward, and how many per step."""
    drafter: str | None = "ngram"       # "ngram" (prompt lookup), a draft model's source, or None (off)
    tokens: int = 4                     # K: draft tokens verified per step


@dataclass(frozen=True)
class HubSettings:
    join_token: str                     # the shared secret workers must prove
    listen: str = "0.0.0.0:29500"       # HOST:PORT where workers connect
    allreduce: str = "star"             # star | ring | gloo
    link: str | None = None             # emulated link on what the master sends, e.g. "latency=5ms"
    wire_dtype: str | None = None       # dtype of partial sums on the wire (default: compute dtype)
    timeout_s: float = 5.0              # seconds an all-reduce may wait for a worker
    start_timeout_s: float = 120.0      # seconds to wait for the workers at start
    tls_cert: str | None = None         # PEM certificate: workers connect over wss://
    tls_key: str | None = None


@dataclass(frozen=True)
class MasterSettings:
    model: ModelSettings
    runtime: RuntimeOptions
    hub: HubSettings | None = None      # None: every device in this process (no workers)
    http: str = "127.0.0.1:8000"        # HOST:PORT of the HTTP API
    api_key: str | None = None          # require 'Authorization: Bearer KEY'
    expect_workers: int = 0             # without a registry: workers to wait for
    registry: str | None = None         # redis://... : register, plan over who is there
    advertise: str | None = None        # host workers use to reach this master (registry)
    min_workers: int = 0                # with a registry: workers to wait for at start
    store_root: str | None = None       # where shard stores are split (default: the cache)
    draft: DraftSettings = DraftSettings()  # speculative decoding (a request may switch it off)
    mdns: bool = True                   # without a registry: advertise the hub on the LAN (DNS-SD)


@dataclass(frozen=True)
class WorkerSettings:
    join_token: str
    master: str | None = None           # ws://HOST:PORT of the master's hub
    registry: str | None = None         # or find the master in this registry
                                        # (neither: find it on the LAN, tpi.cluster.discovery)
    link: str | None = None             # emulated link on what this worker sends
    name: str = ""                      # for logs and the cluster panel
    rank: int | None = None             # ask for this rank
    timeout_s: float = 5.0              # seconds a collective may wait
    tls_ca: str | None = None           # PEM to trust for the master's certificate (implies wss://)
    once: bool = False                  # exit when the master goes away
    download: bool = False              # always fetch shards over HTTP
    mdns_interface: str | None = None   # browse for the master only on the interface with this address


@dataclass(frozen=True)
class WebUISettings:
    master_url: str = "http://127.0.0.1:8000"   # the master's HTTP API
    listen: str = "127.0.0.1:8080"              # HOST:PORT to serve the page on
    api_key: str | None = None                  # the master's API key, if it requires one


def split_hostport(text: str, default_port: int) -> tuple[str, int]:
    """'HOST:PORT' -> (HOST, PORT); 'HOST' -> (HOST, default_port)."""
    host, _, port = text.rpartition(":")
    if not host:
        return text, default_port
    try:
        return host, int(port)
    except ValueError:
        raise ValueError(f"cannot read the address {text!r}: use HOST:PORT") from None
