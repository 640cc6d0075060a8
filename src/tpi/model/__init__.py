"""Llama-family maths for one shard. Knows nothing of sockets, files or parallel transports:
the all-reduce is a call on the communicator it is handed."""
