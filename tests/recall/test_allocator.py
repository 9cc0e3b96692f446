import platform
import subprocess
import sys

import pytest

from funnel.recall import allocator

# In a fresh process: is a 16 MiB block served by mmap (glibc's default for such sizes)
# before keep_freed_memory(), and from the heap, where it is reused, after it?
PROBE = """
import ctypes
from funnel.recall.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2

def mmapped_blocks_while_holding(size):
    block = libc.malloc(size)
    blocks = libc.mallinfo2().hblks
    libc.free(block)
    return blocks

size = 16 << 20
before = mmapped_blocks_while_holding(size) - libc.mallinfo2().hblks
applied = keep_freed_memory()
after = mmapped_blocks_while_holding(size) - libc.mallinfo2().hblks
print(before, applied, after)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_blocks_of_a_step_come_from_the_heap_after_the_call():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "True", "0"]


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False
