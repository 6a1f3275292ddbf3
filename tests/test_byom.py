"""Bring your own model (issue 7): ``dlfix fix --base=<Keras .h5>`` never
retrains, ``dlfix evaluate`` reads what fix writes, a fixed model exports
back to a Keras .h5 that Keras 3 and tf_keras load and predict the same
within 1e-5; a native ``.keras`` file gets a one-line error.

The acceptance test runs on the study's own original model
(``../shared/data/fixingstudy/mnist_lenet5_original.h5``) and MNIST, and
skips when they are absent; the other tests use the embedded digits.
Commands run as ``python -m dlfix_jax.cli`` (= the ``dlfix`` console
script) from a directory other than the repository root.
"""

import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dlfix_jax import data, models  # noqa: E402
from dlfix_jax.models import keras_h5  # noqa: E402
from dlfix_jax.study import compare  # noqa: E402
from dlfix_jax.study import fix as fix_lib  # noqa: E402
from dlfix_jax.training import checkpoint  # noqa: E402
from tests.conftest import shared_data_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
H5 = "fixingstudy/mnist_lenet5_original.h5"
# A small Arachne budget: the point is the pipeline, not the repair rate.
ARACHNE_TINY = ["--fixer=population=10", "--fixer=max_generations=3"]

pytestmark = pytest.mark.filterwarnings(
    "ignore:You are saving your model as an HDF5 file:UserWarning")


def _dlfix(args, cwd):
    """Runs ``dlfix ARGS`` (as ``python -m dlfix_jax.cli``) in ``cwd``."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(
                   [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, "-m", "dlfix_jax.cli"] + args,
                          cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _outputs(model, variables, x):
    """What the Keras model predicts: probabilities after a softmax."""
    z = np.asarray(model.apply(variables, x))
    return np.asarray(jax.nn.softmax(z, axis=-1)) if model.output_softmax else z


def _random_variables(model, seed):
    """Random variables of ``model``'s structure without compiling its
    init (BatchNorm variances positive)."""
    rs = np.random.RandomState(seed)
    return jax.tree_util.tree_map(
        lambda a: np.abs(rs.normal(0.5, 0.3, a.shape)).astype(a.dtype) + 0.1,
        model.abstract_variables())


def _keras_predictions(path, x):
    """{framework: predictions of the .h5 at ``path`` loaded by it}."""
    out = {}
    for name in ("keras", "tf_keras"):
        K = pytest.importorskip(name)
        km = K.models.load_model(path, compile=False)
        out[name] = np.asarray(km.predict(x, verbose=0))
    return out


# --------------------------------------------------------------------------
# Acceptance: the study's original MNIST LeNet5 (.h5), end to end.


@pytest.fixture(scope="module")
def study_fix(tmp_path_factory):
    """``dlfix fix --base=<study .h5> --approach=arachne --seeds=3`` with
    ``--export_h5`` for seed 0, run once for the module."""
    h5 = shared_data_dir(H5)
    shared_data_dir("mnist")
    root = tmp_path_factory.mktemp("byom")
    w = root / "W"
    exported = root / "arachne_seed0.h5"
    p = _dlfix(["fix", f"--base={h5}", "--dataset=mnist",
                "--approach=arachne", "--seeds=3", f"--workdir={w}",
                f"--export_h5={exported}"] + ARACHNE_TINY, cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    return h5, root, w, exported, p.stdout


@pytest.mark.shared_data
def test_fix_h5_base_is_never_retrained(study_fix):
    h5, _, w, _, stdout = study_fix
    assert ("arachne on mnist/keras:mnist_lenet5_original.h5 x3: status ok"
            in stdout)
    assert not (w / "base").exists()
    m = json.loads((w / "arachne" / "metrics.json").read_text())
    assert m["status"] == "ok" and m["base"] == os.path.abspath(h5)
    assert m["fixer_config"]["max_generations"] == 3
    assert m["orig"]["test_acc"] == pytest.approx(97.90)  # its known score
    assert [r["status"] for r in m["seeds"]] == ["ok"] * 3
    # The fixed models keep the imported architecture.
    base_model, base_vars, _ = checkpoint.load_model(h5)
    for s in range(3):
        model, variables, _ = checkpoint.load_model(
            str(w / "arachne" / f"seed{s}"))
        assert model == base_model
        assert (jax.tree_util.tree_structure(variables)
                == jax.tree_util.tree_structure(base_vars))


@pytest.mark.shared_data
def test_evaluate_reads_what_fix_writes(study_fix):
    h5, root, w, _, _ = study_fix
    out = root / "eval.json"
    seed_dirs = [f"--fixed={w / 'arachne' / f'seed{s}'}" for s in range(3)]
    p = _dlfix(["evaluate", "--dataset=mnist", f"--original={h5}",
                f"--fixed={w / 'arachne'}", seed_dirs[1], f"--out={out}"],
               cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    # W/arachne stands for its three seeds, in seed order.
    assert r["n_fixed"] == 4 and r["fixed"][:3] == [
        str(w / "arachne" / f"seed{s}") for s in range(3)]
    assert r["acc_orig"] == pytest.approx(97.90) and r["wrong_orig"] == 105
    m = json.loads((w / "arachne" / "metrics.json").read_text())
    for s, rec in enumerate(m["seeds"]):  # the same numbers as fix's own
        assert r["acc"][s] == pytest.approx(rec["acc"])
        assert (r["repaired"][s], r["broken"][s]) == (rec["repaired"],
                                                     rec["broken"])
    assert r["acc"][3] == r["acc"][1]
    assert "fixed model 3" in p.stdout and "repaired numbers" in p.stdout


@pytest.mark.shared_data
def test_exported_fixed_model_loads_in_keras(study_fix):
    _, _, w, exported, _ = study_fix
    model, variables, _ = checkpoint.load_model(str(w / "arachne" / "seed0"))
    x = data.load("mnist", seed=0).test.x[:256]
    ours = _outputs(model, variables, x)
    for name, pred in _keras_predictions(str(exported), x).items():
        assert pred.shape == ours.shape, name
        np.testing.assert_allclose(pred, ours, atol=TOL, err_msg=name)
    # And back: the export re-imports to the same variables.
    back, back_vars = keras_h5.load(str(exported))
    assert back.output_softmax and back.layers == model.layers
    jax.tree_util.tree_map(np.testing.assert_array_equal, back_vars,
                           variables)


# --------------------------------------------------------------------------
# Without ../shared: digits, the loader, the .keras error, the command.


def test_native_keras_file_is_one_line_error(tmp_path):
    keras = pytest.importorskip("keras")
    km = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                           keras.layers.Dense(10)])
    path = str(tmp_path / "mine.keras")
    km.save(path)
    with pytest.raises(checkpoint.CheckpointError, match=r"save the model "
                       r"as HDF5.*\.h5"):
        checkpoint.load_model(path)
    p = _dlfix(["fix", f"--base={path}", "--dataset=digits",
                "--approach=arachne", "--seeds=1",
                f"--workdir={tmp_path / 'W'}"], cwd=tmp_path)
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, p.stderr[-2000:]
    assert "native Keras .keras" in errors[0] and ".h5" in errors[0]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "W" / "arachne").exists()


def _sequential_zoo():
    """A model with every exportable layer kind, random BatchNorm stats."""
    s = models.spec
    layers = [s("conv", "c1", features=4, kernel=(3, 3), padding="SAME"),
              s("bn", "bn1", momentum=0.9, epsilon=1e-3),
              s("relu", "r1"),
              s("maxpool", "p1", window=(2, 2)),
              s("conv", "c2", features=5, kernel=(2, 2), strides=(2, 2),
                use_bias=False),
              s("avgpool", "p2", window=(3, 3), strides=(1, 1),
                padding="SAME"),
              s("bn", "bn2", use_scale=False),
              s("gap", "gap"),
              s("flatten", "flat"),  # identity on rank 2, as in Keras
              s("dropout", "drop", rate=0.3),
              s("dense", "d1", features=6)]
    m = models.sequential("mine", layers, (9, 9, 2), 6)
    v = _random_variables(m, 3)
    v["params"] = jax.tree_util.tree_map(lambda a: a - 0.6, v["params"])
    return m, v


def test_export_h5_predicts_the_same_in_keras(tmp_path):
    m, v = _sequential_zoo()
    path = str(tmp_path / "mine.h5")
    keras_h5.export_h5(m, v, path)
    x = np.random.RandomState(2).rand(16, *m.input_shape).astype("float32")
    ours = _outputs(m, v, x)  # logits: these models have no softmax
    for name, pred in _keras_predictions(path, x).items():
        np.testing.assert_allclose(pred, ours, atol=TOL, err_msg=name)
    back, back_vars = keras_h5.load(path)
    assert not back.output_softmax
    assert [(s.kind, s.name) for s in back.layers] == [
        (s.kind, s.name) for s in m.layers]
    jax.tree_util.tree_map(np.testing.assert_array_equal, back_vars, v)


def test_export_refuses_non_sequential(tmp_path):
    m = models.get("resnet18")
    with pytest.raises(keras_h5.KerasImportError, match="not sequential"):
        keras_h5.export_h5(m, {}, str(tmp_path / "r.h5"))
    assert not (tmp_path / "r.h5").exists()


def test_fix_output_layout_is_a_model_on_digits(tmp_path):
    """What fix writes per seed (``save_model``: model.json + variables) is
    read by the one loader, an approach dir stands for its seeds in
    evaluate, and ``--base`` is checked against the dataset before any
    fixing. (The fixer run itself is the acceptance test above.)"""
    ds = data.load("digits", seed=0)
    m = models.get("lenet5", num_classes=ds.num_classes,
                   input_shape=ds.input_shape)
    base = str(tmp_path / "mine")
    v0 = _random_variables(m, 0)
    checkpoint.save_model(base, m, v0)
    w = tmp_path / "W" / "arachne"
    for s in (1, 0, 10):  # written out of order; read in seed order
        vs = jax.tree_util.tree_map(lambda a, s=s: a * (1 + 0.01 * s), v0)
        checkpoint.save_model(str(w / f"seed{s}"), m, vs)
    (w / "metrics.json").write_text("{}")
    seeds = checkpoint.fixed_model_dirs(str(w))
    assert [os.path.basename(p) for p in seeds] == ["seed0", "seed1",
                                                    "seed10"]
    # The whole fix workdir: every approach's seeds, not its base model.
    checkpoint.save_model(str(tmp_path / "W" / "base"), m, v0)
    checkpoint.save_model(str(tmp_path / "W" / "ra" / "seed0"), m, v0)
    assert checkpoint.fixed_model_dirs(str(tmp_path / "W")) == seeds + [
        str(tmp_path / "W" / "ra" / "seed0")]
    model, variables, hist = checkpoint.load_model(seeds[0])
    assert model == m and hist is None
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, v0)
    r = compare.evaluate_paths("digits", base, [str(w)])
    assert r["n_fixed"] == 3 and r["fixed"] == seeds
    assert r["repaired"][0] == 0 and r["broken"][0] == 0  # seed0 == base
    with pytest.raises(checkpoint.CheckpointError, match="seed0"):
        checkpoint.load_model(str(w))  # names a seed dir to pass instead
    m3 = models.get("lenet5", num_classes=3, input_shape=m.input_shape)
    three = str(tmp_path / "three")
    checkpoint.save_model(three, m3, _random_variables(m3, 0))
    with pytest.raises(ValueError, match="3 classes"):
        fix_lib.run(fix_lib.dataset_config("digits"), "arachne", 1,
                    str(tmp_path / "W2"), base=three)
    assert not (tmp_path / "W2").exists()


def test_model_json_round_trip():
    """``model.json`` (what fix writes beside the variables) rebuilds an
    equal model: zoo models, a Keras-like sequential one, nested options."""
    s = models.spec
    odd = models.sequential(
        "keras:x.h5", [s("conv", "c", features=2, kernel=(3, 3),
                         padding=((1, 1), (0, 0))),
                       s("flatten", "f"), s("dense", "d", features=3)],
        (4, 4, 1), 3, output_softmax=True)
    for m in [models.get(n) for n in ("lenet5", "vgg16", "resnet18")] + [odd]:
        d = json.loads(json.dumps(checkpoint.model_to_json(m)))
        assert checkpoint.model_from_json(d) == m, m.name
    with pytest.raises(checkpoint.CheckpointError, match="model description"):
        checkpoint.model_from_json({"name": "lenet5"}, "bad.json")


def test_dlfix_help_outside_the_repo(tmp_path):
    p = _dlfix(["--help"], cwd=tmp_path)
    assert p.returncode == 0
    for cmd in ("train", "fix", "evaluate", "study", "report", "export"):
        assert f"  {cmd} " in p.stdout
    p = _dlfix(["fix", "--help"], cwd=tmp_path)
    assert "--base" in p.stdout  # (absl exits 1 after --help)
    assert "--dataset" in p.stdout
    p = _dlfix(["nope"], cwd=tmp_path)
    assert p.returncode == 2 and "unknown command" in p.stderr
    script = shutil.which("dlfix", path=os.path.dirname(sys.executable))
    if script:  # the console script that `pip install` (make) puts there
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        p = subprocess.run([script, "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "evaluate" in p.stdout
        # A repository config imports experiments.configs.common: found
        # from any directory (then the unknown fixer is the error).
        p = subprocess.run(
            [script, "fix", f"--config={ROOT}/experiments/configs/"
             "digits_lenet5.py", "--approach=no_such_fixer",
             f"--workdir={tmp_path / 'W'}"], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=300)
        assert p.returncode == 2, p.stderr[-2000:]
        assert "no_such_fixer" in p.stderr and "Traceback" not in p.stderr


def test_config_import_root(tmp_path):
    from dlfix_jax import cli
    cfg = os.path.join(ROOT, "experiments", "configs", "mnist_lenet5.py")
    assert cli._config_import_root(["x", f"--config={cfg}"]) == ROOT
    assert cli._config_import_root(["x", "--config", cfg + ":arg"]) == ROOT
    (tmp_path / "c.py").write_text("")
    assert cli._config_import_root(["x", f"--config={tmp_path}/c.py"]) is None
    assert cli._config_import_root(["x", "--workdir=w"]) is None
