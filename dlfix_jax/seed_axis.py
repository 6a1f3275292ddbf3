"""Running a per-model function over a stack of S models (the seed axis).

The study fixes every model S times (one run per seed), so fixed variables
carry a leading seed axis: ``stacked = stack_variables([v0, v1, v2])`` gives
leaves of shape ``(S, ...)``. :func:`map_seeds` runs ``fn(variables, *args)``
for every seed and stacks the results, with one of three strategies:

* ``"sequential"`` — a Python loop over seeds calling one jitted function
  (the seed index is traced, so it compiles once). XLA sees exactly the
  per-model computation.
* ``"vmap"`` — ``jax.jit(jax.vmap(fn))``: one batched computation. On GPU/TPU
  this fills the device; on XLA CPU, batching the *weights* of a convolution
  turns it into a grouped convolution, which is far slower than S ordinary
  ones (measured ~10x for LeNet5; see ``benchmarks/eval_seeds.py``).
* ``"lax_map"`` — ``jax.lax.map`` inside one jit: a compiled loop over seeds
  (no grouped kernels, no Python dispatch per seed).
* ``"sharded"`` — the seed axis split over the local devices with
  ``jax.shard_map`` on a 1-D ``"seeds"`` mesh, ``lax.map`` on each device:
  bit-identical to ``"lax_map"`` on one device (tested with 8 fake CPU
  devices). ``auto`` picks it nowhere yet: no multi-device machine was
  measured.
* ``"auto"`` — the fastest per backend and task as measured by
  ``benchmarks/eval_seeds.py`` (BENCHMARKS.md): on XLA CPU with jax 0.10.2,
  ``vmap`` for prediction (0.4-0.6x of sequential's time for LeNet5 and
  VGG16 at S = 3, 10) and ``sequential`` for PGD (vmap and lax.map were
  within ±5 % to 20 % slower). On GPU/TPU ``vmap`` (not measured here: no
  accelerator was available; batching S models fills the device).

The grouped-convolution slowdown reported earlier for ``vmap`` on CPU (10x)
did not reproduce with jax 0.10.2; the per-task table below is what the
benchmark measured and should be re-checked when jax changes.

Every strategy computes the same numbers up to floating-point reassociation
(reductions may differ by about one ulp), so random draws made *outside* the
function are identical under all strategies.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlfix_jax import predict as predict_lib

STRATEGIES = ("sequential", "vmap", "lax_map", "sharded", "auto")

# (backend, task) -> strategy chosen by "auto"; measured with
# benchmarks/eval_seeds.py (CPU). Unlisted pairs fall back to "sequential".
AUTO_STRATEGY = {
    ("cpu", "predict"): "vmap", ("cpu", "pgd"): "sequential",
    ("gpu", "predict"): "vmap", ("gpu", "pgd"): "vmap",
    ("cuda", "predict"): "vmap", ("cuda", "pgd"): "vmap",
    ("rocm", "predict"): "vmap", ("rocm", "pgd"): "vmap",
    ("tpu", "predict"): "vmap", ("tpu", "pgd"): "vmap",
}


def stack_variables(trees: Sequence[Any]) -> Any:
    """Stacks S variable trees of identical structure on a new leading axis.

    Raises:
      ValueError: empty list, or trees whose structure or leaf shapes differ
        (e.g. models of different architectures, which cannot share a stack).
    """
    trees = list(trees)
    if not trees:
        raise ValueError("stack_variables needs at least one variable tree")
    struct0 = jax.tree_util.tree_structure(trees[0])
    shapes0 = [np.shape(a) for a in jax.tree_util.tree_leaves(trees[0])]
    for i, t in enumerate(trees[1:], start=1):
        if jax.tree_util.tree_structure(t) != struct0:
            raise ValueError(f"variable tree {i} has a different structure "
                             "from tree 0; models must share an architecture "
                             "to be stacked")
        shapes = [np.shape(a) for a in jax.tree_util.tree_leaves(t)]
        if shapes != shapes0:
            raise ValueError(f"variable tree {i} has leaf shapes different "
                             "from tree 0; cannot stack")
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def num_seeds(stacked: Any) -> int:
    """The size S of the leading seed axis (checked to agree over leaves)."""
    sizes = {np.shape(a)[0] if np.ndim(a) else None
             for a in jax.tree_util.tree_leaves(stacked)}
    if not sizes:
        raise ValueError("stacked variables have no leaves")
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"leaves disagree on the leading seed axis: {sizes}")
    return sizes.pop()


def unstack_variables(stacked: Any) -> list[Any]:
    """Inverse of :func:`stack_variables`: a list of S variable trees."""
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
            for i in range(num_seeds(stacked))]


def to_device(tree: Any) -> Any:
    """Puts every leaf on the default device once (NumPy leaves would
    otherwise be transferred again on every call)."""
    return jax.tree_util.tree_map(jnp.asarray, tree)


def resolve_strategy(strategy: str = "auto", backend: str | None = None,
                     task: str = "predict") -> str:
    """Maps ``"auto"`` to a concrete strategy for ``backend`` (default: JAX's
    default backend) and ``task`` ("predict" or "pgd"; other tasks get the
    safe "sequential" on CPU); checks the name of any other strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown seed strategy {strategy!r}; "
                         f"choose one of {STRATEGIES}")
    if strategy != "auto":
        return strategy
    backend = backend or jax.default_backend()
    default = "sequential" if backend == "cpu" else "vmap"
    return AUTO_STRATEGY.get((backend, task), default)


@functools.lru_cache(maxsize=256)
def seed_mapper(fn: Callable, strategy: str = "auto", task: str = "predict"
                ) -> Callable:
    """A function ``(stacked, *args) -> stacked outputs`` running ``fn`` per seed.

    ``fn(variables, *args)`` must be jittable; ``args`` are shared by all
    seeds (not mapped). The mapper is cached per ``(fn, strategy)``, so pass
    a stable ``fn`` (a module-level or cached function) to avoid recompiling.

    Args:
      fn: per-model function.
      strategy: one of :data:`STRATEGIES`.
      task: what ``"auto"`` optimises for ("predict", "pgd", ...).

    Returns:
      A callable whose outputs have a leading seed axis of size S.
    """
    strategy = resolve_strategy(strategy, task=task)
    if strategy == "vmap":
        return jax.jit(_vmap_first(fn))
    if strategy == "sharded":
        return _sharded(fn)
    if strategy == "lax_map":
        @jax.jit
        def run_map(stacked, *args):
            return jax.lax.map(lambda v: fn(v, *args), stacked)
        return run_map

    @jax.jit
    def one(stacked, i, *args):
        v = jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
            stacked)
        return fn(v, *args)

    def run_seq(stacked, *args):
        outs = [one(stacked, jnp.int32(i), *args)
                for i in range(num_seeds(stacked))]
        return jax.tree_util.tree_map(lambda *o: jnp.stack(o), *outs)

    return run_seq


def seed_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``"seeds"`` over ``devices`` (default: all local)."""
    devices = list(devices if devices is not None else jax.local_devices())
    return jax.sharding.Mesh(np.asarray(devices), ("seeds",))


def _sharded(fn: Callable, devices=None) -> Callable:
    """The seed axis split over the local devices (``shard_map`` on a
    ``"seeds"`` mesh): each device runs ``lax.map`` over its own seeds, so a
    seed's computation is the same program as under ``"lax_map"`` on one
    device (bit-identical results). S is padded up to a multiple of the
    device count by repeating the last seed; the padding is dropped."""
    mesh = seed_mesh(devices)
    n_dev = mesh.devices.size
    P = jax.sharding.PartitionSpec

    def local(stacked, *args):
        return jax.lax.map(lambda v: fn(v, *args), stacked)

    def run(stacked, *args):
        s = num_seeds(stacked)
        pad_n = (-s) % n_dev
        if pad_n:
            stacked = jax.tree_util.tree_map(
                lambda a: jnp.concatenate(
                    [a, jnp.repeat(a[-1:], pad_n, axis=0)]), stacked)
        in_specs = (jax.tree_util.tree_map(lambda _: P("seeds"), stacked),) + \
            tuple(jax.tree_util.tree_map(lambda _: P(), a) for a in args)
        mapped = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                                       out_specs=P("seeds")))
        out = mapped(stacked, *args)
        return jax.tree_util.tree_map(lambda a: a[:s], out)

    return run


def _vmap_first(fn: Callable) -> Callable:
    """vmaps ``fn`` over its first argument only."""
    def run(stacked, *args):
        return jax.vmap(lambda v: fn(v, *args))(stacked)
    return run


def map_seeds(fn: Callable, stacked: Any, *args, strategy: str = "auto",
              task: str = "predict") -> Any:
    """Runs ``fn(variables_s, *args)`` for each seed s; see :func:`seed_mapper`."""
    return seed_mapper(fn, strategy, task)(stacked, *args)


# ---------------------------------------------------------------------------
# Batched prediction of a stack of models (per-model kernels: predict.py).

_logits_fn = predict_lib.model_logits
_labels_fn = predict_lib.model_labels
pad = predict_lib.pad


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def map_batches(fn: Callable, model_fn_stacked: Any, x, *, batch_size: int,
                strategy: str) -> Any:
    """Applies ``fn`` (a per-model function of (variables, x_batch)) to every
    seed and every batch of ``x``; concatenates outputs on axis 1 (inputs)."""
    x = np.asarray(x)
    n = len(x)
    if n == 0:
        raise ValueError("no inputs to evaluate")
    batch_size = max(1, min(batch_size, n))
    mapper = seed_mapper(fn, strategy)
    model_fn_stacked = to_device(model_fn_stacked)
    outs = []
    for start, stop in _batches(n, batch_size):
        xb = jnp.asarray(pad(x[start:stop], batch_size))
        out = mapper(model_fn_stacked, xb)
        outs.append(jax.tree_util.tree_map(
            lambda a, k=stop - start: np.asarray(a[:, :k]), out))
    return jax.tree_util.tree_map(lambda *o: np.concatenate(o, axis=1), *outs)


def predict_logits_stack(model, stacked_vars, x, batch_size: int = 256,
                         strategy: str = "auto") -> np.ndarray:
    """Logits of every stacked model on ``x``: (S, N, num_classes) float32."""
    return map_batches(_logits_fn(model), stacked_vars, x,
                       batch_size=batch_size, strategy=strategy)


def predict_stack(model, stacked_vars, x, batch_size: int = 256,
                  strategy: str = "auto", return_finite: bool = False):
    """Predicted labels of every stacked model on ``x``: (S, N) int32.

    With ``return_finite=True`` also returns an (S, N) bool array telling
    whether all logits of that input were finite (NaN/Inf detection for
    *corrupted* models; argmax of NaN logits is meaningless).
    """
    labels, finite = map_batches(_labels_fn(model), stacked_vars, x,
                                 batch_size=batch_size, strategy=strategy)
    return (labels, finite) if return_finite else labels


def predict(model, variables, x, batch_size: int = 256) -> np.ndarray:
    """Predicted labels of one (unstacked) model: (N,) int32."""
    return predict_lib.predict(model, variables, x, batch_size)


# ---------------------------------------------------------------------------
# Fixed models given as a stack or as a list of (model, variables).


def _same_architecture(a, b) -> bool:
    if a is b:
        return True
    return (a.layers is not None and a.layers == b.layers
            and type(a.module) is type(b.module)
            and tuple(a.input_shape) == tuple(b.input_shape)
            and a.num_classes == b.num_classes
            and a.output_softmax == b.output_softmax)


class ModelGroups(list):
    """A list of ``(model, stacked_variables, positions)`` (the result of
    :func:`group_models`; passing it to :func:`group_models` again is free)."""


def group_models(fixed, default_model=None) -> ModelGroups:
    """Normalises fixed models into stackable groups.

    Args:
      fixed: a list of ``(model, variables)`` pairs (models may differ, e.g.
        imported from Keras files), or a ``(model, stacked_variables)`` tuple,
        or a stacked variable tree alone (then ``default_model`` is used).
      default_model: the model of a bare stacked tree.

    Returns:
      A list of ``(model, stacked_variables, positions)``: consecutive pairs
      with the same architecture and variable shapes are stacked together so
      the chosen seed strategy applies; ``positions`` are their indices in
      the seed order.
    """
    if isinstance(fixed, ModelGroups):
        return fixed
    if isinstance(fixed, tuple) and len(fixed) == 2 and hasattr(fixed[0],
                                                                "apply"):
        model, stacked = fixed
        return ModelGroups([(model, stacked,
                             list(range(num_seeds(stacked))))])
    if isinstance(fixed, dict):
        if default_model is None:
            raise ValueError("a bare stacked variable tree needs a model")
        return ModelGroups([(default_model, fixed,
                             list(range(num_seeds(fixed))))])
    pairs = list(fixed)
    if not pairs:
        raise ValueError("no fixed models given")
    groups: list[tuple[Any, list, list[int]]] = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"fixed[{i}] must be a (model, variables) pair")
        model, variables = pair
        if groups:
            m0, vs, pos = groups[-1]
            shapes = lambda t: (jax.tree_util.tree_structure(t),  # noqa: E731
                                [np.shape(a) for a in
                                 jax.tree_util.tree_leaves(t)])
            if _same_architecture(m0, model) and shapes(vs[0]) == shapes(
                    variables):
                vs.append(variables)
                pos.append(i)
                continue
        groups.append((model, [variables], [i]))
    return ModelGroups((m, stack_variables(vs), pos) for m, vs, pos in groups)


def total_seeds(groups) -> int:
    return sum(len(p) for _, _, p in groups)


def scatter_groups(groups, outs: Sequence[np.ndarray]) -> np.ndarray:
    """Re-assembles per-group outputs (leading axis = group size) in seed
    order."""
    n = total_seeds(groups)
    first = np.asarray(outs[0])
    res = np.empty((n,) + first.shape[1:], first.dtype)
    for (_, _, pos), o in zip(groups, outs):
        res[pos] = np.asarray(o)
    return res
