"""Communicators: how the shards of one model sum their partial results (the interface is
tpi.comm.base). Nothing is imported here, so light users such as the netem sidecar, which
reads link specs (tpi.comm.link), do not load torch."""
