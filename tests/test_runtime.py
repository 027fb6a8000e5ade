"""Process settings of the entry points (gsavatar.runtime)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_PAGE_FAULTS = """
import resource, torch
from gsavatar.runtime import keep_freed_memory

def faults():  # minor page faults over 10 'frames' that each hold 16 buffers of 3 MiB, then free them
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        live = [torch.ones(3 << 18) for _ in range(16)]
        del live
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()  # glibc's thresholds settle on the first frame
default = faults()
keep_freed_memory()
faults()  # the first frame after the change still takes fresh pages
print(default, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the page-fault check is for glibc's allocator")
def test_keep_freed_memory_reuses_a_frames_buffers():
    # A frame's 16 buffers of 3 MiB are 12288 pages. glibc's defaults serve them from the heap once
    # its mmap threshold has risen to 3 MiB, but give the 48 MiB back when they are freed (its trim
    # threshold is then twice the mmap threshold, 6 MiB), so every frame faults all its pages in
    # again; kept, they are reused with no fault at all. The bounds leave room for the
    # interpreter's own allocations.
    out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True, check=True)
    default, kept = map(int, out.stdout.split())
    assert default > 5 * 12288
    assert kept < 1024
