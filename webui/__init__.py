"""The Flask chat web UI; it relays to the master's HTTP API."""
