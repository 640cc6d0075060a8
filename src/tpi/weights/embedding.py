"""The master's token embedding, read row by row from the store: no table in memory.

`EmbeddingRows.embed(ids)` reads only the rows of the tokens asked for (one pread per
distinct token, straight into the output) from `embed.safetensors`, and drops the pages it
touched from the page cache, as the scheduler does for streamed blocks. A prompt of T
tokens costs T x H x 2 bytes (16 KB a token at hidden 8192 in bfloat16) instead of the
whole table (2.1 GB for Llama-3.1-70B's 128256 tokens).

Integrity, as in tpi.weights.scheduler: the whole file is checked against the manifest's
sha256 once, when opened (read in 8 MiB chunks, never held), and its (inode, size, mtime,
ctime) remembered; every later read compares the fstat of the opened file with it, and a
changed file is hashed again before its rows are used (a mismatch is a StoreError).
"""
from __future__ import annotations

import os

import torch

from tpi.dtypes import SAFETENSORS_DTYPES
from tpi.host import drop_file_cache
from tpi.weights.store import (EMBED_PATH, ShardStore, StoreError, hash_file,
                               read_header)

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class EmbeddingRows:
    def __init__(self, store: ShardStore, compute_dtype: torch.dtype):
        entry = store.files.get(EMBED_PATH)
        if entry is None:
            raise StoreError(f"{store.root}: manifest lists no {EMBED_PATH}")
        self.path, self.entry, self.dtype = store.root / EMBED_PATH, entry, compute_dtype
        try:
            header, base = read_header(self.path)
        except FileNotFoundError:
            raise StoreError(f"embedding file missing: {self.path}") from None
        info = header.get("embed")
        if info is None or len(info["shape"]) != 2 or info["dtype"] not in SAFETENSORS_DTYPES:
            raise StoreError(f"{self.path} holds no 2-D embedding table")
        self.vocab_size, self.hidden_size = info["shape"]                     # (vocab, H)
        self.stored_dtype = SAFETENSORS_DTYPES[info["dtype"]]
        self.row_bytes = self.hidden_size * self.stored_dtype.itemsize
        self.offset = base + info["data_offsets"][0]
        if info["data_offsets"][1] - info["data_offsets"][0] != self.vocab_size * self.row_bytes:
            raise StoreError(f"{self.path}: the embedding's byte range does not match its shape")
        self.signature = None
        self.hashed = 0   # full sha256 checks made
        self._verify()

    def _verify(self) -> None:
        try:
            digest, st = hash_file(self.path)
        except FileNotFoundError:
            raise StoreError(f"embedding file missing: {self.path}") from None
        self.hashed += 1
        if st.st_size != self.entry.bytes or digest != self.entry.sha256:
            self.signature = None
            raise StoreError(f"embedding file {self.path} failed its sha256 check (altered or corrupt)")
        self.signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int -> hidden (B, T, H) in the compute dtype."""
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1}")
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = torch.empty(len(unique), self.hidden_size, dtype=self.stored_dtype)  # (U, H)
        view = memoryview(rows.view(torch.uint8).numpy()).cast("B")
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"embedding file missing: {self.path}") from None
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self.signature:
                self._verify()  # replaced or rewritten since it was checked: hash it again
            for u, token in enumerate(unique.tolist()):
                off = self.offset + token * self.row_bytes
                chunk = view[u * self.row_bytes : (u + 1) * self.row_bytes]
                if os.preadv(fd, [chunk], off) != self.row_bytes:
                    raise StoreError(f"{self.path}: row {token} is cut short")
                # whole pages: DONTNEED leaves partly covered pages cached
                start, end = off - off % PAGE, -(-(off + self.row_bytes) // PAGE) * PAGE
                drop_file_cache(fd, start, end - start)
        finally:
            os.close(fd)
        return rows[inverse].view(*ids.shape, self.hidden_size).to(self.dtype)
