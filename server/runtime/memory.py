"""Handing the heap memory a model load freed back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    library = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(library).malloc_trim if library else None
    except (OSError, AttributeError):  # a libc without malloc_trim (musl, macOS)
        return None


def release_freed_memory() -> None:
    """glibc keeps what a load frees (the parse of tokenizer.json, the graph's protobuf and the
    weights ONNX Runtime prepacks anew) in the process's heap, so the RSS stays at the load's peak
    and the next load stacks on top of it; malloc_trim returns it (docs/int8.md has the figures).
    A no-op where libc has no malloc_trim."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
