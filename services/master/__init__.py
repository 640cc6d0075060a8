"""The master service: device 0, the all-reduce hub, the tokenizer, sampling and the HTTP API.
The tokenizer runs only here, but workers can still read the text: see README.md (workers
must be trusted)."""
