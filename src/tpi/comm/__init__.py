"""Communicators: how the shards of one model sum their partial results."""
from tpi.comm.base import Communicator, CommError

__all__ = ["Communicator", "CommError"]
