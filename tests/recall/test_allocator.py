import platform
import subprocess
import sys

import pytest

from funnel.recall import allocator

# In a fresh process: a 16 MiB block is mmapped by glibc's default; inside steady_steps()
# it comes from the heap, and 192 MiB of such blocks freed stay there for reuse; on
# leaving, the kept memory goes back to the kernel.
PROBE = """
import ctypes
from funnel.recall.allocator import steady_steps

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
MiB = 1 << 20

def mmapped_while_holding(size):
    block = libc.malloc(size)
    held = libc.mallinfo2().hblks
    libc.free(block)
    return held - libc.mallinfo2().hblks

def free_kept_after(blocks, size):
    held = [libc.malloc(size) for _ in range(blocks)]
    for block in held:
        libc.free(block)
    return libc.mallinfo2().fordblks // MiB

before = mmapped_while_holding(16 * MiB)
with steady_steps() as applied:
    inside = mmapped_while_holding(16 * MiB)
    kept = free_kept_after(12, 16 * MiB)
left = libc.mallinfo2().fordblks // MiB
print(before, applied, inside, kept >= 192, left < 64)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_steps_buffers_are_kept_inside_and_released_after():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "True", "0", "True", "True"]


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    with allocator.steady_steps() as applied:
        assert applied is False
