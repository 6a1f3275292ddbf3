"""One strategy layer for every stacked axis: seeds, models, population members.

Many things in the library are a *stack*: the S fixed models of the study's
seeds (``stacked = stack_variables([v0, v1, v2])`` gives leaves of shape
``(S, ...)``), Apricot's K reduced models (and their training states), a
search's population of P candidates. Every batched path runs its per-member
function through this module, with one of these strategies:

* ``"sequential"`` — a Python loop over members calling one jitted function
  (the member index is traced, so it compiles once). XLA sees exactly the
  per-member computation. Inside a trace (a search's population, scored
  within a ``lax.while_loop``) no Python loop is possible: there
  ``"sequential"`` is the compiled loop of ``"lax_map"``.
* ``"vmap"`` — ``jax.jit(jax.vmap(fn))``: one batched computation. On GPU/TPU
  this fills the device; on XLA CPU, batching the *weights* of a convolution
  makes it a grouped convolution, slower than S ordinary ones for training
  (see the table below).
* ``"lax_map"`` — ``jax.lax.map`` inside one jit: a compiled loop over members
  (no grouped kernels, no Python dispatch per member).
* ``"sharded"`` — the stacked axis split over the local devices with
  ``jax.shard_map`` on a 1-D ``"stack"`` mesh, ``lax.map`` on each device:
  bit-identical to ``"lax_map"`` on one device (tested with 8 fake CPU
  devices in ``tests/test_sharding.py`` for prediction, Apricot's K models
  and a search population). The stack is padded to a multiple of the device
  count by repeating its last member; the padding is dropped.
* ``"auto"`` — :data:`AUTO_STRATEGY`, per backend and task.

Tasks (what ``"auto"`` optimises for) and the CPU measurements behind
:data:`AUTO_STRATEGY` (BENCHMARKS.md, "Strategy layer"):

* ``"predict"`` (``benchmarks/eval_seeds.py``): ``lax_map``, 0.92-0.95x
  of sequential's time for LeNet5 (10,000 inputs) and VGG16 at S = 1, 3,
  10; ``vmap`` took 1.9-2.6x (LeNet5) and 4.5-10.8x (VGG16) of
  sequential's time since the CPU convolution paths (small-input im2col,
  the one-channel fence): batching the weights makes XLA:CPU grouped
  convolutions. (Before those paths vmap was 0.4-0.6x; remeasured
  2026-12-05.)
* ``"pgd"`` (``benchmarks/eval_seeds.py``): ``sequential`` (on a quiet
  machine lax.map within 8 % of it, vmap 1.3-1.4x its time).
* ``"train"`` — one training step of K models (Apricot's reduced models,
  ``benchmarks/apricot_rdlms.py``): ``sequential`` (one jitted step per model
  in turn; on a quiet machine at K = 20, vmap 0.31x its examples/s and
  vmap inside a ``lax.scan`` over steps, the earlier path, 0.51x).
* ``"population"`` — scoring a search population inside the search's
  compiled loop when a candidate runs model layers (a hidden Dense layer and
  the layers after it: CARE or GenMuNN on a hidden layer, NeuRecover's and
  Arachne's multi-layer searches; ``benchmarks/population.py`` case
  ``hidden``, DE with P = 100): ``lax_map``, one candidate after another,
  1.3x the evaluations per second of ``vmap`` on a quiet machine (8.1x
  under heavy load).
* ``"population_head"`` — the same when a candidate only adds a low-rank
  update to cached logits (no layer runs per candidate: Arachne, DistrRep's
  merge, NeuRecover on the logits layer, CARE on the last Dense layer's
  input, GenMuNN on a non-sequential model; case ``logits``; DistrRep's
  per-repair swarms, already inside a vmap over repairs, take the
  ``"population"`` task): ``vmap``, 1.7-1.8x
  ``lax_map`` on a quiet machine. (Under heavy load lax_map won 6.9x: the
  vmapped (P, N, C) logits are memory-bound and suffer most from other
  jobs; the quiet measurement decides.) :func:`population_strategy` picks
  between the two.
* ``"fix"`` — the S seeds of one fixer (:func:`fixer_seed_mode`): a fixer
  does host work between its jitted kernels, so its seeds run either one
  after another or in one ``jax.vmap(fix)`` (registry flag ``vmappable``).
  CPU ``auto``: ``sequential``. Measured on the study's MNIST LeNet5 (the
  five vmappable fixers, 3 seeds, ``study_mnist_artifact_reduced.py``,
  BENCHMARKS.md): sequential 129 s against vmap 153 s wall, faster for
  each of Arachne, CARE, DistrRep, GenMuNN and I-Repair. Accelerators:
  ``vmap`` (not measured). GenMuNN and I-Repair give different fixed
  models under the two modes (float reassociation in a GA / many gradient
  steps); each mode is deterministic.

**Unmeasured backends.** GPU, CUDA, ROCm and TPU entries are *not measured*
(no accelerator was available when the table was made); they say ``vmap``
because batching S models fills the device. :data:`MEASURED` lists the
(backend, task) pairs that were measured; ``benchmarks/device_check.py``
re-measures on an accelerator.

Every strategy computes the same numbers up to floating-point reassociation
(a batched reduction may differ from a per-member one by about one ulp;
``lax_map``, ``sharded`` and ``sequential`` run the same per-member program),
so random draws made *outside* the function are identical under all
strategies.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlfix_jax import predict as predict_lib

STRATEGIES = ("sequential", "vmap", "lax_map", "sharded", "auto")
TASKS = ("predict", "pgd", "train", "population", "population_head", "fix")
AXIS = "stack"
"""Name of the mesh axis the ``"sharded"`` strategy splits stacks over."""

_ACCEL = ("gpu", "cuda", "rocm", "tpu")
# (backend, task) -> strategy chosen by "auto". CPU rows are measured
# (MEASURED); accelerator rows are NOT measured (module docstring).
AUTO_STRATEGY = {
    ("cpu", "predict"): "lax_map", ("cpu", "pgd"): "sequential",
    ("cpu", "train"): "sequential", ("cpu", "population"): "lax_map",
    ("cpu", "population_head"): "vmap",
    ("cpu", "fix"): "sequential",
    **{(b, t): "vmap" for b in _ACCEL for t in TASKS},
}
MEASURED = frozenset({("cpu", t) for t in TASKS})
"""The (backend, task) pairs of :data:`AUTO_STRATEGY` backed by a
measurement (BENCHMARKS.md); every other entry is a guess."""


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
    default backend) and ``task`` (one of :data:`TASKS`; an unlisted pair
    gets ``"sequential"`` on CPU, ``"vmap"`` elsewhere); checks the name of
    any other strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown seed strategy {strategy!r} (for any stacked "
                         f"axis: seeds, models, populations); "
                         f"choose one of {STRATEGIES}")
    if strategy != "auto":
        return strategy
    backend = backend or jax.default_backend()
    default = "sequential" if backend == "cpu" else "vmap"
    return AUTO_STRATEGY.get((backend, task), default)


def population_strategy(head: bool, strategy: str = "auto",
                        backend: str | None = None) -> str:
    """The strategy a search population is scored with: task
    ``"population_head"`` when ``head`` (a candidate is a low-rank update of
    cached logits, no layer runs per candidate), ``"population"`` otherwise
    (a candidate runs model layers). ``strategy`` other than ``"auto"`` is
    returned as is (checked)."""
    return resolve_strategy(strategy, backend,
                            "population_head" if head else "population")


def is_measured(backend: str | None = None, task: str = "predict") -> bool:
    """Whether ``"auto"``'s choice for (backend, task) was measured."""
    return (backend or jax.default_backend(), task) in MEASURED


def fixer_seed_mode(strategy: str = "auto", vmappable: bool = True,
                    backend: str | None = None) -> str:
    """How the S seeds of one fixer run: ``"vmap"`` (one ``jax.vmap(fix)``
    call, only for ``vmappable`` fixers) or ``"sequential"``.

    A whole fixer is not one jittable function (it does host work between
    kernels), so only these two strategies apply to it; ``"lax_map"`` and
    ``"sharded"`` raise (they apply to a fixer's own stacked kernels: K
    models, populations).
    """
    mode = resolve_strategy(strategy, backend, task="fix")
    if mode not in ("sequential", "vmap"):
        raise ValueError(f"fixer seeds run 'sequential' or 'vmap' (or "
                         f"'auto'), not {strategy!r}: a fixer is not one "
                         "jittable function")
    return mode if vmappable else "sequential"


def num_members(stacked: Any) -> int:
    """The size of the leading stacked axis (alias of :func:`num_seeds`)."""
    return num_seeds(stacked)


def _index(tree, i):
    return jax.tree_util.tree_map(
        lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _stack(outs):
    return jax.tree_util.tree_map(lambda *o: jnp.stack(o), *outs)


def stack_mapper(fn: Callable, strategy: str = "auto", task: str = "predict",
                 mapped: int = 1) -> Callable:
    """A function ``(*stacked, *shared) -> stacked outputs`` running ``fn``
    once per member of the stack.

    ``fn(m_0, ..., m_{mapped-1}, *shared)`` must be jittable; its first
    ``mapped`` arguments are pytrees with a common leading stacked axis
    (member i gets their i-th slices), the other arguments are shared by all
    members. The mapper is cached per ``(fn, resolved strategy, mapped)``
    (``"auto"`` is resolved first, so a changed backend or
    :data:`AUTO_STRATEGY` is never served a stale mapper); pass a stable
    ``fn`` (a module-level or cached function) to avoid recompiling.

    Args:
      fn: per-member function.
      strategy: one of :data:`STRATEGIES`.
      task: what ``"auto"`` optimises for (:data:`TASKS`).
      mapped: how many leading arguments carry the stacked axis (>= 1).

    Returns:
      A callable whose outputs have a leading stacked axis.
    """
    if mapped < 1:
        raise ValueError(f"mapped must be >= 1, got {mapped}")
    return _build_mapper(fn, resolve_strategy(strategy, task=task), mapped)


@functools.lru_cache(maxsize=256)
def _build_mapper(fn: Callable, strategy: str, mapped: int) -> Callable:
    """:func:`stack_mapper` for a concrete strategy (cached)."""
    if strategy == "vmap":
        return jax.jit(_vmap_first(fn, mapped))
    if strategy == "sharded":
        return _sharded(fn, mapped=mapped)
    if strategy == "lax_map":
        @jax.jit
        def run_map(*args):
            return _lax_map(fn, args[:mapped], args[mapped:])
        return run_map

    @jax.jit
    def one(i, *args):
        return fn(*_index(args[:mapped], i), *args[mapped:])

    def run_seq(*args):
        n = num_members(args[0])
        return _stack([one(jnp.int32(i), *args) for i in range(n)])

    return run_seq


def seed_mapper(fn: Callable, strategy: str = "auto", task: str = "predict"
                ) -> Callable:
    """:func:`stack_mapper` with one stacked argument (the seed axis):
    ``(stacked, *shared) -> stacked outputs``."""
    return stack_mapper(fn, strategy, task, 1)


def map_stacked(fn: Callable, *args, strategy: str = "auto",
                task: str = "predict", mapped: int = 1) -> Any:
    """Runs ``fn`` per member of the first ``mapped`` (stacked) arguments;
    see :func:`stack_mapper`."""
    return stack_mapper(fn, strategy, task, mapped)(*args)


def map_seeds(fn: Callable, stacked: Any, *args, strategy: str = "auto",
              task: str = "predict") -> Any:
    """Runs ``fn(variables_s, *args)`` for each seed s; see :func:`seed_mapper`."""
    return seed_mapper(fn, strategy, task)(stacked, *args)


def map_traced(fn: Callable, stacked: Any, strategy: str = "auto",
               task: str = "population") -> Any:
    """``fn`` over the members of ``stacked`` *inside a trace* (e.g. a search
    population scored within a compiled loop): ``"vmap"`` is ``jax.vmap``,
    ``"lax_map"`` and ``"sequential"`` (no Python loop is possible in a
    trace) are ``lax.map``, ``"sharded"`` splits the members over the local
    devices (``shard_map``, ``lax.map`` on each: bit-identical to
    ``"lax_map"``). ``fn`` may close over arrays; they are replicated."""
    strategy = resolve_strategy(strategy, task=task)
    if strategy == "vmap":
        return jax.vmap(fn)(stacked)
    if strategy == "sharded":
        return _shard_call(lambda st: jax.lax.map(fn, st), (stacked,), (),
                           jax.local_devices())
    return jax.lax.map(fn, stacked)


def stack_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh named :data:`AXIS` over ``devices`` (default: all local)."""
    devices = list(devices if devices is not None else jax.local_devices())
    return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


seed_mesh = stack_mesh


def _lax_map(fn, stacked_args, shared):
    return jax.lax.map(lambda m: fn(*m, *shared), tuple(stacked_args))


def _shard_call(local, stacked_args, shared, devices):
    """``local(*stacked_args, *shared)`` with the stacked args split over a
    :data:`AXIS` mesh of ``devices`` (padded to a multiple of their count
    by repeating the last member; the padding is dropped)."""
    mesh = stack_mesh(devices)
    n_dev = mesh.devices.size
    P = jax.sharding.PartitionSpec
    s = jax.tree_util.tree_leaves(stacked_args[0])[0].shape[0]
    pad_n = (-s) % n_dev
    if pad_n:
        stacked_args = jax.tree_util.tree_map(
            lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad_n, axis=0)]),
            stacked_args)
    in_specs = (tuple(jax.tree_util.tree_map(lambda _: P(AXIS), a)
                      for a in stacked_args)
                + tuple(jax.tree_util.tree_map(lambda _: P(), a)
                        for a in shared))
    out = jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                        out_specs=P(AXIS))(*stacked_args, *shared)
    return jax.tree_util.tree_map(lambda a: a[:s], out)


def _sharded(fn: Callable, devices=None, mapped: int = 1) -> Callable:
    """The stacked axis split over the local devices (``shard_map`` on a
    :data:`AXIS` mesh): each device runs ``lax.map`` over its own members,
    so a member's computation is the same program as under ``"lax_map"``
    on one device (bit-identical results)."""
    devices = list(devices if devices is not None else jax.local_devices())

    def local(*args):
        return _lax_map(fn, args[:mapped], args[mapped:])

    @jax.jit
    def run(*args):
        return _shard_call(local, args[:mapped], args[mapped:], devices)

    return run


def _vmap_first(fn: Callable, mapped: int = 1) -> Callable:
    """vmaps ``fn`` over its first ``mapped`` arguments only."""
    def run(*args):
        return jax.vmap(lambda *m: fn(*m, *args[mapped:]))(*args[:mapped])
    return run


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
