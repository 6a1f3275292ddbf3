"""Tests of the model zoo: shapes, parameter counts, capture, BatchNorm.

Parameter counts are computed here from the architectures' definitions (or,
for ResNet18 and DenseNet121, are the published counts of the standard
CIFAR ResNet18 and of Keras/torchvision DenseNet121), so a wrong layer
width or a missing layer fails. The big models are checked with
``jax.eval_shape`` (no allocation, no compute); DenseNet121 only so,
because its init is slow on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfix_jax import models
from dlfix_jax.models import base as models_base


def _conv(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def _dense(cin, cout):
    return cin * cout + cout


def _count(tree):
    return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


def _abstract(model):
    return jax.eval_shape(model.init, jax.random.key(0))


def _abstract_logits(model, batch=2):
    v = _abstract(model)
    x = jax.ShapeDtypeStruct((batch,) + model.input_shape, jnp.float32)
    return jax.eval_shape(lambda v, x: model.apply(v, x), v, x)


LENET5_PARAMS = (_conv(5, 1, 6) + _conv(3, 6, 16) + _dense(3 * 3 * 16, 120)
                 + _dense(120, 84) + _dense(84, 10))
FACENET_PARAMS = (_conv(3, 3, 32) + _conv(3, 32, 64) + _conv(3, 64, 128)
                  + _dense(8 * 8 * 128, 128) + _dense(128, 64)
                  + _dense(64, 2))


def _vgg16_params():
    n, cin = 0, 3
    for block in ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3):
        for f in block:
            n += _conv(3, cin, f) + 2 * f  # conv + BN scale/bias
            cin = f
    return n + _dense(512, 512) + 2 * 512 + _dense(512, 10)


@pytest.mark.parametrize("name,params,logits", [
    ("lenet5", LENET5_PARAMS, (2, 10)),
    ("facenet", FACENET_PARAMS, (2, 2)),
    ("vgg16", _vgg16_params(), (2, 10)),
    # Standard CIFAR ResNet18 (kuangliu/pytorch-cifar): 11,173,962.
    ("resnet18", 11_173_962, (2, 10)),
    # Keras/torchvision DenseNet121 trainable parameters: 7,978,856.
    ("densenet121", 7_978_856, (2, 1000)),
])
def test_param_counts_and_output_shapes(name, params, logits):
    model = models.get(name)
    v = _abstract(model)
    assert _count(v["params"]) == params
    assert _abstract_logits(model).shape == logits


def test_input_shapes_and_bn_presence():
    expect = {"lenet5": (28, 28, 1), "facenet": (64, 64, 3),
              "vgg16": (32, 32, 3), "resnet18": (32, 32, 3),
              "densenet121": (224, 224, 3)}
    for name, shape in expect.items():
        model = models.get(name)
        assert model.input_shape == shape
        has_stats = "batch_stats" in _abstract(model)
        assert has_stats == (name in ("vgg16", "resnet18", "densenet121"))
        assert model.has_batch_norm == has_stats


def test_num_classes_and_unknown_name():
    assert _abstract_logits(models.get("lenet5", num_classes=7)).shape == (
        2, 7)
    with pytest.raises(KeyError, match="unknown model 'nope'.*lenet5"):
        models.get("nope")


def test_lenet5_capture_every_layer():
    model = models.get("lenet5")
    v = model.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
    logits, acts = model.apply(v, x, capture="*")
    assert list(acts) == model.layer_names()
    shapes = {"conv1": (3, 24, 24, 6), "pool1": (3, 8, 8, 6),
              "conv2": (3, 6, 6, 16), "pool2": (3, 3, 3, 16),
              "flatten": (3, 144), "dense1": (3, 120), "dense2": (3, 84),
              "dense3": (3, 10)}
    for name, shape in shapes.items():
        assert acts[name]["output"].shape == shape, name
    names = model.layer_names()
    for a, b in zip(names, names[1:]):  # each layer feeds the next
        np.testing.assert_array_equal(acts[a]["output"], acts[b]["input"])
    np.testing.assert_array_equal(acts["conv1"]["input"], x)
    np.testing.assert_array_equal(acts["dense3"]["output"], logits)
    np.testing.assert_array_equal(
        acts["relu3"]["output"], np.maximum(acts["dense1"]["output"], 0))
    # Dense output is the pre-activation: x @ kernel + bias.
    p = v["params"]["dense2"]
    np.testing.assert_allclose(
        acts["dense2"]["output"],
        acts["dense2"]["input"] @ p["kernel"] + p["bias"], rtol=1e-5,
        atol=1e-5)
    np.testing.assert_array_equal(model.apply(v, x), logits)


def test_capture_selected_and_unknown():
    model = models.get("lenet5")
    v = model.init(jax.random.key(0))
    x = jnp.zeros((1, 28, 28, 1))
    _, acts = model.apply(v, x, capture=("dense2",))
    assert list(acts) == ["dense2"]
    with pytest.raises(KeyError, match="not layers"):
        model.apply(v, x, capture=("dense9",))


def test_dropout_needs_and_uses_key():
    model = models.get("facenet", input_shape=(16, 16, 3))  # small: fast
    v = model.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    a, _ = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    b, _ = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    c, _ = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(model.apply(v, x), model.apply(v, x))


def test_batch_norm_stats_update_functionally():
    """train=True returns new statistics and leaves the input untouched;
    train=False uses the stored statistics (per-example predictions)."""
    model = models.get("resnet18", input_shape=(8, 8, 3))  # small: fast
    v = model.init(jax.random.key(0))
    before = jax.tree_util.tree_map(np.array, v["batch_stats"])
    x = 3.0 + jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    logits, new_stats = model.apply(v, x, train=True)
    assert logits.shape == (4, 10)
    assert (jax.tree_util.tree_structure(new_stats)
            == jax.tree_util.tree_structure(v["batch_stats"]))
    for old, now in zip(jax.tree_util.tree_leaves(before),
                        jax.tree_util.tree_leaves(v["batch_stats"])):
        np.testing.assert_array_equal(old, now)  # input not mutated
    m0 = before["stem_bn"]["mean"]
    m1 = np.asarray(new_stats["stem_bn"]["mean"])
    assert not np.allclose(m0, m1)
    # momentum 0.9: new = 0.9 * old + 0.1 * batch mean.
    stem = model.apply(v, x, capture=("stem_conv",))[1]["stem_conv"]["output"]
    np.testing.assert_allclose(m1, 0.9 * m0 + 0.1 * np.mean(stem, (0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    # Eval mode: an example's logits do not depend on the rest of the batch.
    v2 = {"params": v["params"], "batch_stats": new_stats}
    full = model.apply(v2, x)
    np.testing.assert_allclose(model.apply(v2, x[:1]), full[:1], rtol=1e-4,
                               atol=1e-4)


def test_resnet18_capture_by_module_path():
    model = models.get("resnet18")
    v = _abstract(model)
    names = model.all_layer_names(v)
    assert "stage2_block0/shortcut_conv" in names
    assert "stage1_block0/conv1" in names and "dense" in names
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    _, acts = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture=("stage3_block0/conv1",
                                                "dense")), v, x)
    assert acts["stage3_block0/conv1"]["output"].shape == (2, 8, 8, 256)
    assert acts["dense"]["input"].shape == (2, 512)


def test_addressing_get_set_layer_params():
    model = models.get("lenet5")
    v = model.init(jax.random.key(0))
    p = v["params"]
    assert models.param_layers(p) == ["conv1", "conv2", "dense1", "dense2",
                                      "dense3"]
    d = models.get_layer_params(p, "dense3")
    new = {"kernel": jnp.zeros_like(d["kernel"]), "bias": d["bias"]}
    p2 = models.set_layer_params(p, "dense3", new)
    assert float(jnp.abs(p2["dense3"]["kernel"]).sum()) == 0.0
    assert float(jnp.abs(p["dense3"]["kernel"]).sum()) > 0.0  # copy
    with pytest.raises(KeyError, match="no layer"):
        models.get_layer_params(p, "dense7")


def test_intervene_replaces_a_layer_output_and_composes_with_capture():
    model = models.get("lenet5")
    v = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))

    def set_unit(o):
        return o.at[:, 5].set(7.0)

    z, acts = model.apply(v, x, capture=("dense1", "relu3"),
                          intervene={"dense1": set_unit})
    assert np.all(np.asarray(acts["dense1"]["output"][:, 5]) == 7.0)
    # Hand-patched forward pass from the captured input of dense1.
    _, ref = model.apply(v, x, capture=("dense1",))
    h = ref["dense1"]["input"]
    p = v["params"]
    o = (h @ p["dense1"]["kernel"] + p["dense1"]["bias"]).at[:, 5].set(7.0)
    o = jnp.maximum(o, 0) @ p["dense2"]["kernel"] + p["dense2"]["bias"]
    want = jnp.maximum(o, 0) @ p["dense3"]["kernel"] + p["dense3"]["bias"]
    np.testing.assert_allclose(np.asarray(z), np.asarray(want), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(KeyError, match="not layers"):
        model.apply(v, x, intervene={"nope": set_unit})


def test_split_at_head_and_tail_compose_to_the_model():
    model = models.get("lenet5")
    v = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
    for layer in ("pool1", "flatten", "dense2", "dense3"):
        head, tail = models_base.split_at(model, layer)
        vh, vt = models_base.split_variables_at(model, layer, v)
        mid = head.apply(vh, x)
        assert tuple(mid.shape[1:]) == tail.input_shape
        np.testing.assert_allclose(np.asarray(tail.apply(vt, mid)),
                                   np.asarray(model.apply(v, x)), rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="sequential"):
        models_base.split_at(models.get("resnet18"), "dense")


def test_models_hash_by_structure_so_caches_hit():
    a, b = models.get("lenet5"), models.get("lenet5")
    assert a is not b and a == b and hash(a) == hash(b)
    assert a != models.get("lenet5", num_classes=7)
    from dlfix_jax import predict
    from dlfix_jax.metrics import timing
    v = a.init(jax.random.key(0))
    x = np.zeros((5, 28, 28, 1), np.float32)
    predict.predict(a, v, x)
    with timing.Timer() as t:
        predict.predict(b, v, x)
    assert t.n_compiles == 0
