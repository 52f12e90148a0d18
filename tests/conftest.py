"""Strict settings for every test: rank promotion raises, warnings are errors (pyproject).

The README runs the tests with ``-n auto`` (pytest-xdist): most of a test's time is XLA
compilation and eager dispatch, both single-threaded, so two workers on two cores take
about 0.6 of the serial time. ``auto`` is capped at four workers: each holds its own JAX
runtime and compilation caches, and more than four only adds memory.
"""

import os

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker a core, at most four (PYTEST_XDIST_AUTO_NUM_WORKERS overrides)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
