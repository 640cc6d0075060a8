"""host.fix_mmap_threshold: a freed tensor's pages go back to the OS even after glibc has seen
larger blocks freed (which, left alone, makes it serve tensors of up to 32 MiB from the heap
and keep their pages). Each case runs in a fresh process: the allocator's state is per process."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

MiB = 1 << 20
CASE = """
import json, sys, torch
from tpi.host import fix_mmap_threshold, rss_bytes
if sys.argv[1] == "fixed":
    fix_mmap_threshold()
big = torch.ones(24 << 20, dtype=torch.uint8)     # 24 MiB, mapped apart; freeing it raises glibc's threshold
del big
before = rss_bytes()
t = torch.ones(8 << 20, dtype=torch.uint8)        # 8 MiB: from the heap unless the threshold is fixed
pins = [torch.ones(4096, dtype=torch.uint8) for _ in range(64)]   # small blocks above it on the heap
del t
print(json.dumps({"kept": rss_bytes() - before}))
"""


def kept_after_free(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CASE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["kept"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_freed_tensor_pages_go_back_with_a_fixed_threshold():
    assert kept_after_free("default") >= 6 * MiB   # glibc alone: the 8 MiB stay resident
    assert kept_after_free("fixed") < 2 * MiB      # fixed: unmapped when freed
