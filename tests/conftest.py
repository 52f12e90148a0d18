"""Strict settings for every test: rank promotion raises, warnings are errors (pyproject)."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
