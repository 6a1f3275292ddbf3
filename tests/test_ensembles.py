"""Post-processing combinations on hand-checkable cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfix_jax import ensembles
from dlfix_jax.models import base as models_base
from dlfix_jax.models import zoo
from dlfix_jax.models.layers import spec


@pytest.fixture(scope="module")
def tiny():
    model = zoo.sequential("tiny", [
        spec("flatten", "flatten"), spec("dense", "hidden", features=8),
        spec("relu", "relu"), spec("dense", "out", features=3)],
        input_shape=(4, 4, 1), num_classes=3)
    vars_o = model.init(jax.random.key(0))
    vars_r = model.init(jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (16, 4, 4, 1))
    return model, vars_o, vars_r, x


def _scale_head(variables, factor):
    params = variables["params"]
    head = models_base.get_layer_params(params, "out")
    new = {k: v * factor for k, v in head.items()}
    return {"params": models_base.set_layer_params(params, "out", new)}


def test_soft_vote_by_hand():
    z_o = jnp.array([[0.0, 0.0]])            # softmax (0.5, 0.5)
    z_r = jnp.array([[np.log(3.0), 0.0]])    # softmax (0.75, 0.25)
    np.testing.assert_allclose(ensembles.soft_vote(z_o, z_r),
                               [[0.625, 0.375]], rtol=1e-6)


def test_hard_vote_picks_the_more_confident_model():
    z_o = jnp.array([[5.0, 0.0], [0.0, 0.1], [1.0, 0.0]])
    z_r = jnp.array([[0.0, 1.0], [0.0, 4.0], [0.0, 1.0]])
    p = ensembles.hard_vote(z_o, z_r)
    np.testing.assert_allclose(p[0], jax.nn.softmax(z_o[0]), rtol=1e-6)
    np.testing.assert_allclose(p[1], jax.nn.softmax(z_r[1]), rtol=1e-6)
    # Equal confidence: keep the fixed model (M_o only when strictly more).
    np.testing.assert_allclose(p[2], jax.nn.softmax(z_r[2]), rtol=1e-6)
    assert list(np.argmax(p, -1)) == [0, 1, 1]


def test_uncertainty_blend_by_hand():
    # M_o flips between two one-hot outputs: Var = (.25, .25), u_o = 0.5.
    # M_r is constant: Var = 0, clipped u_r = 1e-3.
    probs_o = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    probs_r = jnp.array([[[0.9, 0.1]], [[0.9, 0.1]]])
    p, w_o, w_r = ensembles.uncertainty_blend(probs_o, probs_r)
    u_o, u_r = 0.5, 1e-3
    want_wo = u_r / (2 * (u_o + u_r))
    want_wr = u_o / (2 * (u_o + u_r)) + 0.5
    np.testing.assert_allclose(w_o, [want_wo], rtol=1e-5)
    np.testing.assert_allclose(w_r, [want_wr], rtol=1e-5)
    np.testing.assert_allclose(
        p, [[want_wo * 0.5 + want_wr * 0.9, want_wo * 0.5 + want_wr * 0.1]],
        rtol=1e-5)
    # No variance on either side: the fixed 0.25 / 0.75 prior blend.
    _, w_o, w_r = ensembles.uncertainty_blend(probs_r, probs_r)
    np.testing.assert_allclose((w_o, w_r), ([0.25], [0.75]), rtol=1e-6)


def test_up_with_identical_models_is_the_mean_noisy_softmax(tiny):
    model, vars_o, _, x = tiny
    key = jax.random.key(7)
    p = ensembles.combine("UP", key, model, vars_o, model, vars_o, x)
    po, pr = jax.jit(lambda k, v, a: ensembles.perturbation_probs(
        k, model, v, model, v, a))(key, vars_o, x)
    np.testing.assert_array_equal(po, pr)  # same noise for both models
    _, w_o, w_r = ensembles.uncertainty_blend(po, pr)
    np.testing.assert_allclose(w_o, 0.25, rtol=1e-6)
    np.testing.assert_allclose(w_r, 0.75, rtol=1e-6)
    np.testing.assert_allclose(p, po.mean(0), rtol=1e-5, atol=1e-7)
    # 0.01 noise barely moves the softmax.
    np.testing.assert_allclose(p, jax.nn.softmax(model.apply(vars_o, x)),
                               atol=1e-2)
    # Explicit keys: same key -> same result, another key -> different.
    np.testing.assert_array_equal(
        p, ensembles.combine("UP", key, model, vars_o, model, vars_o, x))
    other = ensembles.combine("UP", jax.random.key(8), model, vars_o, model,
                              vars_o, x)
    assert not np.array_equal(p, other)


def test_ud_drops_the_classifier_input(tiny):
    model, vars_o, vars_r, x = tiny
    assert ensembles.classifier_layer(model, vars_o) == "out"
    key = jax.random.key(3)
    probe = jax.jit(lambda k, v, a, rate: ensembles.dropout_probs(
        k, model, v, a, rate=rate, head="out"), static_argnames="rate")
    samples = probe(key, vars_r, x, rate=0.2)
    assert samples.shape == (10, 16, 3)
    assert float(samples.var(0).sum(-1).mean()) > 0  # passes differ
    # Rate 0 gives the deterministic softmax in every pass.
    still = probe(key, vars_r, x, rate=0.0)
    np.testing.assert_allclose(still[3], jax.nn.softmax(
        model.apply(vars_r, x)), rtol=1e-5)
    p, info = ensembles.combine("UD", key, model, vars_o, model, vars_r, x,
                                return_info=True)
    assert info["dropout_at"] == ("out", "out")
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)


def test_fit_temperature_recovers_a_known_temperature():
    z_o = 3.0 * jax.random.normal(jax.random.key(0), (200, 5))
    t_true = 2.5
    t, info = ensembles.fit_temperature(z_o, z_o / t_true, reg=0.0)
    assert t == pytest.approx(t_true, rel=1e-3)
    assert info["mse"] < 1e-8
    # The default regulariser 5e-4·T² pulls T* only slightly down.
    t_reg, info = ensembles.fit_temperature(z_o, z_o / t_true)
    assert 0.8 * t_true < t_reg <= t_true
    assert not info["unregularised_rerun"]
    # A small temperature (< 0.8) triggers the unregularised rerun.
    t_small, info = ensembles.fit_temperature(z_o, z_o / 0.5)
    assert info["unregularised_rerun"]
    assert t_small == pytest.approx(0.5, rel=1e-2)


def test_us_end_to_end_with_a_rescaled_head(tiny):
    model, vars_o, _, x = tiny
    vars_r = _scale_head(vars_o, 1 / 2.0)  # z_r = z_o / 2
    p, info = ensembles.combine(
        "US", jax.random.key(0), model, vars_o, model, vars_r, x,
        unlabeled_x=x, return_info=True, ts_kwargs={"reg": 0.0})
    assert info["temperature"] == pytest.approx(2.0, rel=1e-2)
    z_r = model.apply(vars_r, x)
    np.testing.assert_allclose(p, jax.nn.softmax(z_r), rtol=1e-3, atol=1e-5)


def test_every_combination_gives_probabilities(tiny):
    model, vars_o, vars_r, x = tiny
    key = jax.random.key(4)
    for name in ensembles.NAMES:
        p = ensembles.combine(name, key, model, vars_o, model, vars_r, x,
                              unlabeled_x=x)
        assert p.shape == (16, 3), name
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(
        ensembles.combine("NO", key, model, vars_o, model, vars_r, x),
        jax.nn.softmax(model.apply(vars_r, x)), rtol=1e-6)
    # Batching is exact for the deterministic combinations.
    full = ensembles.combine("SV", key, model, vars_o, model, vars_r, x)
    batched = ensembles.combine("SV", key, model, vars_o, model, vars_r, x,
                                batch_size=5)
    np.testing.assert_allclose(full, batched, rtol=1e-6)


def test_errors(tiny):
    model, vars_o, vars_r, x = tiny
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="unknown combination"):
        ensembles.combine("XX", key, model, vars_o, model, vars_r, x)
    with pytest.raises(ValueError, match="unlabeled_x"):
        ensembles.combine("US", key, model, vars_o, model, vars_r, x)
    with pytest.raises(ValueError, match="same shape"):
        ensembles.fit_temperature(jnp.zeros((3, 2)), jnp.zeros((3, 4)))
