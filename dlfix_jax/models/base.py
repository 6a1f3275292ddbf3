"""The one functional model interface every model and fixer uses.

``Model.init(key, input_shape) -> variables`` and
``Model.apply(variables, x, *, train=False, capture=(), rngs=None)``.

Variables are plain nested dicts: ``{"params": ..., "batch_stats": ...}``
(``batch_stats`` only for models with BatchNorm). Nothing is stored on the
``Model`` object but static structure, so all functions over variables stay
pure and can be jitted or vmapped.

Addressing scheme (used by masks and fixers)
--------------------------------------------
A *layer* is named by the ``/``-joined path of its linen module, e.g.
``"dense3"`` for LeNet5 or ``"stage2/block0/conv1"`` for ResNet18; its
parameters live at ``params[<path parts>]`` (``kernel`` and ``bias``).
A *neuron* is ``(layer name, unit index)``: for a Dense layer the unit is the
output column ``j`` (``kernel[:, j]`` and ``bias[j]``); for a Conv layer it is
the output channel ``j`` (``kernel[..., j]`` and ``bias[j]``). A single
*weight* of a Dense layer is ``(layer name, (i, j))``.

Captured activations
--------------------
``capture`` is a tuple of layer names (or ``"*"`` for every layer). With a
non-empty capture, ``apply`` returns ``(logits, acts)`` where
``acts[name] = {"input": ..., "output": ...}``. A Dense or Conv layer's output
is its pre-activation; ReLU, pooling, flatten, BatchNorm and dropout layers of
sequential models are layers with names of their own.

With ``train=True`` (BatchNorm in training mode, dropout on; dropout needs
``rngs={"dropout": key}``) ``apply`` returns ``(logits, new_batch_stats)``, or
``(logits, acts, new_batch_stats)`` with a capture. Prefer the single-shape
wrappers :meth:`Model.logits` (inference) and :meth:`Model.apply_train`
(``(logits, new_state)``) in new code.

Interventions
-------------
``intervene={name: fn}`` replaces layer ``name``'s output ``o`` by
``fn(o)`` during the forward pass (a causal do-intervention, a patched
neuron, a learned mask on an activation). It combines with ``capture``: the
captured output is the replaced one.

Surgery
-------
:func:`split_at` cuts a sequential model after a layer into a head (input ->
that layer's output) and a tail (that output -> logits), each a
:class:`Model` with its own slice of the variables (:func:`split_variables`).

Identity and caching
--------------------
Models compare and hash by **structure** (name, layer specs or module repr,
input shape, classes, output softmax), so two ``models.get("lenet5")`` calls
give equal models and every ``functools.lru_cache`` / ``jax.jit`` static
argument keyed by a model hits for both: one compile per architecture.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlfix_jax.models import layers as layers_lib

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """Static description of a classifier plus pure ``init``/``apply``.

    Attributes:
      name: registry name ("lenet5", "vgg16", ... or "keras:<file>").
      module: the flax linen module.
      input_shape: (H, W, C) of one input.
      num_classes: number of output classes.
      layers: the sequential layer specs, or None for non-sequential models
        (ResNet18, DenseNet121).
      output_softmax: True when the source model (a Keras file) applied a
        softmax to its last layer. Our ``apply`` always returns the logits
        before it; evaluation that must reproduce the study (PGD on
        probabilities) applies the softmax itself.
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    layers: tuple[layers_lib.LayerSpec, ...] | None = None
    output_softmax: bool = False

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        key = (self.name, self.layers if self.layers is not None
               else repr(self.module), self.input_shape, int(self.num_classes),
               bool(self.output_softmax), type(self.module).__qualname__)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        return isinstance(other, Model) and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    @property
    def is_sequential(self) -> bool:
        return self.layers is not None

    @property
    def has_batch_norm(self) -> bool:
        """Whether the variables carry BatchNorm statistics."""
        return "batch_stats" in self.abstract_variables()

    def abstract_variables(self) -> Variables:
        """``jax.eval_shape`` of :meth:`init`: the variables' structure,
        shapes and dtypes without allocating them (cached per model)."""
        return _abstract_variables(self)

    def init(self, key: jax.Array, input_shape: Sequence[int] | None = None
             ) -> Variables:
        """Initialises variables for inputs of ``input_shape`` (H, W, C)."""
        shape = tuple(input_shape or self.input_shape)
        x = jnp.zeros((1,) + shape, jnp.float32)
        return dict(_jitted_init(self)(key, x))

    def apply(self, variables: Variables, x: jax.Array, *, train: bool = False,
              capture: Sequence[str] | str = (), rngs: dict | None = None,
              intervene: Mapping[str, Callable[[jax.Array], jax.Array]]
              | None = None):
        """Runs the model; see the module docstring for return values."""
        if isinstance(capture, str):
            capture = (capture,)
        capture = tuple(capture)
        intervene = dict(intervene or {})
        mutable = ["batch_stats"] if train and "batch_stats" in variables else False
        if not capture and not intervene:
            out = self.module.apply(variables, x, train=train, rngs=rngs,
                                    mutable=mutable)
            if train:
                logits, upd = out if mutable else (out, {})
                return logits, upd.get("batch_stats", {})
            return out
        acts: dict[str, dict[str, jax.Array]] = {}
        seen: set[str] = set()
        want_all = "*" in capture

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.path:
                name = "/".join(context.module.path)
                if name in intervene:
                    out = intervene[name](out)
                    seen.add(name)
                if want_all or name in capture:
                    acts[name] = {"input": args[0], "output": out}
            return out

        with nn.intercept_methods(interceptor):
            out = self.module.apply(variables, x, train=train, rngs=rngs,
                                    mutable=mutable)
        missing = ([c for c in capture if c != "*" and c not in acts]
                   + [n for n in intervene if n not in seen])
        if missing:
            raise KeyError(
                f"layer names {missing} are not layers of model {self.name!r};"
                f" layers: {self.all_layer_names(variables)}")
        if not capture:
            if train:
                logits, upd = out if mutable else (out, {})
                return logits, upd.get("batch_stats", {})
            return out
        if train:
            logits, upd = out if mutable else (out, {})
            return logits, acts, upd.get("batch_stats", {})
        return out, acts

    def logits(self, variables: Variables, x: jax.Array, **kw) -> jax.Array:
        """Inference logits (float32), whatever else ``apply`` could return."""
        return self.apply(variables, x, **kw).astype(jnp.float32)

    def apply_train(self, variables: Variables, x: jax.Array,
                    key: jax.Array | None = None, **kw
                    ) -> tuple[jax.Array, Variables]:
        """Training-mode forward pass: ``(logits, new_state)``.

        ``new_state`` holds the updated non-parameter collections
        (``{"batch_stats": ...}`` for BatchNorm models, else ``{}``);
        ``key`` seeds dropout.
        """
        rngs = None if key is None else {"dropout": key}
        logits, bs = self.apply(variables, x, train=True, rngs=rngs, **kw)
        return logits, ({"batch_stats": bs} if "batch_stats" in variables
                        else {})

    def layer_names(self, kinds: Sequence[str] | None = None) -> list[str]:
        """Names of the sequential layers (of the given kinds), in order."""
        if self.layers is None:
            raise ValueError(f"model {self.name!r} is not sequential")
        return [s.name for s in self.layers if kinds is None or s.kind in kinds]

    def all_layer_names(self, variables: Variables) -> list[str]:
        """Names of every layer reached by a forward pass, in call order."""
        names: list[str] = []

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and context.module.path:
                n = "/".join(context.module.path)
                if n not in names:
                    names.append(n)
            return next_fun(*args, **kwargs)

        x = jax.ShapeDtypeStruct((1,) + tuple(self.input_shape), jnp.float32)
        with nn.intercept_methods(interceptor):
            jax.eval_shape(lambda v, a: self.module.apply(v, a, train=False),
                           variables, x)
        return names

    def predict(self, variables: Variables, x: jax.Array) -> jax.Array:
        """Predicted labels (argmax of the logits)."""
        return jnp.argmax(self.apply(variables, x), axis=-1)


@functools.lru_cache(maxsize=None)
def _abstract_variables(model: "Model") -> Variables:
    return jax.eval_shape(model.init, jax.random.key(0))


@functools.lru_cache(maxsize=None)
def _jitted_init(model: "Model"):
    """One jitted init per model (eager init dispatches op by op and is
    several times slower; caching avoids recompiling on every call)."""
    return jax.jit(lambda k, a: model.module.init({"params": k}, a,
                                                  train=False))


@functools.lru_cache(maxsize=None)
def jitted_apply(model: "Model", capture: tuple[str, ...] = ()):
    """A cached ``jax.jit`` of ``model.apply(variables, x, capture=...)``."""
    return jax.jit(lambda v, a: model.apply(v, a, capture=capture))


def param_layers(params: dict) -> list[str]:
    """Names (``/`` paths) of every layer that owns a ``kernel``."""
    out = []

    def walk(d, prefix):
        if "kernel" in d and not isinstance(d["kernel"], dict):
            out.append("/".join(prefix))
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + (k,))

    walk(params, ())
    return out


def get_layer_params(params: dict, name: str) -> dict:
    """The parameter dict (kernel, bias, ...) of layer ``name``."""
    d = params
    for part in name.split("/"):
        if not isinstance(d, dict) or part not in d:
            raise KeyError(f"no layer {name!r} in params; layers with "
                           f"kernels: {param_layers(params)}")
        d = d[part]
    return d


def set_layer_params(params: dict, name: str, new: dict) -> dict:
    """A copy of ``params`` with layer ``name``'s dict replaced by ``new``."""
    parts = name.split("/")

    def rec(d, i):
        d = dict(d)
        if i == len(parts) - 1:
            get_layer_params(params, name)  # raises a clear KeyError
            d[parts[i]] = new
        else:
            d[parts[i]] = rec(d[parts[i]], i + 1)
        return d

    return rec(params, 0)


def count_params(variables: Variables) -> int:
    return int(sum(a.size for a in jax.tree_util.tree_leaves(
        variables.get("params", variables))))


def split_variables(variables: Variables, names: Sequence[str]) -> Variables:
    """The sub-tree of every collection holding the top-level layers
    ``names`` (collections left empty are dropped)."""
    out = {}
    for col, tree in variables.items():
        sub = {n: tree[n] for n in names if n in tree}
        if sub:
            out[col] = sub
    return out


def split_at(model: Model, layer: str, variables: Variables | None = None):
    """Cuts a sequential model after ``layer``.

    Returns:
      ``(head, tail)`` models: ``head`` maps the model's input to ``layer``'s
      output, ``tail`` maps that output to the logits, so
      ``tail.apply(vt, head.apply(vh, x)) == model.apply(v, x)`` with
      ``vh, vt = split_variables(v, head_names), ...`` (see
      :func:`split_variables_at`). An empty tail is the identity.

    Raises:
      ValueError: the model is not sequential or has no layer ``layer``.
    """
    if not model.is_sequential:
        raise ValueError(f"split_at needs a sequential model; {model.name!r} "
                         "is not (its layers are named by module path)")
    names = [s.name for s in model.layers]
    if layer not in names:
        raise ValueError(f"no layer {layer!r} in model {model.name!r}; "
                         f"layers: {names}")
    i = names.index(layer) + 1
    head_specs, tail_specs = model.layers[:i], model.layers[i:]
    shape = (variables if variables is not None
             else model.abstract_variables())
    x = jax.ShapeDtypeStruct((1,) + tuple(model.input_shape), jnp.float32)
    head_mod = layers_lib.Sequential(tuple(head_specs))
    mid = jax.eval_shape(
        lambda v, a: head_mod.apply(split_variables(v, names[:i]), a),
        shape, x)
    head = Model(f"{model.name}[:{layer}]", head_mod, model.input_shape,
                 int(mid.shape[-1]), tuple(head_specs))
    tail = Model(f"{model.name}[{layer}:]",
                 layers_lib.Sequential(tuple(tail_specs)),
                 tuple(mid.shape[1:]), model.num_classes, tuple(tail_specs),
                 model.output_softmax)
    return head, tail


def split_variables_at(model: Model, layer: str, variables: Variables):
    """``(head_variables, tail_variables)`` of :func:`split_at`."""
    names = [s.name for s in model.layers]
    i = names.index(layer) + 1
    return (split_variables(variables, names[:i]),
            split_variables(variables, names[i:]))
