"""The master service: device 0, the all-reduce hub, the tokenizer, sampling and the HTTP API.
Prompts and token ids never leave this process."""
