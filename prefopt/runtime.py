"""Process-wide allocator settings that make CPU training faster or leaner without changing any number."""
from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Let glibc's malloc reuse freed blocks instead of handing them back to the kernel.

    A training step allocates and frees the same large tensors over and over (activations,
    an embedding-sized gradient per row, LM-head chunks). By default glibc serves blocks of a
    few MiB and up with ``mmap`` and unmaps them on ``free``, so every step faults the same
    memory in again and the kernel zeroes each page first (alone, a fresh 8192 x 512 float32
    zero-fill takes ~3.5 ms here, a reused one ~0.3 ms). Serving blocks below
    ``mmap_threshold`` from the heap, and trimming its top only when ``trim_threshold`` bytes
    are free there, keeps that memory mapped. Measured on the benchmark's 200 pairs
    (``docs/benchmarks.md``): system time roughly halved, wall time and peak RSS unchanged
    within the machine's noise.

    Skipped (returns False) off glibc, or when the user set malloc's own knobs
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``) or
    ``PREFOPT_MALLOC=system``.
    """
    if sys.platform != "linux" or os.environ.get("PREFOPT_MALLOC", "").lower() == "system":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or \
            "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def malloc_for_blas_buffers() -> bool:
    """Have MKL take its BLAS work buffers from malloc instead of a pool of its own.

    MKL's "fast memory manager" keeps every buffer it has used (matrix-product packing space,
    per thread) for reuse, outside anything glibc can hand to tensors. With it off
    (``MKL_DISABLE_FAST_MM=1``, read when MKL first allocates) the buffers go back to malloc,
    which reuses the space. Measured on the benchmark's 48 pairs (``docs/benchmarks.md``):
    peak RSS 12-25 MiB lower, step time unchanged within noise. Does nothing (returns False)
    when the variable is already set or ``PREFOPT_MALLOC=system``; off x86 there is no MKL
    and the variable is ignored.
    """
    if "MKL_DISABLE_FAST_MM" in os.environ or os.environ.get("PREFOPT_MALLOC", "").lower() == "system":
        return False
    os.environ["MKL_DISABLE_FAST_MM"] = "1"
    return True


# Entries oneDNN (and ideep, PyTorch's wrapper of it) keep of compiled matrix-product kernels.
KERNEL_CACHE_ENTRIES = 64


def bounded_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> bool:
    """Keep at most ``entries`` compiled oneDNN kernels instead of 1,024 (in each of its two caches).

    Low-precision matrix products on the CPU go through oneDNN, which compiles a kernel for every
    new shape and caches it with its work space: ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` and ideep's
    ``LRU_CACHE_CAPACITY``, 1,024 entries each by default. Packed rows differ in length, so nearly
    every row brings new shapes and the caches only grow, by about 1 MiB per entry: bfloat16 training
    of a 4-layer, hidden-256 model on 16 pairs went from 168 to 533 MiB of RSS above the float32 run's
    plateau (191 MiB) before it levelled off. A row reuses its shapes across layers, never across rows,
    so 64 entries keep every reuse: measured (24 steps, hidden 512, bfloat16) 742 MiB instead of
    993 MiB at the same wall time; with no cache at all the same run is ~45 % slower. float32
    products use MKL and are not affected. Does nothing (returns False) when either variable is set or
    ``PREFOPT_MALLOC=system``.
    """
    names = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    if any(n in os.environ for n in names) or os.environ.get("PREFOPT_MALLOC", "").lower() == "system":
        return False
    for n in names:
        os.environ[n] = str(entries)
    return True


def gpu_present() -> bool:
    """Whether this process may train on a GPU, decided before torch is imported (importing it to ask
    costs a second, and the allocator settings must come first): a CUDA or ROCm device node that is
    not hidden by ``CUDA_VISIBLE_DEVICES=""`` or ``ACCELERATE_USE_CPU``. The tunings above are
    measured on CPU training; on a GPU the host allocator is not where the run's memory goes."""
    import glob

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def cpu_tunings() -> list[str]:
    """Apply the CPU-only allocator settings when no GPU is present; returns the ones applied."""
    if gpu_present():
        return []
    applied = []
    if keep_freed_memory():
        applied.append("malloc keeps freed blocks")
    if malloc_for_blas_buffers():
        applied.append("MKL_DISABLE_FAST_MM=1")
    if bounded_kernel_caches():
        applied.append(f"oneDNN kernel caches of {KERNEL_CACHE_ENTRIES}")
    return applied
