"""regionmed_clip.training_scripts.heap: glibc's mmap threshold fixed, so large freed blocks are unmapped, not kept."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from regionmed_clip.training_scripts.heap import _glibc, fix_mmap_threshold

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: free an 8 MiB block (mapped), then say whether a 2 MiB block is mapped (the
# IS_MMAPPED bit of glibc's chunk header, the word before the pointer).
PROBE = """
import ctypes, sys
sys.path.insert(0, {root!r})
from regionmed_clip.training_scripts.heap import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(8 << 20))
block = libc.malloc(2 << 20)
print(bool(ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value & 2))
"""

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc only")


@pytest.mark.parametrize("fixed", [False, True], ids=["glibc default", "fixed threshold"])
def test_a_large_block_is_mapped_after_a_larger_one_was_freed_only_with_the_fixed_threshold(fixed):
    # glibc's default raises the threshold to 8 MiB on the free, so the 2 MiB block comes from the
    # heap (whose freed pages a long run keeps); fixed at 1 MiB, it is mapped and unmapped on free.
    result = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), "fixed" if fixed else "default"],
                            capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    assert result.stdout.strip() == str(fixed)


def test_a_threshold_the_user_set_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False


def test_the_onednn_cache_cap_is_set_unless_the_user_set_one(monkeypatch):
    from regionmed_clip.training_scripts.heap import ONEDNN_PRIMITIVE_CACHE_CAPACITY, limit_onednn_primitive_cache

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert limit_onednn_primitive_cache() is True
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_PRIMITIVE_CACHE_CAPACITY)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    assert limit_onednn_primitive_cache() is False
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
