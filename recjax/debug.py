"""Tools for looking inside recjax: the traced templates and the plan of a forest.

No stability guarantee: what these functions print and draw may change in any release,
and they may read recjax's private structures. Use them to understand or debug a
program, never to feed other code.

- ``print_templates(fn, *args)``: the jaxpr of every template the tracer builds for a
  ``@recursive`` function on these arguments (the leaf, one per arity, or ``"map"``).
- ``plan_summary(forest)``: levels, phases, widths, steps and padding of a forest's plan.
- ``draw_plan(forest)``: a picture of the plan's steps (needs matplotlib, imported only
  when called; recjax does not depend on it).

Example:
  >>> import recjax as rj
  >>> from recjax import debug
  >>> forest = rj.Forest.from_parents([-1, 0, 0, 2, 2])
  >>> print(debug.plan_summary(forest))  # doctest: +NORMALIZE_WHITESPACE, +ELLIPSIS
  Forest(num_nodes=5, num_roots=1, steps=2): 5 nodes (3 leaves, 2 internal), height 2
  part     levels  width  steps  rows  nodes  padding
  leaves   0           -      -     3      3     0.0%
  phase 1  1-2         8      2    16      2    87.5%
  total    0-2                2    19      5    73.7%
  2 sequential steps after the leaves; 6 node rows (bucket); edge slots per step: ...
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._executor import Edges
from ._forest import Forest
from ._tracer import Recursive, _is_array, _replace, _Runtime, _show
from ._tracer import _describe as _tracer_describe

__all__ = ["draw_plan", "plan_summary", "print_templates"]


# ---------------------------------------------------------------------- templates


def _describe(signature) -> str:
    if isinstance(signature, tuple):
        return f"{_tracer_describe(signature)} (signature {signature})"
    if signature == 0:
        return "leaf (signature 0)"
    if signature == "map":
        return 'internal node of any arity (signature "map", node.children.map)'
    noun = "child" if signature == 1 else "children"
    return f"internal node with {signature} {noun} (signature {signature})"


def _arg_names(fn: Recursive, args: tuple, kwargs: dict) -> tuple[list, dict]:
    """Display names of the arguments: parameter names for positional ones, keys for keywords."""
    try:
        params = list(inspect.signature(fn.fn).parameters.values())
    except (TypeError, ValueError):  # builtins, odd callables
        params = []
    names = []
    for i in range(len(args)):
        p = params[i] if i < len(params) else None
        usable = p is not None and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        names.append(p.name if usable else f"args[{i}]")
    return names, {k: k for k in kwargs}


def _leaf_names(prefix: str, tree: Any) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [prefix + jax.tree_util.keystr(path) for path, _ in flat]


def _prepare(fn: Recursive, args: tuple, kwargs: dict):
    """What ``fn.batch(*args, **kwargs)`` computes before it executes (mirrors ``batch``)."""
    if not isinstance(fn, Recursive):
        raise TypeError(
            f"print_templates takes a @recjax.recursive function; got a {type(fn).__name__}. "
            "Decorate the function with @rj.recursive first."
        )
    prepared = fn._prepare(args, kwargs)
    # Names of the traced inputs, in the order the templates take them.
    names, kw_names = _arg_names(fn, args, kwargs)
    named = _replace(tuple(names), kw_names, prepared.pos, None)
    flat_rest, _ = jax.tree_util.tree_flatten_with_path(prepared.rest)
    dyn_names = []
    for path, leaf in flat_rest:
        if _is_array(leaf):
            head, *tail = path  # (args or kwargs, position or key, ...)
            first, *more = tail
            key = first.idx if hasattr(first, "idx") else first.key
            base = named[0][key] if head.idx == 0 else named[1][key]
            dyn_names.append(base + jax.tree_util.keystr(tuple(more)))
    return prepared, dyn_names


def print_templates(fn: Recursive, *args: Any, **kwargs: Any) -> None:
    """Prints the jaxpr of every template ``fn.batch(*args, **kwargs)`` would run.

    The tracer turns ``fn`` (and every recursive function it calls) into one pure
    function per node signature: ``0`` for a leaf, ``k`` for ``k`` children when the
    code iterates, indexes or measures ``node.children``, ``"map"`` for every internal
    node when it uses ``node.children.map``; a top-down function has ``(is_root,
    is_leaf)`` signatures. A template reads its own row's data and context (its
    buffer ``row``, children's or parent's rows) and the functions' output buffers.
    This prints, for each function and signature, the jaxpr for one node
    (``jax.make_jaxpr``), preceded by the names of its inputs in order. The executor
    runs each template ``vmap``-ed over the rows of a step. A ``"map"`` template is
    shown for a node that owns every edge slot (as many as the forest's largest arity);
    batched, its ``custom_vmap_call`` becomes segment reductions over a step's edges.

    Nothing is compiled or executed; ``fn``'s public behaviour is unchanged.

    Args:
      fn: a ``@recjax.recursive`` function.
      *args, **kwargs: the arguments of ``fn.batch``, with one ``rj.Forest``.

    Raises:
      TypeError, ValueError: what ``fn.batch`` raises for these arguments.

    Example:
      >>> import jax.numpy as jnp
      >>> import recjax as rj
      >>> @rj.recursive
      ... def total(w, node):
      ...     return w * node.data + node.children.map(lambda c: total(w, c)).sum()
      >>> forest = rj.Forest.from_trees([rj.Tree(1.0, [rj.Tree(2.0), rj.Tree(3.0)])])
      >>> print_templates(total, jnp.float32(2.0), forest)  # doctest: +ELLIPSIS
      total over Forest(num_nodes=3, num_roots=1, steps=1): 2 templates; every node returns float32[]
      == leaf (signature 0)
      inputs: w float32[], total's outputs float32[10], node.data float32[], row int32[]
      { lambda ; a:f32[] b:f32[10] c:f32[] d:i32[]. let
          e:f32[] = mul a c
      ...
      == internal node of any arity (signature "map", node.children.map)
      inputs: w float32[], total's outputs float32[10], node.data float32[], row int32[], edges.rows int32[2], edges.segment int32[2], edges.position int32[2]
      ...custom_vmap_call...
    """
    prepared, dyn_names = _prepare(fn, args, kwargs)
    forest, program, dynamic = prepared.forest, prepared.program, prepared.dynamic
    data = jax.tree.map(lambda a: np.asarray(a[0]), forest._arrays["data"])
    num_rows = program.key.num_buffer_rows
    env = {
        i: jax.tree.map(lambda s: np.zeros((num_rows,) + s.shape, s.dtype), f.spec)
        for i, f in enumerate(program.fns)
    }
    total = sum(len(f.signatures) for f in program.fns)
    plural = "s" if total > 1 else ""
    several = len(program.fns) > 1
    if several:
        passes = "; ".join(
            f"{d}: " + ", ".join(program.fns[i].rec._name for i in fids) for d, fids in program.passes
        )
        print(
            f"{fn._name} over {forest!r}: {len(program.fns)} functions in "
            f"{len(program.passes)} pass{'es' if len(program.passes) > 1 else ''} ({passes}), "
            f"{total} template{plural}; {fn._name} returns {_show(prepared.out_spec)}"
        )
    else:
        print(
            f"{fn._name} over {forest!r}: {total} template{plural}; "
            f"every node returns {_show(prepared.out_spec)}"
        )

    def shown(name, x):
        return f"{name} {_show(jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype))}"

    inputs = [f"{n} {_show(jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)))}"
              for n, x in zip(dyn_names, dynamic)]
    data_shown = [shown(n, x) for n, x in zip(_leaf_names("node.data", data), jax.tree.leaves(data))]
    env_names = []
    for i, f in enumerate(program.fns):
        env_names += _leaf_names(f"{f.rec._name}'s outputs", env[i])
    runtime = _Runtime(program)
    degree = np.diff(forest.child_ptr) if forest.child_ptr is not None else np.ones(1)
    num_edges = max(int(degree.max()), 1)
    for fid, f in enumerate(program.fns):
        for signature in f.signatures:
            ctx = {"row": np.int32(0)}
            if isinstance(signature, tuple) or program.uses_rows:
                ctx.update(parent=np.int32(0), index=np.int32(0))
            if isinstance(signature, int) and signature > 0:
                ctx["children"] = np.zeros(signature, np.int32)
            edges = None
            if signature == "map":
                slots = np.zeros(num_edges, np.int32)
                edges = Edges(slots, slots, slots)
            # the order jax flattens a dict in: sorted keys
            ctx_names = [
                shown({"children": "children's rows"}.get(k, k), ctx[k]) for k in sorted(ctx)
            ]
            edge_names = (
                [shown(f"edges.{k}", v) for k, v in edges._asdict().items()] if edges else []
            )
            env_shown = [shown(n, x) for n, x in zip(env_names, jax.tree.leaves(env))]
            template = program.template(fid, signature, runtime)
            jaxpr = jax.make_jaxpr(template)(list(dynamic), env, data, ctx, edges)
            title = _describe(signature)
            print(f"== {f.rec._name}: {title}" if several else f"== {title}")
            # the order of the template's arguments: (dynamic, env, data, ctx, edges)
            print("inputs: " + ", ".join(inputs + env_shown + data_shown + ctx_names + edge_names))
            print(jaxpr)


# ---------------------------------------------------------------------- the plan


def _plan_parts(forest: Forest):
    """Per part of the plan: (name, levels, width, steps, rows, real nodes, grid of real rows)."""
    plan = forest.plan
    key = plan.key
    height = np.asarray(plan.height)
    num_leaves = int(np.count_nonzero(height == 0))
    leaf_real = np.arange(key.num_leaf_rows) < num_leaves
    parts = [("leaves", (0, 0), None, None, key.num_leaf_rows, num_leaves, leaf_real)]
    for i, (pk, tables) in enumerate(zip(key.phases, plan.phases), 1):
        rows = key.num_leaf_rows + sum(q.steps * q.width for q in key.phases[: i - 1])
        block = rows + np.arange(pk.steps * pk.width).reshape(pk.steps, pk.width)
        real = np.asarray(plan.row_of_node)[np.asarray(tables.node)] == block  # [steps, width]
        nodes = np.asarray(tables.node)[real]
        levels = (int(height[nodes].min()), int(height[nodes].max())) if nodes.size else None
        parts.append((f"phase {i}", levels, pk.width, pk.steps, pk.width * pk.steps,
                      int(real.sum()), real))
    return parts


def _levels(levels) -> str:
    if levels is None:
        return "-"
    low, high = levels
    return str(low) if low == high else f"{low}-{high}"


def _pct(rows: int, nodes: int) -> str:
    return f"{100.0 * (rows - nodes) / rows:.1f}%" if rows else "-"


def plan_summary(forest: Forest) -> str:
    """A table of a forest's plan: levels, phases, widths, steps, rows and padding.

    The executor computes every leaf in one batched op (``leaves``), then runs one
    ``lax.scan`` per phase: ``steps`` steps of ``width`` rows each, levels in increasing
    height. ``rows`` is what is computed, ``nodes`` how many of those rows are real
    nodes; ``padding`` is the share of computed rows that are padding (bucketed step
    counts and partly filled steps). Host only, not jittable.

    Args:
      forest: a Forest built on the host (``from_trees``, ``from_parents``, ...).

    Returns:
      The table as a string (print it).

    Example:
      >>> import recjax as rj
      >>> chain = rj.Forest.from_parents([-1, 0, 1, 2, 3, 4])
      >>> print(plan_summary(chain))  # doctest: +NORMALIZE_WHITESPACE, +ELLIPSIS
      Forest(num_nodes=6, num_roots=1, steps=5): 6 nodes (1 leaves, 5 internal), height 5
      part     levels  width  steps  rows  nodes  padding
      leaves   0           -      -     1      1     0.0%
      phase 1  1-5         8      5    40      5    87.5%
      total    0-5                5    41      6    85.4%
      5 sequential steps after the leaves; 6 node rows (bucket); edge slots per step: ...
    """
    plan = forest.plan
    key = plan.key
    height = np.asarray(plan.height)
    n = height.size
    num_leaves = int(np.count_nonzero(height == 0))
    head = f"{forest!r}: {n} nodes ({num_leaves} leaves, {n - num_leaves} internal)"
    lines = [f"{head}, height {int(height.max())}"]
    if forest.num_nodes > n:
        lines[0] += f"; {forest.num_nodes - n} padding nodes (padded)"
    rows = [("part", "levels", "width", "steps", "rows", "nodes", "padding")]
    for name, levels, width, steps, nrows, nodes, _ in _plan_parts(forest):
        width_s = "-" if width is None else str(width)
        steps_s = "-" if steps is None else str(steps)
        rows.append((name, _levels(levels), width_s, steps_s, str(nrows), str(nodes),
                     _pct(nrows, nodes)))
    total_rows = key.num_buffer_rows
    rows.append(("total", _levels((0, int(height.max()))), "", str(plan.num_steps),
                 str(total_rows), str(n), _pct(total_rows, n)))
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
    edges = ", ".join(str(p.edges) for p in key.phases) or "-"
    lines.append(f"{plan.num_steps} sequential steps after the leaves; {key.num_node_rows} node "
                 f"rows (bucket); edge slots per step: {edges}")
    return "\n".join(lines)


def draw_plan(forest: Forest, ax: Any = None) -> Any:
    """Draws a forest's plan: one column per step, one bar segment per run of rows.

    Column ``leaves`` is the batched leaf op; then one column per scan step, phase after
    phase (dashed lines mark the phase boundaries, labelled with their width). The y axis
    is the row within the step, colored by real node or padding; it is linear up to 8
    rows and logarithmic above when the widths differ a lot, so that narrow steps stay
    visible next to a wide leaf op. Imports matplotlib (not a dependency of recjax:
    ``pip install matplotlib``).

    Args:
      forest: a Forest built on the host.
      ax: a matplotlib ``Axes`` to draw on; a new figure's when ``None``.

    Returns:
      The ``Axes``.
    """
    import matplotlib.pyplot as plt  # lazily: recjax does not depend on matplotlib
    from matplotlib.patches import Patch

    parts = _plan_parts(forest)
    columns = [parts[0][6]]  # per column: bool [rows], True for a real node
    bounds = []
    for _, _, width, nsteps, _, _, real in parts[1:]:
        bounds.append((len(columns), len(columns) + nsteps, width))
        columns.extend(real)
    steps = len(columns) - 1
    if ax is None:
        _, ax = plt.subplots(figsize=(min(3 + 0.3 * len(columns), 14), 4))
    colors = {True: "tab:blue", False: "lightgray"}
    for x, real in enumerate(columns):
        # Runs of equal values along the rows: one bar segment each.
        change = np.flatnonzero(np.diff(real.astype(np.int8))) + 1
        starts = np.r_[0, change]
        stops = np.r_[change, real.size]
        ax.bar(np.full(starts.size, x), stops - starts, bottom=starts, width=0.85,
               color=[colors[bool(real[s])] for s in starts], linewidth=0)
    tallest = max(c.size for c in columns)
    narrowest = min(c.size for c in columns)
    if tallest > 8 * narrowest:
        ax.set_yscale("symlog", linthresh=8, linscale=0.5)
        ticks = [t for t in (0, 8, 32, 128, 512, 2048, 8192, 32768, 131072) if t <= tallest]
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    ax.set_ylim(0, tallest * (1.6 if tallest > 8 * narrowest else 1.15))
    ax.axvline(0.5, color="black", linewidth=1)
    for start, stop, width in bounds:
        if stop < len(columns):
            ax.axvline(stop - 0.5, color="black", linestyle="--", linewidth=1)
        ax.text((start + stop - 1) / 2, width, f"width {width}", ha="center", va="bottom",
                fontsize=8)
    every = max(1, -(-steps // 16))
    ticks = [0] + list(range(every, steps + 1, every))
    ax.set_xticks(ticks)
    ax.set_xticklabels(["leaves"] + [str(t) for t in ticks[1:]])
    ax.set_xlim(-0.6, steps + 0.6)
    ax.set_xlabel("scan step (after the batched leaf op)")
    ax.set_ylabel("row within the step")
    n = forest.plan.height.size
    rows = forest.plan.key.num_buffer_rows
    ax.set_title(f"{n} nodes, {rows} rows ({_pct(rows, n)} padding), {steps} steps")
    handles = [Patch(color="tab:blue", label="node"), Patch(color="lightgray", label="padding")]
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    return ax
