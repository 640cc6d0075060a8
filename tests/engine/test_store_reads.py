"""Reading block files into buffers: O_DIRECT where the file system takes it, buffered reads
(page cache dropped) where it does not; the bytes are the file's either way."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tpi.weights.store import DIRECT_ALIGN, StoreError, aligned_bytes, aligned_empty, read_into

SIZES = [1, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1, (33 << 20) + 7]  # around pages and DIRECT_CHUNK


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_aligned_buffers_start_and_end_on_pages():
    for n in (1, 4095, 4096, 4097, 10**6):
        buf = aligned_empty(n)
        assert buf.dtype == torch.uint8 and buf.numel() == aligned_bytes(n) >= n
        assert buf.data_ptr() % DIRECT_ALIGN == 0 and buf.numel() % DIRECT_ALIGN == 0


@pytest.mark.parametrize("size", SIZES)
def test_direct_read_gives_the_file_bytes(tmp_path, size):
    data = write_random(tmp_path / "block.bin", size)
    buf = aligned_empty(size)
    n, st = read_into(tmp_path / "block.bin", buf)
    assert n == size == st.st_size
    assert bytes(buf[:n].numpy()) == data


def test_file_system_refusing_o_direct_falls_back_to_buffered_reads(tmp_path, monkeypatch):
    """Some file systems refuse O_DIRECT with EINVAL at open (tmpfs did before Linux 6.6):
    injected here, since this machine's file systems all take it."""
    import errno

    data = write_random(tmp_path / "block.bin", 3 * DIRECT_ALIGN + 5)
    real_open, refused = os.open, []

    def open_refusing_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_refusing_direct)
    buf = aligned_empty(len(data))
    n, _ = read_into(tmp_path / "block.bin", buf)
    assert refused and bytes(buf[:n].numpy()) == data


def test_file_system_refusing_aligned_reads_falls_back_on_the_same_descriptor(tmp_path, monkeypatch):
    """Others take O_DIRECT at open and refuse the read: the descriptor is switched to buffered."""
    import errno
    import fcntl

    data = write_random(tmp_path / "block.bin", 2 * DIRECT_ALIGN + 9)
    real_preadv, refused = os.preadv, []

    def preadv_refusing_direct(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv_refusing_direct)
    buf = aligned_empty(len(data))
    n, _ = read_into(tmp_path / "block.bin", buf)
    assert refused and bytes(buf[:n].numpy()) == data


def test_unaligned_buffer_reads_buffered(tmp_path):
    data = write_random(tmp_path / "block.bin", 10_001)
    buf = torch.empty(10_001 + 1, dtype=torch.uint8)[1:]  # odd address: O_DIRECT cannot use it
    n, _ = read_into(tmp_path / "block.bin", buf)
    assert bytes(buf[:n].numpy()) == data


def test_file_bigger_than_its_buffer_is_a_clear_error(tmp_path):
    write_random(tmp_path / "block.bin", 3 * DIRECT_ALIGN)
    with pytest.raises(StoreError, match="more than the"):
        read_into(tmp_path / "block.bin", aligned_empty(2 * DIRECT_ALIGN))
    with pytest.raises(FileNotFoundError):
        read_into(tmp_path / "missing.bin", aligned_empty(DIRECT_ALIGN))
