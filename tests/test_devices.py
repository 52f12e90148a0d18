"""Several devices: forests padded to one shape, stacked, and split across devices.

The device count of the CPU backend is fixed when JAX starts, so the checks run in a
subprocess with ``--xla_force_host_platform_device_count=4``. Each model's loss (every
node's output, squared) and its gradient are computed four ways on four forests:
``jax.vmap``, ``jax.pmap``, ``jax.shard_map`` (the gradient of a replicated parameter
summed across devices by JAX itself) and ``jax.jit`` of a ``vmap`` over forests sharded
along a mesh axis; each must equal plain recursion over the same trees. The models cover
the executor's branches: segment ops (``children.map``), one template per arity (a
``lax.cond`` per arity), node kinds (a ``lax.switch`` per step), a top-down pass with
leaf and internal templates, and two functions that call each other.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax

SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import recjax as rj
    from models import random_tree, node_subtrees

    assert jax.device_count() == 4
    # jax 0.6's shard_map types per-device values differently (the newest jax for Python
    # 3.10 is 0.6.2): recjax's shard_map support is for jax 0.10, where it is tested.
    SHARD_MAP = jax.__version_info__ >= (0, 10)
    H, KINDS = 3, ["a", "b", "c"]
    rng = np.random.default_rng(0)
    count = iter(range(10**6))

    def data(i):
        return {{"x": rng.normal(size=H).astype(np.float32), "k": np.int32(rng.integers(0, 5))}}

    def kinded(t):
        return rj.Tree(t.data, [kinded(c) for c in t.children], kind=KINDS[next(count) % 3])

    trees = [kinded(random_tree(rng, int(rng.integers(1, 14)), 3, data)) for _ in range(12)]

    @rj.recursive
    def child_sum(p, node):  # segment ops; the gate reads a node-level value
        x = jnp.tanh(node.data["x"] @ p["W"])
        kids = node.children.map(lambda c: jax.nn.sigmoid(x @ p["U"]) * child_sum(p, c))
        return jnp.tanh(x + kids.sum() + 0.5 * kids.max(initial=-1.0))

    @rj.recursive
    def arity(p, node):  # one template per arity, each under a lax.cond
        x = p["E"][node.data["k"]]
        if node.is_leaf:
            return x
        return jnp.tanh(x + sum(arity(p, c) @ p["U"] * (i + 1) for i, c in enumerate(node.children)))

    @rj.recursive
    def by_kind(p, node):  # node kinds: a lax.switch per step
        x = jnp.tanh(node.data["x"] @ p["W"])
        s = node.children.map(lambda c: by_kind(p, c)).sum(initial=jnp.zeros(H))
        return x + s if node.kind == "a" else jnp.tanh(x + s @ p["U"])

    @rj.recursive
    def down(p, node):  # top-down over a bottom-up pass; leaf and internal templates
        h = child_sum(p, node)
        prev = jnp.zeros(H) if node.is_root else down(p, node.parent)
        y = jnp.tanh(h + prev @ p["U"] + node.index)
        return y * 2.0 if node.is_leaf else y

    @rj.recursive
    def stmt(p, node):
        return jnp.tanh(node.data["x"] + node.children.map(lambda c: expr(p, c)).sum())

    @rj.recursive
    def expr(p, node):
        s = node.children.map(lambda c: (c.index + 1) * stmt(p, c)).sum()
        return jnp.sin(node.data["x"] @ p["U"] + s)

    k = jax.random.split(jax.random.key(0), 3)
    p = {{"W": 0.5 * jax.random.normal(k[0], (H, H)), "U": 0.5 * jax.random.normal(k[1], (H, H)),
         "E": jax.random.normal(k[2], (5, H))}}
    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    groups = [trees[i::4] for i in range(4)]
    forests = rj.Forest.pad_all([rj.Forest.from_trees(g, kinds=KINDS) for g in groups])
    stacked = jax.tree.map(lambda *a: np.stack(a), *forests)
    sharded = jax.device_put(stacked, NamedSharding(mesh, P("d")))

    def check(f, top_down=False):
        name = f._name

        def loss(p, forest):
            out = f.batch(p, forest)
            out = out.reshape(out.shape[0], -1)
            return jnp.sum(jnp.where(forest.node_mask[:, None], out, 0.0) ** 2)

        nodes = [q if top_down else q.tree for t in trees for q in t.walk()]
        want_l, want_g = jax.value_and_grad(lambda p: sum(jnp.sum(f(p, q) ** 2) for q in nodes))(p)

        def summed(l, g):  # per-forest values: add them up
            return l.sum(), jax.tree.map(lambda a: a.sum(0), g)

        def on_devices(p, forest):
            forest = jax.tree.map(lambda a: a[0], forest)
            l, g = jax.value_and_grad(loss)(p, forest)
            return jax.lax.psum(l, "d"), g  # g: summed by JAX (p is replicated)

        total = lambda p, fs: jnp.sum(jax.vmap(loss, in_axes=(None, 0))(p, fs))
        ways = {{
            "vmap": lambda: summed(*jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))(p, stacked)),
            "pmap": lambda: summed(*jax.pmap(jax.value_and_grad(loss), in_axes=(None, 0))(p, stacked)),
            "shard_map": lambda: jax.jit(jax.shard_map(
                on_devices, mesh=mesh, in_specs=(P(), P("d")), out_specs=P()))(p, sharded),
            "sharded jit": lambda: jax.jit(jax.value_and_grad(total))(p, sharded),
        }}
        if not SHARD_MAP:
            del ways["shard_map"]
        for way, run in ways.items():
            l, g = run()
            np.testing.assert_allclose(l, want_l, rtol=2e-5, err_msg=f"{{name}} {{way}}")
            for k in p:
                np.testing.assert_allclose(g[k], want_g[k], rtol=2e-4, atol=1e-5,
                                           err_msg=f"{{name}} {{way}} {{k}}")
        print("OK", name)

    @rj.recursive
    def count(p, node):  # a leaf's output is the same on every device (and a scalar)
        if node.is_leaf:
            return jnp.float32(1.0)
        return 1.0 + node.children.map(lambda c: count(p, c)).sum() * p["W"][0, 0]

    @rj.recursive
    def memory(p, node):  # a leaf's memory cell is zeros, on every device
        x = node.data["x"] @ p["W"]
        if node.is_leaf:
            return jnp.stack([jnp.tanh(x), jnp.zeros(H)])
        hc = node.children.map(lambda c: memory(p, c)).sum()
        c = jax.nn.sigmoid(x) * hc[1] + jnp.tanh(x + hc[0])
        return jnp.stack([jnp.tanh(c), c])

    for f in (child_sum, arity, by_kind, stmt, memory, count):
        check(f)
    check(down, top_down=True)

    # A parameter closed over (not an argument) cannot be made per-device by recjax: its
    # gradient would need a psum inside a branch that some devices skip. Refused.
    def closing(p):
        @rj.recursive
        def f(node):
            x = p["E"][node.data["k"]]
            return x if node.is_leaf else jnp.tanh(x + sum(f(c) @ p["U"] for c in node.children))
        return f

    def step(p, forest):
        forest = jax.tree.map(lambda a: a[0], forest)
        return jax.grad(lambda p: jnp.sum(closing(p).batch(forest)))(p)

    def kind_closing(p):  # the same through the per-kind switch
        @rj.recursive
        def f(node):
            s = node.children.map(f).sum(initial=jnp.zeros(H))
            return node.data["x"] + s if node.kind == "a" else jnp.tanh(s @ p["U"])
        return f

    def kind_step(p, forest):
        forest = jax.tree.map(lambda a: a[0], forest)
        return jax.grad(lambda p: jnp.sum(kind_closing(p).batch(forest)))(p)

    for step in (step, kind_step) if SHARD_MAP else ():
        try:
            jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("d")), out_specs=P()))(p, sharded)
            raise AssertionError("a closed-over parameter was not refused")
        except TypeError as e:
            assert "closes over a traced float32" in str(e) and "as an argument" in str(e), e
    print("OK closure refused")
    """
)


def test_models_split_across_four_devices_equal_plain_recursion():
    tests = str(pathlib.Path(__file__).parent)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tests=tests)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for name in ("child_sum", "arity", "by_kind", "stmt", "memory", "count", "down", "closure refused"):
        assert f"OK {name}" in run.stdout, run.stdout
