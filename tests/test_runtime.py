"""Process settings of the entry points (gsavatar.runtime)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_PAGE_FAULTS = """
import resource, sys, torch
from gsavatar.runtime import keep_freed_memory

def faults():  # minor page faults while a 4 MiB buffer is allocated, touched and freed 20 times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(1 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
keep_freed_memory()
faults()  # the first allocation after the change still takes fresh pages
print(default, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the page-fault check is for glibc's allocator")
def test_keep_freed_memory_reuses_a_frames_buffers():
    # A 4 MiB buffer is 1024 pages: with glibc's defaults most of the 20 allocations take fresh
    # pages (mapped, or the heap top trimmed and grown again); kept in the heap, the buffer is
    # reused with no fault at all. The bounds leave room for the interpreter's own allocations.
    out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True, check=True)
    default, kept = map(int, out.stdout.split())
    assert default > 4 * 1024
    assert kept < 1024
