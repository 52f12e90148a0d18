"""Timing helpers shared by the benchmark suite and the standalone scripts.

Every timed call ends in ``jax.block_until_ready`` so that asynchronous dispatch cannot
make a call look faster than it is; medians, not means, so that a disturbed sample on a
shared machine moves the result less.
"""

from __future__ import annotations

import os
import statistics
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn):
    """Seconds taken by ``fn()`` including device completion, and its result."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def median_seconds(fn, repeats, warmup=1):
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def compile_aot(jitted, *args):
    """Trace, lower and compile ``jitted`` ahead of time, each step timed on its own.

    Returns ``(compiled, seconds)`` where ``seconds`` has ``trace``, ``lower``,
    ``compile`` and ``first_call`` (the compiled executable's first call on ``args``).
    """
    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    first, _ = timed(lambda: compiled(*args))
    return compiled, {"trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2, "first_call": first}


def matmul_seconds(m, k, n, rng, repeats=20):
    """Median seconds of a jitted float32 ``[m, k] @ [k, n]`` (at least 20 samples)."""
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    mm = jax.jit(jnp.matmul).trace(a, b).lower().compile()
    return median_seconds(lambda: mm(a, b), max(repeats, 20), warmup=3)


def matmul_flops_per_s(k, n, m=1024, seed=0):
    """This machine's attainable float32 matmul rate for a ``[m, k] @ [k, n]`` product."""
    return 2 * m * k * n / matmul_seconds(m, k, n, np.random.default_rng(seed))


def paired_ceiling_fractions(fn, flops, k, n, pairs, m=1024, seed=0, window_s=0.25):
    """``fn``'s share of the matmul ceiling, call by call: one per pair, in call order.

    A pair is one timed call of ``fn`` (which does ``flops`` of matrix products and
    returns when its work is complete) followed at once by a sample of the ceiling: the
    median of as many float32 ``[m, k] @ [k, n]`` calls as fit in about as long as ``fn``
    took, at most ``window_s`` (3 to 64 calls). Each pair's fraction is ``fn``'s FLOP
    rate over the rate of the sample next to it, so a slow spell of the machine (on the
    development VM: steal bursts lasting seconds) slows both sides of a pair alike
    instead of moving the ratio; take the median over the pairs.
    """
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    mm = jax.jit(jnp.matmul).trace(a, b).lower().compile()
    call = lambda: mm(a, b).block_until_ready()
    for _ in range(3):
        call()
    mm_s = timed(call)[0]
    fractions = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        fn()
        fn_s = time.perf_counter() - t0
        reps = int(np.clip(round(min(fn_s, window_s) / mm_s), 3, 64))
        mm_s = statistics.median(timed(call)[0] for _ in range(reps))
        fractions.append((flops / fn_s) / (2 * m * k * n / mm_s))
    return fractions


def cpu_seconds(steal: bool = False):
    """(CPU seconds used by the whole machine, by this process), to see other load.

    Reads /proc/stat (Linux); the machine total is None elsewhere. The machine total
    includes steal time; with ``steal`` a third value is that alone: seconds the virtual
    CPUs were ready to run while the hypervisor ran something else (a noisy host).
    """
    own = sum(os.times()[:2])
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return (None, own, None) if steal else (None, own)
    tick = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields) - fields[3] - fields[4]) / tick  # all but idle and iowait
    if steal:
        return busy, own, (fields[7] / tick if len(fields) > 7 else None)
    return busy, own


def minor_faults():
    """Minor page faults of this process so far (None where ``resource`` is missing).

    A first touch of freshly mapped memory is a minor fault. glibc's malloc maps every
    allocation above 32 MiB afresh (its largest ``mmap`` threshold) and returns it on
    ``free``, so a program whose buffers or temporaries exceed that faults on every page
    of them at every call: ~1.6 us a 4 KiB page on the development VM, 26 ms for a
    64 MiB buffer (see RESULTS.md, "page faults").
    """
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def environment_facts():
    """The process settings that move the suite's numbers: how large allocations get their
    pages (glibc tunables, transparent huge pages, a preloaded allocator: ``LD_PRELOAD``,
    jemalloc's ``MALLOC_CONF``) and ``XLA_FLAGS``, which can choose XLA:CPU's
    matrix-multiply library (see benchmarks/README.md)."""
    thp = "?"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        pass
    return {
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "thp": thp,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "malloc_conf": os.environ.get("MALLOC_CONF", ""),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def fmt_rate(x):
    """A rate for a table: ``812``, ``46.4 k``, ``2.31 M``."""
    if x < 1e4:
        return f"{x:,.0f}"
    return f"{x / 1e3:,.1f} k" if x < 1e6 else f"{x / 1e6:,.2f} M"


def fmt_ratio(x):
    """A ratio for a table: ``0.42x``, ``3.9x``, ``248x``."""
    if x < 1:
        return f"{x:.2f}x"
    return f"{x:.1f}x" if x < 10 else f"{x:,.0f}x"
