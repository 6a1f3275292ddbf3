"""The one training loop: base models, Apricot and every model-level fixer.

Three pieces, each usable alone:

* **Losses** are functions ``loss_fn(variables, batch, key) -> (loss, (new_state,
  metrics))``: ``variables`` holds the parameters being differentiated plus
  the non-parameter collections (BatchNorm statistics), ``batch`` is any
  pytree the sampler yields, ``key`` seeds dropout and any other draw of the
  step; ``new_state`` is the updated non-parameter collections and
  ``metrics`` a dict of scalars. :func:`xent` is softmax cross-entropy on
  ``(x, y)`` batches; a fixer writes its own (mixup, consistency, an edit
  loss differentiated through an inner optimiser: any function of
  ``variables`` jax can differentiate).
* :func:`make_step` turns a loss and an optax transform into a jitted
  ``step(state, batch, key) -> (state, metrics)`` over a :class:`TrainState`.
  The step's own key is ``fold_in(key, state.step)``, so a loop passes one
  key for all steps. ``masked=True`` adds a traced element-mask argument
  (``step(state, batch, key, mask)``): gradients are zeroed outside the mask
  before the optimiser and the update is applied through one select, so
  unmasked parameters stay bit-for-bit unchanged and a new mask does not
  recompile.
* :func:`fit` runs steps from a batch iterator with periodic evaluation,
  best-on-validation selection, patience, a non-finite-loss check and
  progress lines; :func:`fit_many` trains K models (Apricot's reduced
  models) with one of the strategies of :mod:`dlfix_jax.seed_axis`.

Caching: ``make_step`` is ``lru_cache``-d on ``(model-free) loss_fn, tx,
masked``, so callers must pass the *same* loss and optimiser objects to reuse
a compilation: build them with cached factories (:func:`xent` and
:func:`optimizer` are cached; models hash by structure).

XLA:CPU note (``BENCHMARKS.md``): one jitted call per step is faster than a
``lax.scan`` over steps on CPU, so :func:`fit` dispatches steps from Python
and synchronises with the host only every ``check_every`` steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlfix_jax import masks
from dlfix_jax import progress as progress_lib
from dlfix_jax import rng
from dlfix_jax import seed_axis

LossFn = Callable[[dict, Any, jax.Array], tuple[jax.Array, tuple[dict, dict]]]


class TrainState(NamedTuple):
    """What a training step carries (a pytree).

    Attributes:
      params: the parameters being trained.
      state: the non-parameter collections (``{"batch_stats": ...}`` or {}).
      opt_state: the optax state.
      step: int32 number of steps taken (folds into the step key).
    """

    params: Any
    state: dict
    opt_state: Any
    step: jax.Array

    @property
    def variables(self) -> dict:
        return {**self.state, "params": self.params}


def init_state(variables: dict, tx: optax.GradientTransformation,
               step: int = 0) -> TrainState:
    """A fresh :class:`TrainState` of ``variables`` (optimiser state from
    ``tx.init``)."""
    params = variables["params"]
    other = {k: v for k, v in variables.items() if k != "params"}
    return TrainState(params, other, tx.init(params), jnp.int32(step))


# ---------------------------------------------------------------------------
# Losses and optimisers (cached factories: same arguments, same object).


def cross_entropy(logits, y) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


@functools.lru_cache(maxsize=None)
def xent(model) -> LossFn:
    """Mean softmax cross-entropy on ``(x, y)`` batches in training mode
    (dropout keyed by the step key, BatchNorm statistics updated)."""

    def loss_fn(variables, batch, key):
        x, y = batch[0], batch[1]
        logits, new_state = model.apply_train(variables, x, key)
        loss = jnp.mean(cross_entropy(logits, y))
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return loss, (new_state, {"loss": loss, "correct": correct})

    return loss_fn


@functools.lru_cache(maxsize=None)
def optimizer(name: str = "adam", learning_rate: float = 1e-3, *,
              momentum: float = 0.0, nesterov: bool = False,
              weight_decay: float = 0.0, decay: float | None = None,
              eps: float | None = None) -> optax.GradientTransformation:
    """A cached optax transform by name (same arguments, same object).

    ``adam``, ``adamw`` (decoupled ``weight_decay``), ``sgd`` (with
    ``momentum``/``nesterov``; ``weight_decay`` as L2 added to the gradient,
    as torch's SGD), ``rmsprop`` (torch semantics: ``decay`` 0.99, ``eps``
    added outside the square root).
    """
    lr = float(learning_rate)
    if name == "adam":
        tx = optax.adam(lr) if eps is None else optax.adam(lr, eps=eps)
    elif name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    elif name == "sgd":
        tx = optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)
    elif name == "rmsprop":
        tx = optax.rmsprop(lr, decay=0.99 if decay is None else decay,
                           eps=1e-8 if eps is None else eps,
                           eps_in_sqrt=False)
    else:
        raise ValueError(f"unknown optimizer {name!r}; known: adam, adamw, "
                         "sgd, rmsprop")
    if weight_decay and name != "adamw":
        tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx


# ---------------------------------------------------------------------------
# The step.


@functools.lru_cache(maxsize=None)
def make_step(loss_fn: LossFn, tx: optax.GradientTransformation,
              masked: bool = False) -> Callable:
    """A jitted training step of ``loss_fn`` with ``tx`` (module docstring).

    Returns:
      ``step(state, batch, key) -> (state, metrics)``; with ``masked=True``
      ``step(state, batch, key, mask)`` where ``mask`` is an element mask
      over the parameters.
    """

    def step(state: TrainState, batch, key, mask=None):
        k = jax.random.fold_in(key, state.step)

        def f(p):
            return loss_fn({**state.state, "params": p}, batch, k)

        (loss, (new_state, metrics)), grads = jax.value_and_grad(
            f, has_aux=True)(state.params)
        if mask is not None:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, grads)
            grads = masks.select(mask, grads, zeros)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if mask is None:
            params = optax.apply_updates(state.params, updates)
        else:
            params = masks.apply_updates(state.params, updates, mask)
        new_state = {k_: new_state.get(k_, v) for k_, v in state.state.items()}
        metrics = dict(metrics)
        metrics.setdefault("loss", loss)
        return TrainState(params, new_state, opt_state, state.step + 1), metrics

    if masked:
        return jax.jit(lambda s, b, k, m: step(s, b, k, m))
    return jax.jit(lambda s, b, k: step(s, b, k))


# ---------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      variables: the selected variables (the last, or the best evaluated).
      state: the final :class:`TrainState` (to continue training).
      history: per-evaluation records ``{"step", "score", **metric means}``.
      best_score: the selected variables' score (NaN without ``eval_fn``).
      best_step: the step at which they were taken (0: the initial ones).
      stop_reason: "steps" | "patience".
      steps: steps run.
      totals: per metric, the sum over every step run (e.g. the mean loss
        is ``totals["loss"] / steps``).
    """

    variables: dict
    state: TrainState
    history: list[dict]
    best_score: float
    best_step: int
    stop_reason: str
    steps: int
    totals: dict = dataclasses.field(default_factory=dict)


def fit(key: jax.Array, variables: dict | None, batches: Iterable, *,
        step_fn: Callable, num_steps: int,
        tx: optax.GradientTransformation | None = None,
        state: TrainState | None = None, mask=None,
        eval_fn: Callable[[dict], float] | None = None,
        eval_every: int = 0, eval_initial: bool = False,
        select: str = "last", patience: int = 0, check_every: int = 50,
        desc: str = "", log_every_s: float = 30.0,
        on_step: Callable[[int, dict], None] | None = None) -> FitResult:
    """Runs ``num_steps`` steps of ``step_fn`` on ``batches``.

    Args:
      key: dropout/step key (each step folds in its step number).
      variables: initial variables (or None with ``state``).
      batches: iterable of batches (at least ``num_steps``).
      step_fn: from :func:`make_step`.
      num_steps: steps to run (0 allowed).
      tx: the optimiser ``step_fn`` was built with (to initialise ``state``).
      state: a :class:`TrainState` to continue from instead.
      mask: element mask for a ``masked`` step.
      eval_fn: ``variables -> score`` (higher is better), run every
        ``eval_every`` steps and after the last step.
      eval_initial: also score the initial variables (they can be selected).
      select: "last" (the final variables) or "best" (best score).
      patience: stop after this many evaluations without improvement (0 =
        never).
      check_every: steps between host checks of the loss (non-finite loss
        raises ``FloatingPointError``).
      desc: progress label; progress lines go to absl logging at most every
        ``log_every_s`` seconds.
      on_step: optional callback ``(step, metrics)`` at each host check.

    Returns:
      A :class:`FitResult`.
    """
    if select not in ("last", "best"):
        raise ValueError(f"select must be 'last' or 'best', got {select!r}")
    if select == "best" and eval_fn is None:
        raise ValueError("select='best' needs an eval_fn")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if state is None:
        if tx is None or variables is None:
            raise ValueError("fit needs (variables, tx) or a state")
        state = init_state(variables, tx)
    history: list[dict] = []
    best_vars, best_score, best_step = state.variables, float("nan"), 0
    if eval_fn is not None and eval_initial:
        best_score = float(eval_fn(state.variables))
        history.append({"step": 0, "score": best_score})
    bad, stop = 0, "steps"
    prog = progress_lib.Progress(num_steps, desc or "training",
                                 every_s=log_every_s)
    pending: list[dict] = []
    totals: dict[str, float] = {}
    it = iter(batches)
    step_no = 0

    def flush():
        if not pending:
            return {}
        vals = jax.device_get(pending)
        pending.clear()
        losses = np.asarray([float(v["loss"]) for v in vals])
        if not np.all(np.isfinite(losses)):
            raise FloatingPointError(
                f"{desc or 'training'}: non-finite loss at step {step_no} "
                f"(learning rate too large, or non-finite inputs/weights?)")
        for k in vals[-1]:
            col = np.asarray([np.asarray(v[k], np.float64) for v in vals])
            totals[k] = totals.get(k, 0.0) + float(col.sum())
        out = {k: float(np.mean([float(v[k]) for v in vals]))
               for k in vals[-1]}
        if on_step is not None:
            on_step(step_no, out)
        return out

    means: dict = {}
    for step_no in range(1, num_steps + 1):
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(f"{desc or 'fit'}: the batch iterator ended "
                             f"after {step_no - 1} of {num_steps} steps")
        if mask is None:
            state, metrics = step_fn(state, batch, key)
        else:
            state, metrics = step_fn(state, batch, key, mask)
        pending.append(metrics)
        if step_no % max(1, check_every) == 0 or step_no == num_steps:
            means = flush() or means
            prog.update(step_no, means.get("loss"))
        do_eval = eval_fn is not None and (
            step_no == num_steps or (eval_every and step_no % eval_every == 0))
        if do_eval:
            means = flush() or means
            score = float(eval_fn(state.variables))
            history.append({"step": step_no, "score": score, **means})
            if not np.isfinite(best_score) or score > best_score:
                best_vars, best_score, best_step, bad = (
                    state.variables, score, step_no, 0)
            else:
                bad += 1
            if patience and bad >= patience:
                stop = "patience"
                break
    flush()
    prog.done()
    if select == "last" or eval_fn is None:
        out_vars = state.variables
        if eval_fn is None:
            best_step = step_no if num_steps else 0
    else:
        out_vars = best_vars
    return FitResult(out_vars, state, history, best_score, best_step, stop,
                     step_no if num_steps else 0, totals)


def fit_many(keys: Sequence[jax.Array], variables_list: Sequence[dict],
             batch_iters: Sequence[Iterable], *, step_fn: Callable,
             tx: optax.GradientTransformation, num_steps: int,
             strategy: str = "auto", desc: str = "") -> list[dict]:
    """Trains K models for ``num_steps`` each; returns their final variables.

    ``strategy`` (:func:`dlfix_jax.seed_axis.resolve_strategy`, task
    "train"): "sequential" trains one model after another (one jitted step
    per call); "vmap", "lax_map" and "sharded" stack the K states and run
    one batched step per call on stacked batches
    (:func:`dlfix_jax.seed_axis.stack_mapper`). All give the same numbers up
    to float reassociation.
    """
    strategy = seed_axis.resolve_strategy(strategy, task="train")
    k = len(variables_list)
    if not (len(keys) == len(batch_iters) == k):
        raise ValueError("fit_many needs one key and one batch iterator per "
                         "model")
    if strategy == "sequential":
        out = []
        for i in range(k):
            res = fit(keys[i], variables_list[i], batch_iters[i],
                      step_fn=step_fn, tx=tx, num_steps=num_steps,
                      desc=f"{desc} model {i + 1}/{k}".strip())
            out.append(res.variables)
        return out
    vstep = seed_axis.stack_mapper(step_fn, strategy, "train", 3)
    states = seed_axis.stack_variables(
        [init_state(v, tx) for v in variables_list])
    key_stack = jnp.stack(list(keys))
    its = [iter(b) for b in batch_iters]
    prog = progress_lib.Progress(num_steps, desc or "training K models")
    for s in range(1, num_steps + 1):
        batch = jax.tree_util.tree_map(lambda *b: np.stack(b),
                                       *[next(i) for i in its])
        states, metrics = vstep(states, batch, key_stack)
        if s % 50 == 0 or s == num_steps:
            loss = np.asarray(metrics["loss"])
            if not np.all(np.isfinite(loss)):
                raise FloatingPointError(f"{desc}: non-finite loss at step {s}")
            prog.update(s, float(loss.mean()))
    prog.done()
    return [st.variables for st in seed_axis.unstack_variables(states)]


def step_key(key: jax.Array) -> jax.Array:
    """The dropout stream of a fixer's training key."""
    return rng.stream(key, rng.LOOP_DROPOUT)


def order_key(key: jax.Array) -> jax.Array:
    """The data-order stream of a fixer's training key."""
    return rng.stream(key, rng.LOOP_ORDER)
