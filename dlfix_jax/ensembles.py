"""Post-processing combinations of the original and a fixed model.

The study's discussion (reference ``approaches.md`` §3, figure
``discussion.png``) combines the original model M_o with a fixed model M_r
after the fix, without retraining. Every combination returns class
probabilities ``p`` of shape (N, C); the prediction is ``argmax p``.

======  ==================================================================
``NO``  no post-processing: ``softmax(z_r)``.
``SV``  soft voting: ``(softmax(z_o) + softmax(z_r)) / 2``.
``HV``  hard voting between two models = per input, the probabilities of the
        more confident model (larger max softmax); ties keep M_r (FeaProtect
        / Li et al. ``ensemble == 'maximum'``: M_o only where strictly more
        confident).
``UP``  uncertainty alignment by input perturbation (Li et al., "Lightweight
        Approaches to DNN Regression Error Reduction: An Uncertainty
        Alignment Perspective", ICSE 2023): T = 10 draws ``x + 0.01·ε``,
        ε ~ N(0, I), the **same** ε for both models (as in Li et al.'s
        PyTorch code; FeaProtect's TF port draws them independently).
        With μ, Var the mean and (population) variance of the T softmaxes,
        ``u = clip(Σ_c Var, 1e-3, 1 − 1e-3)`` per input and model,
        ``w_o = u_r / (2(u_o + u_r))``, ``w_r = u_o / (2(u_o + u_r)) + 0.5``,
        ``p = w_o·μ_o + w_r·μ_r``.
``UD``  the same weighting over T = 10 Monte-Carlo dropout passes, rate 0.2.
``US``  temperature scaling on unlabeled data (Li et al.'s "TS", code name
        ``scaling_unlabel``): ``T* = argmin_T MSE(softmax(z_o/T),
        softmax(z_r)) + 5e-4·T²`` over unlabeled inputs, from the inits
        T ∈ {1, 2, 3}; the candidate with T > 0 and the lowest *unregularised*
        MSE is kept; when T* < 0.8 the search is redone without the
        regulariser. ``p = 0.5·softmax(z_o/T*) + 0.5·softmax(z_r)``.
======  ==================================================================

Where dropout goes (UD). Li et al. call ``model(x, drop=0.2)``, i.e. their
models have a dropout layer that is switched on at inference; in their small
nets it sits right before the last linear layer. Our models may have no
dropout layer (LeNet5, ResNet18, DenseNet121) or one that is not before the
head, and switching a whole model to ``train=True`` would also put BatchNorm
into training mode. We therefore apply inverted dropout (keep probability
0.8, kept units scaled by 1/0.8) to the **input of the classifier layer** —
the last layer with a kernel in call order, found by name — through a flax
method interceptor, and run everything else in inference mode. FeaProtect's
TF port instead appended ``Dropout(0.2)`` after the model output, and in one
script with ``training=False`` (variances 0, so UD degenerates to a fixed
0.25/0.75 blend); we do not copy that.

Other choices:

* Optimiser for US: optax L-BFGS with a zoom line search, 50 iterations per
  init (Li et al. use one PyTorch ``LBFGS.step``, 20 iterations, lr 1;
  FeaProtect SGD lr 1.0 for 100 steps). The objective is one-dimensional and
  smooth, so all reach the same stationary point from the same init.
* If no init ends at a finite T > 0, :func:`fit_temperature` raises (the
  original code would fail on an unset ``best_T``).
* One fixed model per call: for S seeds, call once per seed's variables
  (the jitted kernel is cached per model object and options, so the seeds
  share one compilation).
* Attacks: :func:`predict_fn` gives a differentiable ``x -> probs``; for
  UP/UD its noise/dropout key is fixed, so an attack sees one deterministic
  function (no expectation over draws).
* Randomness: UP/UD take an explicit key; the T draws use
  ``jax.random.split(key, T)``; UD uses independent masks for the two
  models (``fold_in(key, 0|1)``). With ``batch_size`` set, batch ``i`` uses
  ``fold_in(key, i)``, so results depend on the batch size.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlfix_jax.models import base as models_base

NAMES = ("NO", "SV", "HV", "UP", "UD", "US")
LONG_NAMES = {"NO": "no post-processing", "SV": "soft voting",
              "HV": "hard voting", "UP": "uncertainty alignment: perturbation",
              "UD": "uncertainty alignment: MC dropout",
              "US": "uncertainty alignment: temperature scaling"}
UNCERTAINTY_CLIP = (1e-3, 1.0 - 1e-3)


# --------------------------------------------------------------------------
# Pure combination rules on logits / sampled probabilities.

def soft_vote(z_o: jax.Array, z_r: jax.Array) -> jax.Array:
    """SV: mean of the two softmaxes, (N, C)."""
    return 0.5 * (jax.nn.softmax(z_o, -1) + jax.nn.softmax(z_r, -1))


def hard_vote(z_o: jax.Array, z_r: jax.Array) -> jax.Array:
    """HV: per input, the softmax of the more confident model (ties: M_r)."""
    p_o, p_r = jax.nn.softmax(z_o, -1), jax.nn.softmax(z_r, -1)
    use_o = jnp.max(p_o, -1) > jnp.max(p_r, -1)
    return jnp.where(use_o[:, None], p_o, p_r)


def uncertainty_blend(probs_o: jax.Array, probs_r: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Li et al.'s uncertainty-aligned blend of T sampled softmaxes.

    Args:
      probs_o: (T, N, C) sampled probabilities of the original model.
      probs_r: (T, N, C) sampled probabilities of the fixed model.

    Returns:
      ``(p, w_o, w_r)``: the blended (N, C) probabilities and the (N,)
      weights, ``w_o + w_r = 1`` with ``w_r >= 0.5``.
    """
    mu_o, mu_r = probs_o.mean(0), probs_r.mean(0)
    # Population variance E[p²] − E[p]², as in the original code.
    u_o = jnp.clip(((probs_o ** 2).mean(0) - mu_o ** 2).sum(-1),
                   *UNCERTAINTY_CLIP)
    u_r = jnp.clip(((probs_r ** 2).mean(0) - mu_r ** 2).sum(-1),
                   *UNCERTAINTY_CLIP)
    w_o = u_r / (2.0 * (u_o + u_r))
    w_r = u_o / (2.0 * (u_o + u_r)) + 0.5
    return w_o[:, None] * mu_o + w_r[:, None] * mu_r, w_o, w_r


def temperature_blend(z_o: jax.Array, z_r: jax.Array, temperature
                      ) -> jax.Array:
    """US output: 0.5·softmax(z_o / T) + 0.5·softmax(z_r)."""
    return 0.5 * (jax.nn.softmax(z_o / temperature, -1)
                  + jax.nn.softmax(z_r, -1))


def _ts_mse(t, z_o, q):
    return jnp.mean((jax.nn.softmax(z_o / t, -1) - q) ** 2)


@functools.partial(jax.jit, static_argnames=("steps",))
def _lbfgs_temperature(z_o, z_r, init, reg, steps: int = 50):
    """L-BFGS on ``MSE(softmax(z_o/T), softmax(z_r)) + reg·T²`` from init."""
    q = jax.nn.softmax(z_r, -1)

    def loss(t):
        return _ts_mse(t, z_o, q) + reg * t ** 2

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(_, carry):
        t, state = carry
        value, grad = value_and_grad(t, state=state)
        updates, state = opt.update(grad, state, t, value=value, grad=grad,
                                    value_fn=loss)
        return optax.apply_updates(t, updates), state

    t0 = jnp.asarray(init, jnp.float32)
    t, _ = jax.lax.fori_loop(0, steps, step, (t0, opt.init(t0)))
    return t, _ts_mse(t, z_o, q)


def fit_temperature(z_o, z_r, *, reg: float = 5e-4,
                    inits: tuple[float, ...] = (1.0, 2.0, 3.0),
                    min_temperature: float = 0.8, steps: int = 50
                    ) -> tuple[float, dict[str, Any]]:
    """US: the temperature that aligns M_o's softmax with M_r's (unlabeled).

    Args:
      z_o: (N, C) original-model logits on unlabeled inputs.
      z_r: (N, C) fixed-model logits on the same inputs.
      reg: weight of the ``T²`` regulariser (Li et al.: 5e-4).
      inits: starting temperatures; each is optimised, the candidate with
        T > 0 and the lowest unregularised MSE is kept.
      min_temperature: when the kept T is below it, the search is redone
        with ``reg = 0`` (Li et al.: 0.8).
      steps: L-BFGS iterations per init.

    Returns:
      ``(T*, info)``; info holds every candidate and whether the
      unregularised rerun happened.

    Raises:
      ValueError: on mismatched shapes.
      RuntimeError: when no init ends at a finite, positive temperature.
    """
    z_o, z_r = jnp.asarray(z_o, jnp.float32), jnp.asarray(z_r, jnp.float32)
    if z_o.shape != z_r.shape or z_o.ndim != 2:
        raise ValueError(f"need two (N, C) logit arrays of the same shape, "
                         f"got {z_o.shape} and {z_r.shape}")

    def search(r):
        cands = []
        for t0 in inits:
            t, mse = _lbfgs_temperature(z_o, z_r, t0, r, steps=steps)
            cands.append({"init": float(t0), "reg": float(r),
                          "T": float(t), "mse": float(mse)})
        ok = [c for c in cands
              if np.isfinite(c["T"]) and c["T"] > 0 and np.isfinite(c["mse"])]
        best = min(ok, key=lambda c: c["mse"]) if ok else None
        return best, cands

    best, cands = search(reg)
    rerun = False
    if best is not None and best["T"] < min_temperature:
        rerun = True
        best, more = search(0.0)
        cands += more
    if best is None:
        raise RuntimeError(f"temperature scaling found no finite T > 0 from "
                           f"inits {inits}; candidates: {cands}")
    return best["T"], {"temperature": best["T"], "mse": best["mse"],
                       "unregularised_rerun": rerun, "candidates": cands}


# --------------------------------------------------------------------------
# Sampling passes through a model.

def classifier_layer(model: models_base.Model, variables) -> str:
    """Name of the last layer with a kernel in call order (the head)."""
    with_kernel = set(models_base.param_layers(variables["params"]))
    order = [n for n in model.all_layer_names(variables) if n in with_kernel]
    if not order:
        raise ValueError(f"model {model.name!r} has no layer with a kernel")
    return order[-1]


def _apply_head_dropout(model, variables, x, key, rate: float, head: str):
    """Logits with inverted dropout on the input of layer ``head``."""
    def interceptor(next_fun, args, kwargs, context):
        if (context.method_name == "__call__"
                and "/".join(context.module.path) == head):
            h = args[0]
            keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
            args = (jnp.where(keep, h / (1.0 - rate), 0.0),) + tuple(args[1:])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        return model.module.apply(variables, x, train=False)


def perturbation_probs(key, model_o, vars_o, model_r, vars_r, x, *,
                       num_samples: int = 10, noise_std: float = 0.01):
    """(T, N, C) softmaxes of both models on ``x + noise_std·ε`` (shared ε)."""
    keys = jax.random.split(key, num_samples)

    def one(k):
        xp = x + noise_std * jax.random.normal(k, x.shape, x.dtype)
        return (jax.nn.softmax(model_o.apply(vars_o, xp), -1),
                jax.nn.softmax(model_r.apply(vars_r, xp), -1))

    return jax.vmap(one)(keys)


def dropout_probs(key, model, variables, x, *, num_samples: int = 10,
                  rate: float = 0.2, head: str | None = None):
    """(T, N, C) MC-dropout softmaxes (dropout on the head's input)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    head = head or classifier_layer(model, variables)
    keys = jax.random.split(key, num_samples)
    return jax.vmap(lambda k: jax.nn.softmax(
        _apply_head_dropout(model, variables, x, k, rate, head), -1))(keys)


# --------------------------------------------------------------------------
# The public entry points.

@functools.lru_cache(maxsize=128)
def _kernel(name, model_o, model_r, num_samples, noise_std, dropout_rate,
            heads):
    """Jitted ``(vars_o, vars_r, key, x, temperature) -> probs``.

    Cached per (combination, model objects, options), so evaluating many
    fixed variables of the same model (seeds) compiles once.
    """
    return jax.jit(_raw_fn(name, model_o, model_r, num_samples=num_samples,
                           noise_std=noise_std, dropout_rate=dropout_rate,
                           heads=heads))


def _raw_fn(name, model_o, model_r, *, num_samples, noise_std, dropout_rate,
            heads):
    """``(vars_o, vars_r, key, x, t) -> probs`` for one combination."""
    if name == "NO":
        return lambda vo, vr, k, x, t: jax.nn.softmax(model_r.apply(vr, x), -1)
    if name == "SV":
        return lambda vo, vr, k, x, t: soft_vote(model_o.apply(vo, x),
                                                 model_r.apply(vr, x))
    if name == "HV":
        return lambda vo, vr, k, x, t: hard_vote(model_o.apply(vo, x),
                                                 model_r.apply(vr, x))
    if name == "UP":
        def up(vo, vr, k, x, t):
            po, pr = perturbation_probs(k, model_o, vo, model_r, vr, x,
                                        num_samples=num_samples,
                                        noise_std=noise_std)
            return uncertainty_blend(po, pr)[0]
        return up
    if name == "UD":
        def ud(vo, vr, k, x, t):
            po = dropout_probs(jax.random.fold_in(k, 0), model_o, vo, x,
                               num_samples=num_samples, rate=dropout_rate,
                               head=heads[0])
            pr = dropout_probs(jax.random.fold_in(k, 1), model_r, vr, x,
                               num_samples=num_samples, rate=dropout_rate,
                               head=heads[1])
            return uncertainty_blend(po, pr)[0]
        return ud
    return lambda vo, vr, k, x, t: temperature_blend(
        model_o.apply(vo, x), model_r.apply(vr, x), t)


@functools.lru_cache(maxsize=32)
def _logits_fn(model):
    return jax.jit(model.apply)


def _prepare(name, model_o, vars_o, model_r, vars_r, *, unlabeled_x=None,
             num_samples: int = 10, noise_std: float = 0.01,
             dropout_rate: float = 0.2, temperature: float | None = None,
             ts_kwargs=None):
    """Validates, fits US's temperature, and builds the jitted kernel."""
    if name not in NAMES:
        raise ValueError(f"unknown combination {name!r}; use one of {NAMES}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    info: dict[str, Any] = {"name": name}
    heads = None
    if name == "UP":
        info.update(num_samples=num_samples, noise_std=noise_std)
    elif name == "UD":
        heads = (classifier_layer(model_o, vars_o),
                 classifier_layer(model_r, vars_r))
        info.update(num_samples=num_samples, dropout_rate=dropout_rate,
                    dropout_at=heads)
    elif name == "US":
        if temperature is None:
            if unlabeled_x is None:
                raise ValueError("US needs unlabeled_x (e.g. the validation "
                                 "inputs) to fit its temperature")
            ux = jnp.asarray(unlabeled_x)
            temperature, ts_info = fit_temperature(
                _logits_fn(model_o)(vars_o, ux),
                _logits_fn(model_r)(vars_r, ux), **(ts_kwargs or {}))
            info.update(ts_info)
        temperature = float(temperature)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        info["temperature"] = temperature
    kernel = _kernel(name, model_o, model_r, int(num_samples),
                     float(noise_std), float(dropout_rate), heads)
    t = jnp.float32(1.0 if temperature is None else temperature)
    return functools.partial(_call, kernel, t), info


def _call(kernel, t, vo, vr, k, x):
    return kernel(vo, vr, k, x, t)


def predict_fn(name: str, key, model_o, vars_o, model_r, vars_r, **kwargs
               ) -> tuple[Callable[[jax.Array], jax.Array], dict[str, Any]]:
    """``(x -> probs (N, C), info)`` for combination ``name``.

    US fits its temperature here, once, on ``unlabeled_x`` (unless
    ``temperature`` is given). The function is jitted (variables are
    arguments, not baked-in constants) and differentiable in x (HV and the
    UP/UD weights included), so an attack can use it; UP/UD reuse ``key`` on
    every call.

    Keyword args: ``unlabeled_x``, ``num_samples`` (10), ``noise_std``
    (0.01), ``dropout_rate`` (0.2), ``temperature`` (fit when None),
    ``ts_kwargs`` (passed to :func:`fit_temperature`).

    Raises:
      ValueError: unknown name, or US without ``unlabeled_x``/temperature.
    """
    kernel, info = _prepare(name, model_o, vars_o, model_r, vars_r, **kwargs)
    return (lambda x: kernel(vars_o, vars_r, key, x)), info


def combine(name: str, key, model_o, vars_o, model_r, vars_r, x, *,
            unlabeled_x=None, batch_size: int | None = None,
            return_info: bool = False, **kwargs):
    """Probabilities (N, C) of combination ``name`` of M_o and M_r on ``x``.

    Args:
      name: one of :data:`NAMES`.
      key: PRNG key (used by UP and UD; accepted and ignored by the others).
      model_o, vars_o: the original model and its variables.
      model_r, vars_r: the fixed model and its variables.
      x: (N, H, W, C) inputs.
      unlabeled_x: inputs for US's temperature fit (required for US).
      batch_size: evaluate ``x`` in batches of this size (batch i uses
        ``fold_in(key, i)``); None = one batch with ``key`` itself.
      return_info: also return a dict (US temperature and candidates, UD
        dropout layers, ...).
      **kwargs: ``num_samples``, ``noise_std``, ``dropout_rate``,
        ``temperature``, ``ts_kwargs`` (see :func:`predict_fn`).

    Returns:
      probs, or ``(probs, info)`` with ``return_info``.
    """
    x = jnp.asarray(x)
    kernel, info = _prepare(name, model_o, vars_o, model_r, vars_r,
                            unlabeled_x=unlabeled_x, **kwargs)
    if batch_size is None or batch_size >= x.shape[0]:
        probs = kernel(vars_o, vars_r, key, x)
    else:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        probs = jnp.concatenate([
            kernel(vars_o, vars_r, jax.random.fold_in(key, i),
                   x[s:s + batch_size])
            for i, s in enumerate(range(0, x.shape[0], batch_size))])
    return (probs, info) if return_info else probs
