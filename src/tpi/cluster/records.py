"""Registry records: the signed `DeviceRecord` every process writes about itself, and the
master's signed refusal of a worker (`rejected:<id>`). Both are `<mac>.<json body>` with
mac = HMAC-SHA256(join token, label + body), a label per kind so neither passes for the other.

Decoding never raises anything but RecordError (ProofError for a failed MAC), whatever the
bytes: the master reads every worker's record in one loop, and one junk value (deeply
nested JSON, a mistyped field) must cost only that record (tpi.cluster.membership).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from tpi.cluster.capability import DeviceCapability
from tpi.comm import auth

RECORD_FORMAT = 1
RECORD_LABEL = b"tpi-registry-record-v1\x00"  # distinct from every other use of the join token
REJECTION_LABEL = b"tpi-registry-rejection-v1\x00"
ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
ROLES = ("master", "worker")


class RecordError(ValueError):
    """A registry value that is not a well-formed record."""


class ProofError(RecordError):
    """A record whose MAC does not verify under this join token."""


@dataclass(frozen=True)
class DeviceRecord:
    role: str                        # "master" | "worker"
    id: str                          # unique in the cluster; part of the key name
    address: str | None              # host:port of its WebSocket endpoint (master: the hub)
    capability: DeviceCapability
    version: str                     # tpi package version
    session: str                     # random per process start
    http_url: str | None = None      # master: base URL of the shard server (tpi.cluster.delivery)
    beat: int = 0                    # heartbeat counter, advances on every write
    ts: float = 0.0                  # sender's wall clock at the write (display only)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DeviceRecord":
        try:
            rec = cls(role=str(d["role"]), id=str(d["id"]),
                      address=None if d.get("address") is None else str(d["address"]),
                      capability=DeviceCapability.from_json(d["capability"]),
                      version=str(d["version"]), session=str(d["session"]),
                      http_url=None if d.get("http_url") is None else str(d["http_url"]),
                      beat=int(d.get("beat", 0)), ts=float(d.get("ts", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"record lacks or mistypes a field: {e}") from None
        if rec.role not in ROLES or not ID_RE.match(rec.id):
            raise RecordError(f"record has role {rec.role!r} / id {rec.id!r}")
        return rec


def require_token(token: str) -> None:
    if not token:
        raise ValueError("the join token must not be empty")


def _mac(token: str, body: bytes) -> str:
    require_token(token)
    return auth.mac(token, RECORD_LABEL, body)


def encode_record(rec: DeviceRecord, token: str) -> bytes:
    body = json.dumps({"format": RECORD_FORMAT, **rec.to_json()}, sort_keys=True, separators=(",", ":")).encode()
    return _mac(token, body).encode() + b"." + body


def decode_record(raw: bytes, token: str) -> DeviceRecord:
    """The record in `raw`; ProofError if its MAC fails, RecordError if it is malformed."""
    mac, sep, body = raw.partition(b".")
    if not sep:
        raise RecordError("not a signed record")
    if not auth.verify(_mac(token, body), mac):
        raise ProofError("join-token proof does not verify")
    return _parse_body(body)


def _parse_body(body: bytes) -> DeviceRecord:
    d = _json_object(body, "record")
    if d.get("format") != RECORD_FORMAT:
        raise RecordError(f"unknown record format {str(d.get('format'))[:40]!r}")
    try:
        return DeviceRecord.from_json(d)
    except RecordError:
        raise
    except Exception as e:  # whatever a mistyped field makes a constructor raise
        raise RecordError(f"record has a malformed field: {type(e).__name__}") from None


def _json_object(body: bytes, what: str) -> dict:
    """JSON object or RecordError, whatever the bytes (deep nesting included)."""
    try:
        d = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RecordError(f"{what} is not JSON: {type(e).__name__}") from None
    if not isinstance(d, dict):
        raise RecordError(f"{what} is not a JSON object")
    return d


def unverified_fields(raw: bytes) -> dict:
    """Fields of a record that failed its proof, for log lines only (never trusted)."""
    try:
        return _json_object(raw.partition(b".")[2], "record")
    except RecordError:
        return {}


def encode_rejection(token: str, device_id: str, session: str, reason: str) -> bytes:
    """The master's refusal of one worker's session, `<mac>.<json>`, signed like a record."""
    body = json.dumps({"id": device_id, "session": session, "reason": reason}, sort_keys=True).encode()
    return auth.mac(token, REJECTION_LABEL, body).encode() + b"." + body


def decode_rejection(raw: bytes, token: str, device_id: str) -> tuple[dict, bool]:
    """(fields, verified) of a `rejected:<id>` value. Unverified is what a worker gets both
    from a value that anyone with Redis access wrote and from a master with another join
    token; it acts only on a verified one (RecordError: not a rejection at all)."""
    mac, sep, body = raw.partition(b".")
    info = _json_object(body, "rejection")
    verified = bool(sep) and auth.verify(auth.mac(token, REJECTION_LABEL, body), mac) and info.get("id") == device_id
    return info, verified
