"""align.memory: freed heap memory goes back to the OS between phases (glibc)."""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch
    from align.memory import release_freed_memory

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024

    blocks = [torch.ones(16384) for _ in range(4000)]  # 64 KiB each: under malloc's mmap threshold, on the heap
    pins = [torch.ones(4) for _ in range(400)]         # live blocks above them: the heap cannot shrink at its top
    del blocks
    held = rss_mib()
    released = release_freed_memory()
    print(held, rss_mib(), released)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_release_freed_memory_returns_a_fragmented_heap():
    # a fresh interpreter: its heap holds only what this script allocates
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    held, after, released = out.split()
    assert released == "True"
    assert float(held) - float(after) > 150, f"RSS {held} MiB -> {after} MiB: the freed 250 MiB stayed resident"
