"""I-Repair (dlfix_jax.fixers.irepair) on the tiny MLP and small hand cases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlfix_jax.fixers as fixers
from dlfix_jax.fixers import irepair
from dlfix_jax.metrics import classification
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec
from dlfix_jax.training import loop
from tests import fixtures

SPEC = fixers.get("irepair")


def _fix(key, problem, **over):
    return SPEC.fix(key, problem, SPEC.config(over))


def _rr(model, variables, res, problem):
    pred0 = model.predict(variables, problem.repair.x)
    pred1 = model.predict(res.variables, problem.repair.x)
    return float(classification.flips(pred0, pred1, problem.repair.y)["rr"])


def test_registered():
    assert SPEC.level == "neuron" and SPEC.abbrev == "IR"
    cfg = SPEC.default_config()
    assert (cfg.lr, cfg.gamma, cfg.max_iters) == (1e-4, 10.0, 5000)
    with pytest.raises(ValueError, match="lr"):
        SPEC.config({"lr": 0.0})


def test_repairs_deterministic_and_exact_outside_mask():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    res = _fix(jax.random.key(3), problem, lr=1e-3, max_iters=100)
    res2 = _fix(jax.random.key(3), problem, lr=1e-3, max_iters=100)
    for a, b in zip(jax.tree_util.tree_leaves(res.variables),
                    jax.tree_util.tree_leaves(res2.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.all(np.isfinite(np.asarray(a)))
    assert _rr(model, variables, res, problem) > 0
    for m in jax.tree_util.tree_leaves(res.mask):
        assert isinstance(m, np.ndarray) and m.dtype == bool
    assert fixtures.changed_outside(res.mask, variables["params"],
                                    res.variables["params"]) == 0
    assert 0 < int(res.info["mask_size"]) == fixers.base.mask_count(res.mask)
    assert int(res.info["stop_reason"]) == irepair.MAX_ITERS
    assert int(res.info["iterations"]) == 100


def test_mask_is_the_influence_ratio_and_holds_at_every_step():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    params = variables["params"]
    # Step 1's mask by hand: remaining = all failing; G = all passing.
    xs, ys = problem.failing.x, problem.failing.y
    xg = problem.passing.x
    g_s = jax.grad(lambda p: jnp.mean(loop.cross_entropy(
        model.apply({"params": p}, xs), ys)))(params)
    g_g = jax.grad(lambda p: jnp.sum(jnp.abs(
        model.apply({"params": p}, xg))) / xg.shape[0])(params)
    want = jax.tree_util.tree_map(
        lambda a, b: np.asarray((jnp.abs(a) + 1e-8)
                                / (10 * jnp.abs(b) + 1e-8) >= 1), g_s, g_g)
    prev, prev_mask = params, None
    for k in range(1, 5):
        res = _fix(jax.random.key(0), problem, lr=1e-3, max_iters=k,
                   num_general=0)
        assert int(res.info["iterations"]) == k
        new = res.variables["params"]
        if k == 1:
            got = jax.tree_util.tree_leaves(res.mask)
            ref = jax.tree_util.tree_leaves(want)
            bad = sum(int(np.sum(a != b)) for a, b in zip(got, ref))
            assert bad <= 1e-3 * sum(a.size for a in ref)  # round-off only
        else:  # the union only grows
            for a, b in zip(jax.tree_util.tree_leaves(prev_mask),
                            jax.tree_util.tree_leaves(res.mask)):
                assert np.all(b[a])
        # Step k moves nothing outside the masks of steps 1..k.
        assert fixtures.changed_outside(res.mask, prev, new) == 0
        assert fixtures.changed_outside(res.mask, params, new) == 0
        prev, prev_mask = new, res.mask


def test_stops_when_nothing_remains():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    res = _fix(jax.random.key(0), problem, lr=1e-3, max_iters=3000)
    info = fixers.summarize_info(SPEC, res.info)
    assert info["stop_reason_name"] == "all_repaired"
    assert info["num_remaining"] == 0
    assert 0 < info["iterations"] < 3000
    assert _rr(model, variables, res, problem) == 100.0


def test_nothing_to_repair_and_refusals():
    model, variables, _, problem = fixtures.tiny_mlp_problem()
    p0 = problem.replace(failing=problem.failing.take(np.arange(0)))
    res = _fix(jax.random.key(0), p0)
    assert int(res.info["stop_reason"]) == irepair.NOTHING
    assert fixers.base.mask_count(res.mask) == 0
    reason = SPEC.applicable(fixtures.info_of(zoo.get("lenet5"),
                                              n_repair=5, n_failing=5))
    assert isinstance(reason, str) and "general" in reason
    bad = problem.replace(failing=problem.failing.replace(
        x=problem.failing.x.at[0, 0, 0, 0].set(jnp.nan)))
    with pytest.raises(ValueError, match="non-finite"):
        _fix(jax.random.key(0), bad, max_iters=2)


def test_non_finite_loss_is_refused():
    _, _, _, problem = fixtures.tiny_mlp_problem()
    # Finite inputs whose logits overflow: the first loss is not finite.
    huge = problem.replace(failing=problem.failing.replace(
        x=problem.failing.x * 3e38))
    with pytest.raises(RuntimeError, match="non-finite loss"):
        _fix(jax.random.key(0), huge, lr=1e-3, max_iters=50)


def test_general_set_is_class_balanced():
    y = np.array([0] * 10 + [1] * 3 + [2] * 7)
    pos = irepair.general_positions(y, 12, 3)
    assert np.array_equal(np.bincount(y[pos], minlength=3), [4, 3, 4])
    assert irepair.general_positions(y, 0, 3) is None
    _, _, _, problem = fixtures.tiny_mlp_problem()
    res = _fix(jax.random.key(0), problem, max_iters=1)
    assert int(res.info["num_general"]) == 40


def test_rmsprop_matches_torch_by_hand():
    """torch.optim.RMSprop(lr=0.01) (alpha 0.99, eps 1e-8 added outside the
    sqrt, no momentum, v0 = 0) on one parameter p0 = 1, by hand:
    v <- 0.99 v + 0.01 g^2;  p <- p - 0.01 g / (sqrt(v) + 1e-8).

    g = 0.5: v = 0.0025, p = 1 - 0.01*0.5/0.05 = 0.9.
    g = 0 (a masked step): v = 0.002475 (the state still decays), p = 0.9.
    g = -2: v = 0.04245025, p = 0.9 + 0.02/0.20603458 = 0.99707088.
    Separately, g = 1e-6 from p0 = 1: v = 1e-14, sqrt(v) = 1e-7, so eps
    outside the sqrt gives p = 1 - 1e-8/1.1e-7 = 0.90909091 (eps inside,
    optax's default, would give 0.99999990).
    """
    tx = loop.optimizer("rmsprop", 0.01, decay=0.99, eps=1e-8)
    p = jnp.array([1.0])
    state = tx.init(p)
    for g, want_p, want_v in ((0.5, 0.9, 0.0025), (0.0, 0.9, 0.002475),
                              (-2.0, 0.99707088, 0.04245025)):
        upd, state = tx.update(jnp.array([g]), state, p)
        p = p + upd
        np.testing.assert_allclose(float(p[0]), want_p, rtol=1e-6)
        nu = optax.tree_utils.tree_get(state, "nu")
        np.testing.assert_allclose(float(nu[0]), want_v, rtol=1e-6)
    p = jnp.array([1.0])
    upd, _ = tx.update(jnp.array([1e-6]), tx.init(p), p)
    np.testing.assert_allclose(float((p + upd)[0]), 0.90909091, rtol=1e-5)


def _bn_dropout_problem():
    model = zoo.sequential("ir_bn_drop", [
        spec("flatten", "flatten"), spec("dense", "dense1", features=16),
        spec("bn", "bn1"), spec("relu", "relu1"),
        spec("dropout", "drop1", rate=0.5),
        spec("dense", "dense2", features=10)], (28, 28, 1), 10)
    _, _, ds, _ = fixtures.tiny_mlp_problem()
    variables = model.init(jax.random.key(0))   # untrained: many failing
    variables["batch_stats"] = jax.tree_util.tree_map(  # non-trivial stats
        lambda a: a + 0.5, variables["batch_stats"])
    return model, variables, fixers.make_problem(model, variables, ds)


def test_bn_eval_dropout_on_and_vmap():
    model, variables, problem = _bn_dropout_problem()
    x = problem.repair.x[:8]
    k = jax.random.key(0)
    a = irepair.dropout_logits(model, variables, x, k)
    # BatchNorm in eval mode: without the dropout layer (no parameters, same
    # variables) the forward pass is the inference one.
    no_drop = zoo.sequential("ir_bn", [s for s in model.layers
                                       if s.kind != "dropout"],
                             (28, 28, 1), 10)
    np.testing.assert_allclose(
        np.asarray(irepair.dropout_logits(no_drop, variables, x, k)),
        np.asarray(no_drop.apply(variables, x)), rtol=1e-5, atol=1e-6)
    train_logits, _ = no_drop.apply(variables, x, train=True)
    assert not np.allclose(np.asarray(a), np.asarray(train_logits))
    # Dropout on: the logits depend on the key.
    b = irepair.dropout_logits(model, variables, x, jax.random.key(1))
    assert not np.allclose(np.asarray(a), np.asarray(b))
    keys = jax.random.split(jax.random.key(5), 2)
    cfg = SPEC.config({"lr": 1e-3, "max_iters": 30})
    single = SPEC.fix(keys[1], problem, cfg)
    assert int(single.info["iterations"]) > 0
    # BatchNorm statistics never change; nothing outside the mask moves.
    for s0, s1 in zip(jax.tree_util.tree_leaves(variables["batch_stats"]),
                      jax.tree_util.tree_leaves(
                          single.variables["batch_stats"])):
        np.testing.assert_array_equal(np.asarray(s0), np.asarray(s1))
    assert fixtures.changed_outside(single.mask, variables["params"],
                                    single.variables["params"]) == 0
    # vmap over keys equals single calls (dropout differs per key).
    out = jax.vmap(SPEC.fix, in_axes=(0, None, None))(keys, problem, cfg)
    for a_, b_ in zip(jax.tree_util.tree_leaves(out.variables["params"]),
                      jax.tree_util.tree_leaves(single.variables["params"])):
        np.testing.assert_allclose(np.asarray(a_[1]), np.asarray(b_),
                                   rtol=1e-5, atol=1e-6)
