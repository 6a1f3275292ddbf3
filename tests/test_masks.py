"""Masks: constructors, algebra, gather/scatter and exact optax restriction."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlfix_jax import masks
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec


def _params():
    layers = [spec("conv", "conv1", features=3, kernel=(3, 3)),
              spec("relu", "relu1"), spec("flatten", "flatten"),
              spec("dense", "dense1", features=5), spec("relu", "relu2"),
              spec("dense", "dense2", features=4)]
    model = zoo.sequential("m", layers, (6, 6, 1), 4)
    return model.init(jax.random.key(0))["params"]


def _bits(a):
    return np.asarray(a).view(np.uint32)


def _assert_unchanged_outside(mask, old, new):
    mask = masks.to_element_mask(mask, old)
    for m, a, b in zip(jax.tree_util.tree_leaves(mask),
                       jax.tree_util.tree_leaves(old),
                       jax.tree_util.tree_leaves(new)):
        np.testing.assert_array_equal(_bits(a)[~m], _bits(b)[~m])


def test_constructors_and_count():
    p = _params()
    assert masks.count(masks.empty_mask(p)) == 0
    lm = masks.layer_mask(p, "dense1")
    assert masks.count(lm) == p["dense1"]["kernel"].size + 5
    um = masks.unit_mask(p, "dense2", [1, 3])
    assert masks.count(um) == 2 * 5 + 2
    assert um["dense2"]["kernel"][:, 1].all() and not um["dense2"]["kernel"][:, 0].any()
    assert um["dense2"]["bias"].tolist() == [False, True, False, True]
    cm = masks.unit_mask(p, "conv1", [2])
    assert cm["conv1"]["kernel"][..., 2].all() and masks.count(cm) == 9 + 1
    wm = masks.weight_mask(p, "dense2", [(0, 1), (4, 3)])
    assert masks.count(wm) == 2 and wm["dense2"]["kernel"][4, 3]
    assert not wm["dense2"]["bias"].any()
    with pytest.raises(ValueError, match="out of range"):
        masks.unit_mask(p, "dense2", [4])
    with pytest.raises(ValueError, match="out of range"):
        masks.weight_mask(p, "dense2", [(5, 0)])
    with pytest.raises(KeyError, match="nolayer"):
        masks.layer_mask(p, "nolayer")


def test_algebra():
    p = _params()
    a = masks.unit_mask(p, "dense2", [0])
    b = masks.weight_mask(p, "dense2", [(0, 0), (1, 1)])
    assert masks.count(masks.mask_or(a, b)) == 5 + 1 + 1
    assert masks.count(masks.mask_and(a, b)) == 1
    total = sum(x.size for x in jax.tree_util.tree_leaves(p))
    assert masks.count(masks.mask_not(a)) == total - 6
    leaf = jax.tree_util.tree_map(lambda _: True, p)
    assert masks.count(leaf, p) == total
    assert masks.count(masks.mask_and(leaf, a)) == 6


def test_gather_scatter_roundtrip_and_exactness():
    p = _params()
    m = masks.mask_or(masks.weight_mask(p, "dense1", [(3, 2), (0, 0)]),
                      masks.unit_mask(p, "conv1", [1]))
    idx = masks.indices_of(m)
    assert len(idx) == masks.count(m) == 2 + 10
    v = masks.gather(p, idx)
    assert v.shape == (12,)
    same = masks.scatter(p, idx, v)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(same)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    new = jax.jit(lambda q, x: masks.scatter(q, idx, x))(p, v + 1.0)
    np.testing.assert_allclose(masks.gather(new, idx), v + 1.0)
    _assert_unchanged_outside(m, p, new)
    assert float(new["dense1"]["kernel"][3, 2]) == float(p["dense1"]["kernel"][3, 2]) + 1.0
    with pytest.raises(ValueError, match="shape"):
        masks.scatter(p, idx, jnp.zeros(3))


def test_apply_delta_and_select():
    p = _params()
    m = masks.unit_mask(p, "dense1", [2])
    delta = jax.tree_util.tree_map(lambda a: jnp.full_like(a, 0.5), p)
    q = jax.jit(lambda a, d: masks.apply_delta(a, d, m))(p, delta)
    _assert_unchanged_outside(m, p, q)
    np.testing.assert_allclose(q["dense1"]["bias"][2], p["dense1"]["bias"][2] + 0.5)
    # leaf-level mask: only dense2 moves
    leaf = jax.tree_util.tree_map(lambda _: False, p)
    leaf["dense2"] = {"kernel": True, "bias": True}
    q = masks.apply_delta(p, delta, leaf)
    _assert_unchanged_outside(leaf, p, q)
    np.testing.assert_allclose(q["dense2"]["kernel"], p["dense2"]["kernel"] + 0.5)


@pytest.mark.parametrize("tx", [
    optax.sgd(0.1, momentum=0.9),
    optax.adamw(1e-2, weight_decay=0.1),
])
def test_restrict_exact_over_steps(tx):
    p = _params()
    # a -0.0 outside the mask: p + 0.0 would flip its sign bit
    p["dense1"]["bias"] = p["dense1"]["bias"].at[0].set(-0.0)
    m = masks.mask_or(masks.weight_mask(p, "dense2", [(1, 2)]),
                      masks.unit_mask(p, "conv1", [0]))
    rtx = masks.restrict(tx, m)
    x = jax.random.normal(jax.random.key(3), (8, 6, 6, 1))
    layers = [spec("conv", "conv1", features=3, kernel=(3, 3)),
              spec("relu", "relu1"), spec("flatten", "flatten"),
              spec("dense", "dense1", features=5), spec("relu", "relu2"),
              spec("dense", "dense2", features=4)]
    model = zoo.sequential("m", layers, (6, 6, 1), 4)

    def loss(q):
        return jnp.sum(model.apply({"params": q}, x) ** 2)

    @jax.jit
    def step(q, s):
        g = jax.grad(loss)(q)
        u, s = rtx.update(g, s, q)
        return masks.apply_updates(q, u, m), s, u

    q, s = p, rtx.init(p)
    for _ in range(4):
        q, s, u = step(q, s)
        _assert_unchanged_outside(m, p, q)
        for mm, uu in zip(jax.tree_util.tree_leaves(m), jax.tree_util.tree_leaves(u)):
            assert np.all(np.asarray(uu)[~mm] == 0.0)
    # the selected entries did move
    assert not np.array_equal(q["dense2"]["kernel"][1, 2], p["dense2"]["kernel"][1, 2])
    # plain optax.apply_updates with restricted updates is exact too,
    # except that -0.0 + 0.0 == +0.0 (documented); check values
    q2 = optax.apply_updates(p, u)
    _assert_values_equal_outside = masks.to_element_mask(m, p)
    for mm, a, b in zip(jax.tree_util.tree_leaves(_assert_values_equal_outside),
                        jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q2)):
        np.testing.assert_array_equal(np.asarray(a)[~mm], np.asarray(b)[~mm])


def test_optax_masked_alone_leaks():
    """Documents why restrict exists: optax.masked passes raw grads through."""
    p = {"a": jnp.ones(3), "b": jnp.ones(3)}
    g = {"a": jnp.ones(3), "b": jnp.ones(3)}
    tx = optax.masked(optax.sgd(0.1), {"a": True, "b": False})
    u, _ = tx.update(g, tx.init(p), p)
    assert float(u["b"][0]) == 1.0  # raw gradient, not zero
    rtx = masks.restrict(optax.sgd(0.1), {"a": True, "b": False})
    u, _ = rtx.update(g, rtx.init(p), p)
    assert float(u["b"][0]) == 0.0


def test_kernel_entries_mask_and_gene_coords():
    """Entries of two Dense kernels: the mask holds exactly them, and the
    gene coordinates name, in gather order, the kernel entry of each gene."""
    params = _params()
    layers = ["dense1", "dense2"]
    lay = np.array([0, 1, 0, 1])
    idx = np.array([[7, 3], [0, 2], [2, 1], [4, 0]])
    mask = masks.kernel_entries_mask(params, layers, lay, idx)
    genes = masks.indices_of(mask)
    g_lay, rows, cols = masks.gene_coords(params, layers, genes)
    assert g_lay.dtype == rows.dtype == cols.dtype == np.int32
    assert sorted(zip(g_lay, rows, cols)) == sorted(
        zip(lay, idx[:, 0], idx[:, 1]))
    values = np.asarray(masks.gather(params, genes))
    expect = [np.asarray(params[layers[l]]["kernel"])[r, c]
              for l, r, c in zip(g_lay, rows, cols)]
    np.testing.assert_array_equal(values, expect)
