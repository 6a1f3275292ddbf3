"""Few-Shot Guided Mix (model level): fine-tuning on training images mixed
with the failing inputs. **The algorithm is our design.**

Source (name only): Ren, Yu, Qi, Juefei-Xu, Li, Xue, Ma, Zhao, "Few-shot
Guided Mix for DNN Repairing", ICSME 2020. No code, paper text or abstract
of the method could be found (``fixer_specs.md`` §FM: every search came back
empty), so nothing below is read from the original: the mixing rule, the
guidance rule, the loss and every default are **our choices**, made to fit
the name (few failing examples guide a mixed-sample augmentation) and the
study's behaviour (a mild fine-tune: small RR, neutral accuracy, low NFR;
``approaches.md`` §2 FM, §5). Results of this fixer say nothing about the
published method.

Algorithm (ours):

1. **Few-shot pool.** F = the failing repair inputs ``(x_f, y_f)`` with
   their true labels, and the original model's (wrong) predictions
   ``p_f``.
2. **Guidance.** A training image of class ``c`` takes its mixing partner
   from F with weights ``W[c, f]``: ``guidance = "confusion"`` (default)
   sets ``W[c, f] = 1`` when the failure belongs to class ``c`` (``y_f =
   c``) or was mistaken for it (``p_f = c``), else 0; a class with no such
   failure draws uniformly from F. So a failure is mixed with images of its
   own class (its label is reinforced around it) and with images of the
   class it is confused with (the boundary between the two is moved).
   ``"uniform"``: every failure with equal weight (plain mixup with F).
   Partners are drawn with replacement, independently per image.
3. **Mix** (mixup, Zhang et al. ICLR 2018): ``lambda ~ Beta(alpha, alpha)``
   per image, ``alpha`` = 1 (uniform); ``x~ = lambda x + (1 - lambda) x_f``,
   ``y~ = lambda onehot(y) + (1 - lambda) onehot(y_f)``.
4. **Fine-tuning** from the original weights with the shared loop on
   train + mixed data: every step takes a training batch of ``batch_size``
   (128) and its mixed copy, one forward pass over both (training mode),
   ``L = CE(clean) + mix_weight * CE(mixed, y~)`` (``mix_weight`` 1), Adam
   ``lr`` 1e-4, ``epochs`` 5. The validation accuracy is measured every
   ``eval_every_epochs`` (0.5) epoch; the best model (the original
   included) is returned; training stops after ``patience`` (5)
   evaluations without improvement.

Defaults (source): all **our choice**; ``alpha`` = 1 is mixup's common
setting, ``lr`` 1e-4 keeps the fine-tune mild, the budget (5 epochs)
matches the study's short FM time on MNIST (9m05s) in spirit only.

Deviations: not applicable in the usual sense (no original to deviate
from); the whole method is a documented substitute. CutMix and
loss-weighted partner selection (other readings of "guided mix",
``fixer_specs.md`` §FM) are not implemented.

Applicability: any classifier with a training set (``n_train != 0``).
Streamed training data works (only batches are drawn); the failing inputs
sit on the device. With no failing input the original model is returned.

``info``: ``steps``, ``best_step``, ``stop_reason`` (code into
:data:`STOP_REASONS`), ``orig_valid_acc``, ``best_valid_acc``,
``valid_acc_trace`` (per evaluation), ``n_pool`` (|F|),
``guided_classes`` (classes with at least one matching failure),
``failing_fixed`` (fraction of F classified right by the result).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dlfix_jax import predict as predict_lib
from dlfix_jax.fixers import base
from dlfix_jax.training import loop

GUIDANCE = ("confusion", "uniform")
STOP_REASONS = ("steps", "patience", "no failing inputs")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.epochs = 5.0            # ours
    c.batch_size = 128        # ours
    c.lr = 1e-4               # ours (Adam)
    c.alpha = 1.0             # ours (mixup's common Beta(1, 1))
    c.mix_weight = 1.0        # ours
    c.guidance = "confusion"  # ours
    c.eval_every_epochs = 0.5  # ours
    c.patience = 5            # ours (evaluations)
    c.eval_batch_size = 1000  # ours (speed only)
    return c


def check_config(cfg) -> None:
    base.check_ranges(
        cfg, epochs=(0.0, None), batch_size=(1, None), lr=(0.0, 10.0),
        alpha=(1e-6, None), mix_weight=(0.0, None), guidance=set(GUIDANCE),
        eval_every_epochs=(1e-6, None), patience=(0, None),
        eval_batch_size=(1, None))


def applicable(info: base.ProblemInfo) -> str | None:
    if info.n_train == 0:
        return ("Few-Shot Guided Mix fine-tunes on the training set, and this "
                "problem has none")
    return None


def guidance_weights(y_fail, pred_fail, num_classes: int,
                     rule: str = "confusion") -> np.ndarray:
    """(C, |F|) log-weights of the partners per training class (0 = allowed,
    -inf = excluded); see the module docstring, step 2."""
    y_fail, pred_fail = np.asarray(y_fail), np.asarray(pred_fail)
    if rule not in GUIDANCE:
        raise ValueError(f"unknown guidance {rule!r}; one of {GUIDANCE}")
    c = np.arange(num_classes)[:, None]
    if rule == "uniform":
        allow = np.ones((num_classes, len(y_fail)), bool)
    else:
        allow = (y_fail[None] == c) | (pred_fail[None] == c)
        allow[~allow.any(1)] = True
    return np.where(allow, 0.0, -np.inf).astype(np.float32)


def mix(key, x, y, pool_x, pool_y, log_w, alpha: float, num_classes: int):
    """Guided mixup of a batch with partners from the pool.

    Returns:
      ``(x_mix, y_soft, partner, lam)``: mixed inputs, soft labels (rows sum
      to 1), the partner index per image and its lambda.
    """
    k_p, k_l = jax.random.split(key)
    partner = jax.random.categorical(k_p, log_w[y], axis=-1)
    lam = jax.random.beta(k_l, alpha, alpha, (x.shape[0],))
    lx = lam.reshape((-1,) + (1,) * (x.ndim - 1))
    x_mix = lx * x + (1.0 - lx) * pool_x[partner]
    y_soft = (lam[:, None] * jax.nn.one_hot(y, num_classes)
              + (1.0 - lam[:, None]) * jax.nn.one_hot(pool_y[partner],
                                                      num_classes))
    return x_mix, y_soft, partner, lam


@functools.lru_cache(maxsize=None)
def mix_loss(model, alpha: float, mix_weight: float):
    """The fine-tuning loss for the shared loop; batches are ``(x, y,
    pool_x, pool_y, log_w)``."""
    n_classes = model.num_classes

    def loss_fn(variables, batch, key):
        x, y, pool_x, pool_y, log_w = batch
        k_mix, k_drop = jax.random.split(key)
        x_mix, y_soft, _, _ = mix(k_mix, x, y, pool_x, pool_y, log_w, alpha,
                                  n_classes)
        logits, new_state = model.apply_train(
            variables, jnp.concatenate([x, x_mix]), k_drop)
        clean, mixed = logits[:x.shape[0]], logits[x.shape[0]:]
        l_clean = jnp.mean(loop.cross_entropy(clean, y))
        l_mix = jnp.mean(optax.softmax_cross_entropy(mixed, y_soft))
        loss = l_clean + mix_weight * l_mix
        correct = jnp.sum(jnp.argmax(clean, -1) == y)
        return loss, (new_state, {"loss": loss, "clean_loss": l_clean,
                                  "mix_loss": l_mix, "correct": correct})

    return loss_fn


@base.register("fewshot_mix", level="model", abbrev="FM", vmappable=False,
               paper="Ren, Yu, Qi, Juefei-Xu, Li, Xue, Ma, Zhao, 'Few-shot "
                     "Guided Mix for DNN Repairing', ICSME 2020 (algorithm "
                     "not found; ours)",
               default_config=default_config, applicable=applicable,
               check_config=check_config,
               codes={"stop_reason": STOP_REASONS})
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """Few-Shot Guided Mix (our design); see the module docstring."""
    check_config(config)
    model = problem.model
    ebs = int(config.eval_batch_size)
    fail = problem.failing
    n_fail = len(fail)

    def valid_acc(v):
        return predict_lib.accuracy(model, v, problem.valid, ebs)

    if n_fail == 0:
        acc = valid_acc(problem.variables)
        return base.FixResult(problem.variables, None, {
            "steps": 0, "best_step": 0,
            "stop_reason": STOP_REASONS.index("no failing inputs"),
            "orig_valid_acc": acc, "best_valid_acc": acc,
            "valid_acc_trace": np.asarray([acc], np.float32), "n_pool": 0,
            "guided_classes": 0, "failing_fixed": 0.0})
    pred_fail = predict_lib.predict(model, problem.variables, fail.x, ebs)
    log_w_np = guidance_weights(np.asarray(fail.y), pred_fail,
                                model.num_classes, config.guidance)
    log_w = jnp.asarray(log_w_np)
    seen = np.union1d(np.asarray(fail.y), pred_fail)
    guided = len(seen) if config.guidance == "confusion" else 0

    bs = int(config.batch_size)
    spe = problem.train.steps_per_epoch(bs)
    steps = int(round(float(config.epochs) * spe))
    batches = ((x, y, fail.x, fail.y, log_w) for x, y in
               problem.train.take_steps(loop.order_key(key), bs, steps))
    tx = loop.optimizer("adam", float(config.lr))
    step_fn = loop.make_step(mix_loss(model, float(config.alpha),
                                      float(config.mix_weight)), tx)
    res = loop.fit(
        loop.step_key(key), problem.variables, batches, step_fn=step_fn,
        tx=tx, num_steps=steps, eval_fn=valid_acc,
        eval_every=max(1, int(round(float(config.eval_every_epochs) * spe))),
        eval_initial=True, select="best", patience=int(config.patience),
        desc="Few-Shot Guided Mix")
    fixed = res.variables
    fixed_frac = float(np.mean(predict_lib.predict(model, fixed, fail.x, ebs)
                               == np.asarray(fail.y)))
    trace = [h["score"] for h in res.history]
    return base.FixResult(fixed, None, {
        "steps": res.steps, "best_step": res.best_step,
        "stop_reason": STOP_REASONS.index(res.stop_reason),
        "orig_valid_acc": trace[0], "best_valid_acc": res.best_score,
        "valid_acc_trace": np.asarray(trace, np.float32), "n_pool": n_fail,
        "guided_classes": guided, "failing_fixed": fixed_frac})
