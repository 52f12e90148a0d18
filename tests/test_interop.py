"""Parameters from the JAX ecosystem: an equinox Module is a pytree like any other."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import recjax as rj


class Cell(eqx.Module):
    emb: jax.Array
    combine: eqx.nn.Linear

    def __init__(self, key, vocab=10, hidden=4):
        k1, k2 = jax.random.split(key)
        self.emb = jax.random.normal(k1, (vocab, hidden))
        self.combine = eqx.nn.Linear(2 * hidden, hidden, key=k2)


@rj.recursive
def encode(cell, node):
    if node.is_leaf:
        return cell.emb[node.data["token"]]
    left, right = [encode(cell, c) for c in node.children]
    return jnp.tanh(cell.combine(jnp.concatenate([left, right])))


def test_equinox_module_as_parameters():
    cell = Cell(jax.random.key(0))
    tree = rj.Tree({"token": 0}, [rj.Tree({"token": 3}), rj.Tree({"token": 5}, [])])
    deeper = rj.Tree({"token": 1}, [tree, rj.Tree({"token": 7})])
    forest = rj.Forest.from_trees([tree, deeper])
    out = encode.batch(cell, forest)
    np.testing.assert_allclose(out[forest.roots[1]], encode(cell, deeper), atol=1e-6)

    loss = lambda c: jnp.sum(encode.batch(c, forest)[forest.roots] ** 2)  # noqa: E731
    g = eqx.filter_grad(loss)(cell)
    ge = eqx.filter_grad(lambda c: sum(jnp.sum(encode(c, t) ** 2) for t in (tree, deeper)))(cell)
    np.testing.assert_allclose(g.combine.weight, ge.combine.weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.emb, ge.emb, rtol=1e-5, atol=1e-6)

    opt = optax.adam(1e-2)
    state = opt.init(eqx.filter(cell, eqx.is_array))
    updates, state = opt.update(g, state)
    trained = eqx.apply_updates(cell, updates)
    assert loss(trained) < loss(cell)
