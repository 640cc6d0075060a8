"""The master's token embedding, read row by row from the store: no table in memory.

`EmbeddingRows.embed(ids)` reads only the rows of the tokens asked for (one pread per
distinct token, straight into the output) from `embed.safetensors`, and drops the pages it
touched from the page cache, as the scheduler does for streamed blocks. A prompt of T
tokens costs T x H x 2 bytes (16 KB a token at hidden 8192 in bfloat16) instead of the
whole table (2.1 GB for Llama-3.1-70B's 128256 tokens).

A `--dtype gguf` store keeps the embedding in the GGUF file's quantized form
(tpi.weights.gguf_quant: `embed.gq`, `embed.gscale`, ... each with one row per token): the
rows of every part are read the same way and dequantized together.

Integrity, as in tpi.weights.scheduler: the whole file is checked against the manifest's
sha256 once, when opened (read in 8 MiB chunks, never held), and its (inode, size, mtime,
ctime) remembered; every later read compares the fstat of the opened file with it, and a
changed file is hashed again before its rows are used (a mismatch is a StoreError).
"""
from __future__ import annotations

import os

import torch

from tpi.weights.gguf_quant import GroupWeight
from tpi.dtypes import SAFETENSORS_DTYPES
from tpi.host import drop_file_cache
from tpi.weights.store import EMBED_PATH, ShardStore, StoreError, hash_file, read_header, read_tensor

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class EmbeddingRows:
    def __init__(self, store: ShardStore, compute_dtype: torch.dtype):
        entry = store.files.get(EMBED_PATH)
        if entry is None:
            raise StoreError(f"{store.root}: manifest lists no {EMBED_PATH}")
        self.path, self.entry, self.dtype = store.root / EMBED_PATH, entry, compute_dtype
        self.scale = store.config.embed_scale  # Gemma: rows times sqrt(hidden), in the compute dtype
        try:
            header, base = read_header(self.path)
        except FileNotFoundError:
            raise StoreError(f"embedding file missing: {self.path}") from None
        names = [n for n in header if n == "embed" or n.startswith("embed.")]
        if not ({"embed", "embed.gq"} & set(names)) or any(header[n]["dtype"] not in SAFETENSORS_DTYPES for n in names):
            raise StoreError(f"{self.path} holds no embedding table")
        self.vocab_size = header["embed" if "embed" in header else "embed.gq"]["shape"][0]
        # name -> (offset of row 0, bytes per row, dtype, shape of a row); a part that is not
        # one row per token (a group form's gfirst) is read whole, once
        self.parts, self.whole = {}, {}
        for n in names:
            info, dtype = header[n], SAFETENSORS_DTYPES[header[n]["dtype"]]
            start, end = (base + o for o in info["data_offsets"])
            if n.endswith(".gfirst"):
                self.whole[n[len("embed."):]] = read_tensor(self.path, header, base, n)
                continue
            shape = info["shape"]
            if len(shape) != 2 or shape[0] != self.vocab_size or end - start != shape[0] * shape[1] * dtype.itemsize:
                raise StoreError(f"{self.path}: {n}'s byte range does not match one row per token")
            self.parts[n] = (start, shape[1] * dtype.itemsize, dtype, shape[1])
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
        parts = {n: torch.empty(len(unique), width, dtype=dtype)                     # (U, H) or (U, groups)
                 for n, (_, _, dtype, width) in self.parts.items()}
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"embedding file missing: {self.path}") from None
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self.signature:
                self._verify()  # replaced or rewritten since it was checked: hash it again
            for n, (offset, row_bytes, _, _) in self.parts.items():
                view = memoryview(parts[n].view(torch.uint8).numpy()).cast("B")
                for u, token in enumerate(unique.tolist()):
                    off = offset + token * row_bytes
                    if os.preadv(fd, [view[u * row_bytes : (u + 1) * row_bytes]], off) != row_bytes:
                        raise StoreError(f"{self.path}: row {token} is cut short")
                    # whole pages: DONTNEED leaves partly covered pages cached
                    start, end = off - off % PAGE, -(-(off + row_bytes) // PAGE) * PAGE
                    drop_file_cache(fd, start, end - start)
        finally:
            os.close(fd)
        if "embed" in parts:
            rows = parts["embed"].to(self.dtype)                                       # (U, H)
        else:  # a GGUF group form
            group = GroupWeight({n[len("embed."):]: t for n, t in parts.items()} | self.whole)
            rows = group.dequantize_rows(0, len(unique), self.dtype)                   # (U, H)
        hidden = rows[inverse].view(*ids.shape, rows.shape[1])                       # (B, T, H)
        return hidden if self.scale is None else hidden * torch.tensor(self.scale, dtype=self.dtype)
