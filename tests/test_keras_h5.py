"""Keras ``.h5`` import: models built, trained briefly and saved by tf_keras
(Keras 2, the tf.keras 2.x layout) and Keras 3 (its legacy .h5 layout) load
into our Flax models with predictions equal to Keras's within 1e-5."""

import json
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import h5py  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dlfix_jax.models import keras_h5  # noqa: E402

TOL = 1e-5

pytestmark = pytest.mark.filterwarnings(
    "ignore:You are saving your model as an HDF5 file:UserWarning")


def _framework(name):
    K = pytest.importorskip("tf_keras" if name == "tf_keras" else "keras")
    # Fresh layer-name counters ("dense", not "dense_1"), whatever other
    # tests in this process built before.
    K.backend.clear_session()
    return K


def _input(K, shape):
    if K.__name__ == "tf_keras":
        return K.layers.InputLayer(input_shape=shape)
    return K.Input(shape)


def _build_cnn(K):
    """Every supported layer type; odd sizes so SAME padding is asymmetric."""
    L = K.layers
    return K.Sequential([
        _input(K, (15, 15, 2)),
        L.Conv2D(4, 3, padding="same", activation="relu"),
        L.BatchNormalization(momentum=0.5),
        L.MaxPooling2D(2),                                   # 7x7
        L.Conv2D(6, 2, strides=2, padding="same"),           # 4x4, pad (0, 1)
        L.Activation("relu"),
        L.AveragePooling2D(3, strides=1, padding="same"),    # excludes pads
        L.BatchNormalization(scale=False, epsilon=1e-2, momentum=0.5),
        L.Conv2D(5, (2, 3), padding="valid", use_bias=False),  # 3x2x5
        L.ReLU(),
        L.Flatten(name="flat"),
        L.Dropout(0.3),
        L.Dense(16, activation="relu"),
        L.BatchNormalization(center=False, momentum=0.5),
        L.Dense(4, activation="softmax"),
    ])


def _build_small(K):
    """Linear output, same-padded strided max pooling, global pooling."""
    L = K.layers
    return K.Sequential([
        _input(K, (9, 9, 3)),
        L.MaxPooling2D(3, strides=2, padding="same"),        # 5x5
        L.Conv2D(4, 3, strides=(2, 1), activation="linear"),  # 2x3
        L.GlobalAveragePooling2D(),
        L.Dense(3),
    ])


def _build_softmax_layer(K):
    """Softmax as a separate last Activation layer, Dense on rank-2 input."""
    L = K.layers
    return K.Sequential([
        _input(K, (6, 6, 1)),
        L.Flatten(),
        L.Dense(7, activation="relu"),
        L.Dense(3),
        L.Activation("softmax"),
    ])


BUILDERS = {"cnn": _build_cnn, "small": _build_small,
            "softmax_layer": _build_softmax_layer}


def _train_and_save(K, builder, path, train, seed=0):
    """Builds, trains one epoch on 64 random samples (or, to save time,
    draws random weights, biases included) and saves as .h5."""
    K.utils.set_random_seed(seed)
    m = builder(K)
    rs = np.random.RandomState(seed)
    if train:
        shape = tuple(m.input_shape[1:])
        x = rs.rand(64, *shape).astype("float32")
        y = rs.randint(0, m.output_shape[-1], 64)
        m.compile(optimizer=K.optimizers.Adam(0.01),
                  loss="sparse_categorical_crossentropy")
        m.fit(x, y, batch_size=16, epochs=1, verbose=0)
    else:
        m.set_weights([rs.normal(0, 0.5, w.shape).astype("float32")
                       for w in m.get_weights()])
    m.save(path)
    return m


@pytest.fixture(scope="module", params=["tf_keras", "keras3"])
def saved(request, tmp_path_factory):
    """{model name: (keras model, .h5 path)} for one framework."""
    K = _framework(request.param)
    d = tmp_path_factory.mktemp(request.param)
    out = {}
    for name, builder in BUILDERS.items():
        path = str(d / f"{name}.h5")
        out[name] = (_train_and_save(K, builder, path, train=name == "cnn"),
                     path)
    return request.param, K, out


def _inputs(model, n=32, seed=1):
    return np.random.RandomState(seed).rand(
        n, *model.input_shape).astype("float32")


def _softmax(z):
    return np.asarray(jax.nn.softmax(z, axis=-1))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_predictions_equal_keras(saved, name):
    _, _, models = saved
    km, path = models[name]
    model, variables = keras_h5.load(path)
    x = _inputs(model)
    ours = np.asarray(jax.jit(model.apply)(variables, x))
    theirs = np.asarray(km(x, training=False))
    assert ours.shape == theirs.shape == (32, model.num_classes)
    if model.output_softmax:
        # Keras outputs probabilities; we return the logits before them.
        assert np.abs(_softmax(ours) - theirs).max() < TOL
        # Logits agree up to the per-row constant softmax removes.
        ours_log = ours - jax.nn.logsumexp(ours, axis=-1, keepdims=True)
        assert np.abs(ours_log - np.log(theirs)).max() < 1e-4
    else:
        assert np.abs(ours - theirs).max() < TOL
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_variables_match_init_and_layers(saved):
    _, _, models = saved
    model, variables = keras_h5.load(models["cnn"][1])
    # eval_shape traces model.init exactly, without compiling its random
    # initialisers (seconds on a loaded 2-core machine).
    init = jax.eval_shape(model.init, jax.random.key(0))
    assert (jax.tree_util.tree_structure(init)
            == jax.tree_util.tree_structure(variables))
    assert (jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), init)
            == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), variables))
    kinds = [s.kind for s in model.layers]
    assert kinds == ["conv", "relu", "bn", "maxpool", "conv", "relu",
                     "avgpool", "bn", "conv", "relu", "flatten", "dropout",
                     "dense", "relu", "bn", "dense"]
    names = model.layer_names()
    assert names[1] == "conv2d_relu" and "flat" in names
    assert model.output_softmax and model.num_classes == 4
    assert model.input_shape == (15, 15, 2)
    bn = model.layer_names(kinds=("bn",))
    assert set(variables["params"][bn[1]]) == {"bias"}    # scale=False
    assert set(variables["params"][bn[2]]) == {"scale"}   # center=False
    # Training moved the moving statistics away from their initial 0 / 1.
    stats = variables["batch_stats"][bn[0]]
    assert np.abs(stats["mean"]).max() > 1e-2
    assert np.abs(stats["var"] - 1).max() > 1e-2
    small, _ = keras_h5.load(models["small"][1])
    assert not small.output_softmax and small.num_classes == 3
    soft, _ = keras_h5.load(models["softmax_layer"][1])
    assert soft.output_softmax and soft.layers[-1].kind == "dense"


def test_flatten_order_equals_keras(saved):
    """Keras channels_last Flatten == our NHWC reshape, checked directly."""
    _, K, models = saved
    km, path = models["cnn"]
    model, variables = keras_h5.load(path)
    x = _inputs(model, n=8)
    upto_flat = K.Model(km.inputs[0], km.get_layer("flat").output)
    flat_k = upto_flat(x, training=False)
    _, acts = model.apply(variables, x, capture=("flat",))
    assert np.abs(np.asarray(acts["flat"]["output"])
                  - np.asarray(flat_k)).max() < TOL


def test_file_layouts(saved):
    """The two frameworks really write the two different layouts."""
    framework, _, models = saved
    with h5py.File(models["cnn"][1], "r") as f:
        group = f["model_weights/conv2d"]
        names = [str(n) for n in group.attrs["weight_names"]]
        version = str(f.attrs["keras_version"])
        config = json.loads(f.attrs["model_config"])
    first = config["config"]["layers"][0]["config"]
    if framework == "tf_keras":
        assert version.startswith("2.")
        assert names == ["conv2d/kernel:0", "conv2d/bias:0"]
        assert "batch_input_shape" in first
    else:
        assert version.startswith("3.")
        assert names == ["sequential/conv2d/kernel", "sequential/conv2d/bias"]
        assert "batch_shape" in first


def _edit_config(src, dst, edit):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        edit(config["config"]["layers"])
        f.attrs["model_config"] = json.dumps(config)
    return dst


def _strip_keras3_keys(obj):
    if isinstance(obj, dict):
        return {k: _strip_keras3_keys(v) for k, v in obj.items()
                if k not in ("module", "registered_name", "optional")}
    if isinstance(obj, list):
        return [_strip_keras3_keys(v) for v in obj]
    return obj


@pytest.mark.parametrize("bare_list", [False, True])
def test_old_style_files(saved, tmp_path, bare_list):
    """Older Keras-2 files: model_config and weight_names stored as bytes
    (h5py 2 / TF 2.3 era), no "module"/"registered_name" keys, no
    InputLayer (batch_input_shape on the first layer), no optimizer state;
    with ``bare_list`` the Sequential config is the bare layer list
    (Keras 2.0/2.1)."""
    _, _, models = saved
    km, src = models["cnn"]
    dst = str(tmp_path / "old.h5")
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        config = _strip_keras3_keys(json.loads(f.attrs["model_config"]))
        layers = config["config"]["layers"]
        inp = layers.pop(0)["config"]
        layers[0]["config"]["batch_input_shape"] = (
            inp.get("batch_input_shape") or inp["batch_shape"])
        if bare_list:
            config["config"] = layers
        f.attrs["model_config"] = np.bytes_(json.dumps(config))
        f.attrs["keras_version"] = np.bytes_("2.4.0")
        for g in f["model_weights"].values():
            names = [str(n).encode() for n in g.attrs["weight_names"]]
            g.attrs["weight_names"] = np.array(names, dtype="S")
        if "optimizer_weights" in f:
            del f["optimizer_weights"]
    model, variables = keras_h5.load(dst)
    assert model.input_shape == (15, 15, 2)
    x = _inputs(model, n=4)
    assert np.abs(_softmax(jax.jit(model.apply)(variables, x))
                  - np.asarray(km(x, training=False))).max() < TOL


def test_softmax_not_last_is_error(saved, tmp_path):
    _, _, models = saved

    def edit(layers):
        layers[1]["config"]["activation"] = "softmax"

    path = _edit_config(models["cnn"][1], str(tmp_path / "m.h5"), edit)
    with pytest.raises(keras_h5.KerasImportError,
                       match=r"Conv2D layer 'conv2d'.*softmax.*last layer"):
        keras_h5.load(path)


def test_channels_first_and_activation_errors(saved, tmp_path):
    _, _, models = saved

    def channels_first(layers):
        layers[4]["config"]["data_format"] = "channels_first"

    path = _edit_config(models["cnn"][1], str(tmp_path / "cf.h5"),
                        channels_first)
    with pytest.raises(keras_h5.KerasImportError,
                       match=r"Conv2D layer 'conv2d_1'.*channels_first"):
        keras_h5.load(path)

    def tanh(layers):
        layers[-3]["config"]["activation"] = "tanh"

    path = _edit_config(models["cnn"][1], str(tmp_path / "tanh.h5"), tanh)
    with pytest.raises(keras_h5.KerasImportError,
                       match=r"Dense layer 'dense'.*'tanh'.*relu"):
        keras_h5.load(path)


def test_unsupported_layer_is_named(saved, tmp_path):
    framework, K, _ = saved
    L = K.layers
    m = K.Sequential([_input(K, (8, 8, 1)), L.Conv2D(2, 3),
                      L.UpSampling2D(name="up"), L.Flatten(), L.Dense(2)])
    path = str(tmp_path / "up.h5")
    m.save(path)
    with pytest.raises(keras_h5.KerasImportError) as err:
        keras_h5.load(path)
    msg = str(err.value)
    assert "UpSampling2D layer 'up'" in msg
    assert "supported layers" in msg and "BatchNormalization" in msg


def test_weights_only_file_is_error(tmp_path):
    K = _framework("tf_keras")
    m = _build_softmax_layer(K)
    path = str(tmp_path / "w.h5")
    m.save_weights(path)
    with pytest.raises(keras_h5.KerasImportError, match="only weights"):
        keras_h5.load(path)


def test_missing_file_and_input_shape_override(saved, tmp_path):
    _, _, models = saved
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        keras_h5.load(str(tmp_path / "nope.h5"))
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(keras_h5.KerasImportError, match="not a readable HDF5"):
        keras_h5.load(str(tmp_path / "text.h5"))
    # A fully convolutional head accepts another input size.
    model, variables = keras_h5.load(models["small"][1],
                                     input_shape=(13, 13, 3))
    assert model.input_shape == (13, 13, 3)
    assert model.apply(variables, np.zeros((2, 13, 13, 3))).shape == (2, 3)
    # A wrong input size for a Flatten->Dense model is a clear error.
    with pytest.raises(keras_h5.KerasImportError, match="do not fit"):
        keras_h5.load(models["cnn"][1], input_shape=(21, 21, 2))
