"""Execute: run the templates over a plan in one program (leaves, then a scan per phase)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._planner import PlanKey


class Edges(NamedTuple):
    """The child slots of one step, for ``children.map``: ``[E]`` leading axes."""

    outputs: Any  # the children's outputs (a pytree like the function's output)
    segment: jax.Array  # int32, the row owning each slot; the step width for padding


def apply_template(template, signature, dynamic, data, children, num_rows: int):
    """Evaluates one signature's template on ``num_rows`` rows.

    ``data`` and, for a fixed arity, ``children`` (a tuple of output pytrees) have a
    leading row axis; for ``"map"`` the children are the step's ``Edges`` (no row axis).
    The row index is always mapped, so this works for forests without data.
    """
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    if signature == "map":
        return jax.vmap(lambda d, r: template(dynamic, d, (children, r)))(data, rows)
    return jax.vmap(lambda d, c, r: template(dynamic, d, c))(data, children, rows)


def execute(templates: dict, dynamic, arrays: dict, key: PlanKey, out_spec) -> Any:
    """Computes every node's output; returns a pytree of ``[key.num_node_rows, ...]`` arrays.

    Equivalent program::

      buffer[leaf rows] = vmap(templates[0])(data[leaf nodes])
      for each phase, for each step t (a lax.scan):
        rows = the step's block of `width` rows
        buffer[rows] = vmap(template)(data[nodes of rows], buffer[children of rows])
      return buffer[row_of_node]

    Args:
      templates: ``{0: leaf, k: k-ary, ...}`` or ``{0: leaf, "map": any arity}``.
      dynamic: the traced non-node arguments.
      arrays: the Forest's arrays (padded data and the plan tables).
      key: the plan's static sizes.
      out_spec: the output structure (ShapeDtypeStructs of one node's output).
    """
    data = arrays["data"]
    take = lambda tree, idx: jax.tree.map(lambda a: a[idx], tree)  # noqa: E731

    leaf_out = apply_template(
        templates[0], 0, dynamic, take(data, arrays["leaf_node"]), None, key.num_leaf_rows
    )
    buffer = jax.tree.map(
        lambda o, s: jnp.zeros((key.num_buffer_rows,) + s.shape, s.dtype)
        .at[: key.num_leaf_rows]
        .set(o.astype(s.dtype)),
        leaf_out,
        out_spec,
    )

    base = key.num_leaf_rows
    for phase, tables in zip(key.phases, arrays["phases"]):
        step_data = take(data, tables["node"])  # [S, K, ...], gathered once, outside the loop
        xs = (
            step_data,
            tables["degree"],
            tables["edge_start"],
            tables["edge_child"],
            tables["edge_segment"],
            jnp.arange(phase.steps, dtype=jnp.int32),
        )

        def step(buffer, x, base=base, width=phase.width):
            data_t, degree, start, edge_child, segment, t = x
            out = _compute_rows(templates, dynamic, buffer, data_t, degree, start, edge_child, segment)
            first = base + t * width
            buffer = jax.tree.map(lambda b, o: _write_rows(b, o.astype(b.dtype), first), buffer, out)
            return buffer, None

        buffer, _ = lax.scan(step, buffer, xs)
        base += phase.steps * phase.width

    return take(buffer, arrays["row_of_node"])


@jax.custom_jvp
def _write_rows(buffer, rows, first):
    """``buffer[first:first + len(rows)] = rows``: a contiguous, in-place write.

    The plan writes every row exactly once, into rows that still hold the buffer's
    initial zeros, so the write equals an add, and so does its tangent. The custom JVP
    states the tangent as that add: its transpose (reverse mode) passes the cotangent
    buffer through and gathers the rows' cotangents. The transpose of the plain write
    would also zero those rows, and XLA:CPU then copies the whole cotangent buffer at
    every backward step, because it cannot order the rows' read before their zeroing.
    """
    return lax.dynamic_update_slice_in_dim(buffer, rows, first, 0)


@_write_rows.defjvp
def _write_rows_jvp(primals, tangents):
    buffer, rows, first = primals
    t_buffer, t_rows, _ = tangents
    index = first + jnp.arange(rows.shape[0], dtype=jnp.int32)
    t_out = t_buffer.at[index].add(t_rows, indices_are_sorted=True, unique_indices=True)
    return _write_rows(buffer, rows, first), t_out


def _compute_rows(templates, dynamic, buffer, data, degree, start, edge_child, segment):
    """Outputs of one step's ``K`` rows (internal nodes and padding)."""
    if "map" in templates:
        edges = Edges(jax.tree.map(lambda b: b[edge_child], buffer), segment)
        return apply_template(templates["map"], "map", dynamic, data, edges, degree.shape[0])
    out = None
    num_edges = edge_child.shape[0]
    for k, template in sorted((k, t) for k, t in templates.items() if k != 0):
        j = jnp.arange(k)[None, :]
        slot = jnp.minimum(start[:, None] + j, num_edges - 1)
        # Rows of another arity run this template too (their result is discarded): their
        # missing children read the row's own first child, so nothing crosses between
        # trees, even as a zero cotangent times a NaN. Padding rows read row 0.
        own_first = edge_child[start][:, None]
        rows = jnp.where(j < degree[:, None], edge_child[slot], own_first)
        children = tuple(jax.tree.map(lambda b: b[rows[:, i]], buffer) for i in range(k))
        out_k = apply_template(template, k, dynamic, data, children, degree.shape[0])
        if out is None:
            out = out_k
        else:
            pick = degree == k
            out = jax.tree.map(
                lambda a, b: jnp.where(pick.reshape(pick.shape + (1,) * (a.ndim - 1)), a, b),
                out_k,
                out,
            )
    return out
