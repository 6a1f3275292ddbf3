"""GenMuNN: importance-ranked weight mutation selected by a genetic algorithm.

Source: S. Wu et al., "GenMuNN: A Mutation-Based Approach to Repair Deep
Neural Network Models" (DSA 2021) and its journal version (IJMSSC 2023).
**No original code exists and only the two abstracts were available to us**;
they say: (1) rank each layer's weights by their influence on the
correctness of the final predictions, (2) mutate the top-ranked weights to
create mutants, (3) a genetic algorithm selects mutants for the next round
until a stop condition, (4) evaluated on MNIST DNNs. Everything below beyond
those four sentences is **our design** (``../shared/reference/fixer_specs.md``,
section "GM — GenMuNN"), not the authors' method; every default is ours.

Algorithm (ours)
----------------
1. **Ranking.** For every Dense kernel ``W_l`` the importance of a weight is
   ``|d sum_{n in I_neg} CE(f(x_n), y_n) / dw| * |w|`` (gradient of the
   cross-entropy summed over the failing repair inputs, times magnitude: a
   first-order estimate of the weight's influence on the failures).
2. **Selection of the mutable weights.** The top ``k_l = max(1, ceil(
   fraction * |W_l|))`` weights of each Dense layer (``fraction = 0.01``,
   ties broken by lower flat position). ``FixResult.mask`` is exactly these
   entries; every other parameter (biases, conv kernels, BatchNorm, the
   unselected kernel entries) is bit-for-bit the original.
3. **GA over delta vectors** ``d`` (one gene per selected weight; a mutant
   is ``w + d``), run by :func:`dlfix_jax.search.ga` under the shared driver:
   population 50 = the original (``d = 0``) + 49 mutants ``d = sigma_l xi``,
   ``xi ~ N(0, 1)``, ``sigma_l = 0.1 * std(W_l)`` per layer; each generation
   keeps the 10 fittest (truncation selection, kept unchanged as elites) and
   breeds 40 children from two parents drawn uniformly from them: uniform
   crossover of their delta vectors, then every gene (``mut_prob = 1``)
   gets ``+ sigma_l xi`` (the spec's mutation ``w <- w + sigma_l xi`` over the
   selected weights). The 40 children are scored in one call per generation
   of the strategy layer (``seed_axis.population_strategy``: on CPU
   ``lax.map`` when the Dense tail runs per candidate, ``vmap`` for the
   logits-layer-only case; ``vmap`` on accelerators, not measured) inside
   ``lax.while_loop``; at most 100 generations, stop when
   the best is unchanged for more than 10 (patience).
4. **Fitness** (maximise) on the repair split (``I_pos + I_neg``)::

     F = acc_repair + (1 - NFR(I_pos)) / (N_repair + 1)

   A change of accuracy is a multiple of ``1 / N_repair`` and the second
   term is below ``1 / (N_repair + 1)``, so it only breaks ties between
   equal accuracies (fewer broken passing inputs wins). Float32 resolves the
   tie term while ``N_repair * |I_pos|`` is below about 4e6.
5. **Acceptance** (ours). A mutant is kept only if it beats the original's
   fitness **and** the validation accuracy does not drop (``>=``). The
   candidates are the GA's last population (the elites, which hold the best
   mutant, and the last children), validated in one batched call; the
   fittest candidate passing both tests is returned. If none does, the
   original variables are returned unchanged and ``info["outcome"]`` says
   why (``validation_drop``: some mutant improved the repair fitness but
   each such mutant lowered the validation accuracy; ``no_improvement``).
   Gating only the single best mutant (the spec's literal reading) refused
   most runs on the tiny test MLP, where one validation input decides.

Defaults and where they come from: ``fraction`` 0.01, ``population`` 50,
``n_parents`` 10, ``max_generations`` 100, ``patience`` 10,
``sigma_scale`` 0.1, ``mut_prob`` 1.0, ``cx_prob`` 1.0: all ours (the spec
above; the abstracts give no numbers). The importance formula, the additive
mutation (the spec also allows the multiplicative ``w (1 + sigma xi)``; we
chose the additive one so zero weights can move), elitist truncation, the
tie-break and the validation gate are ours.

Scope (ours): **Dense kernels only** (the spec allows conv kernels too). In
a sequential model the Dense layers form a tail from the first Dense layer
on; its input and output are computed once per input (cached) and a
candidate runs only that tail (:func:`dlfix_jax.fixers._fitness.tail_setup`,
shared with NeuRecover and Arachne: the first Dense layer's change enters
as a low-rank term when it holds fewer genes than inputs, else its matmul
is re-run), so a generation costs one batched tail pass, not a full
forward pass. A non-sequential model (ResNet18, DenseNet121) has one Dense
layer, the logits layer, repaired with the cached-logits update of Arachne
(:func:`~dlfix_jax.fixers._fitness.candidate_logits`). Memory: scoring a
candidate materialises the tail's Dense kernels (the first one only in the
full form): all 40 children at once under ``vmap``, one at a time under
``lax.map``; the validation gate scores its 52 candidates with the same
strategy as the population (:func:`dlfix_jax.seed_axis.map_traced`).

What the study observed for GM: it barely changed the models (RR 3.49 on
MNIST, 0 elsewhere; NFR <= 0.03) and was slow (2h25m - 52h17m), which looks
like an acceptance rule that usually returns the original. Ours is fast;
measured on the shared 2-core CPU machine (under load 6-8): digits/LeNet5
(4 failing of 200 repair inputs; k = 173 + 101 + 9 weights), 3 seeds in one
vmapped call: 10.6-20.5 s including compilation, ~1.4 s without; each seed
stopped by patience after 12-18 generations, accepted, repair RR 25 (1 of 4
failing inputs) and on the 200 test images RR 25 / NFR 0.5. The tiny test
MLP: RR 11-22 on the repair set, NFR 0. Expect small RRs on larger problems
too: accuracy is a step function, so the GA is a random search until a
mutant flips a prediction. No MNIST / study-model run has been made yet.

Shared code extended for GenMuNN: :func:`dlfix_jax.search.ga` gained
truncation selection (``selection="truncation"``, ``n_parents``) and
``return_state`` (the last population, for the validation gate), and skips
the draws of probabilities >= 1 (bit-identical, faster to compile).

JAX design
----------
Localisation depends only on the problem, so ``fix`` runs it on the host
before using the key: the number of genes is a Python int and the search
has static shapes. ``jax.vmap(fix, in_axes=(0, None, None))`` over keys
works (vmappable); the acceptance decision is a traced ``jnp.where`` on
the selected entries. The gradient kernel and the search are module-level
jits keyed by the (structurally hashed) tail model, static in the search's
``_fitness.TailSetup``, so a second call with
the same shapes compiles nothing; the gradient is one pass over the tail
for all Dense kernels at once (``_localize.grad_scores`` takes one layer).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlfix_jax import masks
from dlfix_jax import search
from dlfix_jax import seed_axis
from dlfix_jax.fixers import _fitness
from dlfix_jax.fixers import _localize
from dlfix_jax.fixers import arachne
from dlfix_jax.fixers import base
from dlfix_jax.models import base as models_base

PAPER = ("Wu et al. GenMuNN: A Mutation-Based Approach to Repair Deep Neural "
         "Network Models. DSA 2021 / IJMSSC 2023 (abstracts only)")

OUTCOMES = ("accepted", "validation_drop", "no_improvement")
"""Names of ``info["outcome"]``: 0 the best mutant was kept; 1 it improved
the repair fitness but lowered the validation accuracy (original returned);
2 no mutant beat the original's fitness (original returned)."""

ACCEPTED, VALIDATION_DROP, NO_IMPROVEMENT = 0, 1, 2


def default_config() -> ml_collections.ConfigDict:
    """GenMuNN's defaults (all ours; see the module docstring)."""
    cfg = ml_collections.ConfigDict()
    cfg.fraction = 0.01        # k_l = max(1, ceil(fraction * |W_l|))
    cfg.population = 50
    cfg.n_parents = 10         # truncation selection; kept as elites
    cfg.max_generations = 100
    cfg.patience = 10          # stop when the best is unchanged > patience
    cfg.sigma_scale = 0.1      # sigma_l = sigma_scale * std(W_l)
    cfg.mut_prob = 1.0         # per-gene mutation probability of a child
    cfg.cx_prob = 1.0          # probability of uniform crossover per child
    cfg.batch_size = 1024      # for caching activations
    return cfg


def check_config(cfg) -> None:
    base.check_ranges(cfg, fraction=(0.0, 1.0), population=(2, None),
                      n_parents=(1, None), max_generations=(0, None),
                      patience=(0, None), sigma_scale=(0.0, None),
                      mut_prob=(0.0, 1.0), cx_prob=(0.0, 1.0),
                      batch_size=(1, None))
    if cfg.fraction <= 0:
        raise ValueError(f"config fraction={cfg.fraction!r} must be > 0")
    if cfg.n_parents >= cfg.population:
        raise ValueError(f"config n_parents={cfg.n_parents} must be < "
                         f"population={cfg.population}")


# ---------------------------------------------------------------------------
# Layers and applicability
# ---------------------------------------------------------------------------

def dense_layers(model: models_base.Model, variables=None
                 ) -> tuple[tuple[str, ...], str | None]:
    """The Dense layers GenMuNN mutates and the layer before the first one.

    Returns:
      ``(layers, cut)``: a sequential model's Dense layers in order and the
      name of the layer before the first of them (the tail is cut after
      it); a non-sequential model's logits Dense layer and ``cut = None``.

    Raises:
      ValueError: no usable Dense layer.
    """
    if not model.is_sequential:
        return (arachne.target_layer(model, variables),), None
    names = [s.name for s in model.layers]
    dense = tuple(s.name for s in model.layers if s.kind == "dense")
    if not dense:
        raise ValueError(f"model {model.name!r} has no Dense layer")
    i = names.index(dense[0])
    if i == 0:
        raise ValueError(f"the first layer {dense[0]!r} of {model.name!r} is "
                         "Dense on the raw input; GenMuNN caches the input of "
                         "the first Dense layer and needs a layer before it")
    return dense, names[i - 1]


def applicable(info: base.ProblemInfo) -> str | None:
    """None when the model has Dense layers and a validation split exists."""
    try:
        dense_layers(info.model)
    except ValueError as e:
        return f"GenMuNN mutates Dense kernels: {e}"
    if info.n_valid == 0:
        return ("GenMuNN accepts a mutant only if the validation accuracy "
                "does not drop; the problem has no validation split")
    return None


# ---------------------------------------------------------------------------
# Host-side preparation (deterministic, key-independent)
# ---------------------------------------------------------------------------

def _cache(model, variables, layer: str, source, batch_size: int):
    """``(h, out, logits, y)`` of :func:`_fitness.cache_layer` over a Source
    (in memory or streamed), batch by batch."""
    hs, os_, zs, ys = [], [], [], []
    for b in source.ordered(batch_size):
        c = _fitness.cache_layer(model, variables, layer, b.x, batch_size)
        hs.append(c.h)
        os_.append(c.out)
        zs.append(c.logits)
        ys.append(np.asarray(b.y, np.int32))
    if not hs:
        raise ValueError(f"the {source.name or 'validation'} split is empty")
    return (np.concatenate(hs), np.concatenate(os_), np.concatenate(zs),
            np.concatenate(ys))


def _tail(model, variables, cut):
    """The model from the first Dense layer on and its variables (None for
    the non-sequential, logits-layer-only case)."""
    if cut is None:
        return None, None
    _, tail = models_base.split_at(model, cut, variables)
    _, tail_vars = models_base.split_variables_at(model, cut, variables)
    return tail, tail_vars


@functools.partial(jax.jit, static_argnames=("tail", "layers"))
def _tail_grads(tail_vars, h, y, *, tail, layers):
    """``d sum_n CE(tail(h_n), y_n) / d kernel`` for every layer in
    ``layers`` (one pass)."""
    params = tail_vars["params"]

    def loss(kernels):
        p = params
        for name, k in zip(layers, kernels):
            lp = dict(models_base.get_layer_params(p, name))
            lp["kernel"] = k
            p = models_base.set_layer_params(p, name, lp)
        v = dict(tail_vars)
        v["params"] = p
        z = tail.apply(v, h).astype(jnp.float32)
        ce, _ = _fitness.cross_entropy_and_correct(z, y)
        return jnp.sum(ce)

    kernels = tuple(models_base.get_layer_params(params, n)["kernel"]
                    for n in layers)
    return jax.grad(loss)(kernels)


def importance(model, variables, layers, cut, h_neg, y_neg) -> dict:
    """``|dCE(I_neg)/dW| * |W|`` (float64, host) per Dense layer, from the
    cached input ``h_neg`` of the first Dense layer."""
    params = variables["params"]
    out = {}
    if cut is None:
        (name,) = layers
        lp = models_base.get_layer_params(params, name)
        kernel = np.asarray(lp["kernel"], np.float32)
        bias = np.asarray(lp.get("bias", np.zeros(kernel.shape[1])),
                          np.float32)
        g = _localize.dense_gradient(kernel, bias, h_neg, y_neg)
        out[name] = g * np.abs(kernel.astype(np.float64))
        return out
    tail, tail_vars = _tail(model, variables, cut)
    grads = _tail_grads(tail_vars, jnp.asarray(h_neg), jnp.asarray(y_neg),
                        tail=tail, layers=tuple(layers))
    for name, g in zip(layers, grads):
        w = np.asarray(models_base.get_layer_params(params, name)["kernel"],
                       np.float64)
        out[name] = np.abs(np.asarray(g, np.float64)) * np.abs(w)
    return out


def num_selected(size: int, fraction: float) -> int:
    """``k_l = max(1, ceil(fraction * size))`` (at most ``size``)."""
    return int(min(size, max(1, math.ceil(fraction * size - 1e-9))))


def localise(model, variables, layers, cut, h_neg, y_neg, fraction: float
             ) -> dict:
    """Top-``k_l`` weights by importance in every Dense layer.

    Returns:
      dict with ``importance`` ({layer: (d, u) scores}), ``flat``
      ({layer: sorted flat positions}), ``k`` ({layer: k_l}) and ``mask``
      (element mask over ``params`` of every selected weight).
    """
    params = variables["params"]
    imp = importance(model, variables, layers, cut, h_neg, y_neg)
    flat, ks, mask = {}, {}, masks.empty_mask(params)
    for name in layers:
        s = imp[name]
        ks[name] = num_selected(s.size, fraction)
        flat[name] = _localize.top_k(s, ks[name])
        _, m = _localize.to_weight_mask(params, name, flat[name], s.shape)
        mask = masks.mask_or(mask, m)
    return {"importance": imp, "flat": flat, "k": ks, "mask": mask}


# ---------------------------------------------------------------------------
# Fitness and search (pure JAX)
# ---------------------------------------------------------------------------

def _set_logits(setup, single, w0, h, b):
    """``d (k,) -> logits`` on one cached set, with the selected weights set
    to ``w0 + d``: through the Dense tail (``setup``, a
    :class:`_fitness.TailSetup`; ``b`` the first Dense layer's cached
    output, used by the low-rank form only: the full form re-runs that
    layer from ``h``) or, for a non-sequential model, the cached-logits
    update of the logits layer (``single`` = its (rows, cols); ``b`` the
    cached logits)."""
    if setup is None:
        rows, cols = single
        fn = _fitness.candidate_logits(_fitness.LayerCache("", h, b, b),
                                       rows, cols, w0)
    else:
        fn = _fitness.tail_logits(setup, h, b)
    return lambda d: fn(w0 + d)


@functools.partial(jax.jit, static_argnames=(
    "full_leaves", "population", "n_parents", "max_generations", "patience",
    "mut_prob", "cx_prob"))
def _search(key, params, full_flats, setup, rows, cols, w0, sigma, h_rep,
            b_rep, y_rep, is_pos, h_val, b_val, y_val, *, full_leaves,
            population, n_parents, max_generations, patience, mut_prob,
            cx_prob):
    single = (rows, cols) if setup is None else None
    rep_logits = _set_logits(setup, single, w0, h_rep, b_rep)
    val_logits = _set_logits(setup, single, w0, h_val, b_val)
    n = y_rep.shape[0]
    n_pos = jnp.maximum(jnp.sum(is_pos), 1)

    def repair_terms(d):
        ok = jnp.argmax(rep_logits(d), axis=-1) == y_rep
        acc = jnp.mean(ok.astype(jnp.float32))
        nfr = jnp.sum(is_pos & ~ok) / n_pos
        return acc + (1.0 - nfr) / (n + 1.0), acc

    def fitness(d):
        return repair_terms(d)[0]

    def evaluate(d):
        """(fitness, repair accuracy, validation accuracy) of one delta."""
        f, acc = repair_terms(d)
        ok = jnp.argmax(val_logits(d), axis=-1) == y_val
        return f, acc, jnp.mean(ok.astype(jnp.float32))

    pop_strategy = seed_axis.population_strategy(setup is None)
    k_init, k_ga = jax.random.split(key)
    k = w0.shape[0]
    mutants = sigma * jax.random.normal(k_init, (population - 1, k))
    zero = jnp.zeros((1, k), jnp.float32)
    x0 = jnp.concatenate([zero, mutants])
    res, last = search.ga(
        k_ga, fitness, x0, -jnp.inf, jnp.inf,
        max_generations=max_generations, crossover="uniform",
        cx_prob=cx_prob, mut_prob=mut_prob, sigma=sigma, n_elite=n_parents,
        selection="truncation", n_parents=n_parents, patience=patience,
        return_state=True,
        population_strategy=pop_strategy)
    # Validation gate over the last population (elites first; it holds the
    # best mutant): the fittest that beats the original and keeps the
    # validation accuracy. The original, the best mutant and the last
    # population are evaluated together, with the strategy that scored the
    # population.
    cand = jnp.concatenate([zero, res.best_x[None], last.pop])
    f_all, acc_all, v_all = seed_axis.map_traced(evaluate, cand,
                                                 strategy=pop_strategy)
    f0, acc0, v0 = f_all[0], acc_all[0], v_all[0]
    f_pop, acc_pop, v_pop = f_all[2:], acc_all[2:], v_all[2:]
    ok = (f_pop > f0) & (v_pop >= v0)
    i = jnp.argmax(jnp.where(ok, f_pop, -jnp.inf))
    keep = jnp.any(ok)
    improved = res.best_fitness > f0
    outcome = jnp.where(keep, ACCEPTED,
                        jnp.where(improved, VALIDATION_DROP, NO_IMPROVEMENT))
    new_w = jnp.where(keep, w0 + last.pop[i], w0)
    # Only the selected entries are written: the rest is bit-for-bit params.
    new_params = masks.scatter(
        params, masks.Indices(full_leaves, tuple(full_flats), k), new_w)
    return res, new_params, dict(
        initial_fitness=f0, accepted_fitness=jnp.where(keep, f_pop[i], f0),
        valid_acc_before=v0, valid_acc_best=v_all[1],
        valid_acc_after=jnp.where(keep, v_pop[i], v0),
        repair_acc_before=acc0,
        repair_acc_after=jnp.where(keep, acc_pop[i], acc0),
        outcome=outcome.astype(jnp.int32))


@base.register("genmunn", level="neuron", paper=PAPER,
               default_config=default_config, applicable=applicable,
               vmappable=True, abbrev="GM", check_config=check_config,
               codes={"stop_reason": search.STOP_REASONS,
                      "outcome": OUTCOMES})
def fix(key: jax.Array, problem: base.Problem,
        config: ml_collections.ConfigDict) -> base.FixResult:
    """Repairs ``problem`` with GenMuNN (our design; see the module doc).

    Returns:
      FixResult whose ``mask`` selects the mutated kernel entries and whose
      ``info`` has ``localised`` ((k, 3): Dense-layer number, row, column,
      in gene order), ``num_localised``, ``k_per_layer``, ``generations``,
      ``fitness_trace``, ``best_fitness``, ``initial_fitness``,
      ``stop_reason`` (:data:`dlfix_jax.search.STOP_REASONS`),
      ``evaluations``, ``accepted_fitness`` (of the returned model),
      ``repair_acc_before/after``, ``valid_acc_before/after`` (of the
      returned model), ``valid_acc_best`` (of the GA's best mutant, kept or
      not) and ``outcome`` (:data:`OUTCOMES`).

    Raises:
      ValueError: no failing repair inputs, no Dense layer, an empty
        validation split, or non-finite variables, inputs or activations.
    """
    model, variables = problem.model, problem.variables
    params = variables["params"]
    base.check_finite(variables, "GenMuNN: the model's variables")
    if len(problem.failing) == 0:
        raise ValueError("GenMuNN needs failing repair inputs (I_neg is "
                         "empty)")
    layers, cut = dense_layers(model, variables)

    # --- host part: depends on the problem only, never on the key ---------
    bs = int(config.batch_size)
    first = layers[0]
    neg = _fitness.cache_layer(model, variables, first, problem.failing.x, bs)
    pos = _fitness.cache_layer(model, variables, first, problem.passing.x, bs)
    h_val, o_val, z_val, y_val = _cache(model, variables, first,
                                        problem.valid, bs)
    base.check_finite(
        {"failing": neg.h, "passing": pos.h, "valid": h_val,
         "valid_logits": z_val},
        f"GenMuNN: the repair/validation inputs or their activations at "
        f"{first!r}")
    y_neg = np.asarray(problem.failing.y, np.int32)
    y_pos = np.asarray(problem.passing.y, np.int32)
    loc = localise(model, variables, layers, cut, neg.h, y_neg,
                   float(config.fraction))
    mask = loc["mask"]
    idx = masks.indices_of(mask)
    w0 = np.asarray(masks.gather(params, idx), np.float32)
    sigma = masks.per_gene(params, layers, lambda n, i, k: np.full(
        k.shape, float(config.sigma_scale) * float(np.std(k))), idx)
    lay, rows, cols = masks.gene_coords(params, layers, idx)
    setup = (None if cut is None
             else _fitness.tail_setup(model, variables, mask, layers))
    if setup is not None and setup.layer != first:   # every layer has k_l >= 1
        raise AssertionError("GenMuNN: the tail does not start at the "
                             "cached layer")
    h_rep = np.concatenate([pos.h, neg.h])
    # what the fitness adds to: the first Dense layer's output, or the
    # logits in the logits-layer-only case
    if setup is None:
        b_rep, b_val = np.concatenate([pos.logits, neg.logits]), z_val
    else:
        b_rep, b_val = np.concatenate([pos.out, neg.out]), o_val
    y_rep = np.concatenate([y_pos, y_neg])
    is_pos = np.concatenate([np.ones(len(y_pos), bool),
                             np.zeros(len(y_neg), bool)])

    # --- device part: key-dependent, static shapes -------------------------
    res, new_params, extra = _search(
        key, params, tuple(jnp.asarray(f) for f in idx.flat), setup,
        jnp.asarray(rows), jnp.asarray(cols),
        jnp.asarray(w0), jnp.asarray(sigma), jnp.asarray(h_rep),
        jnp.asarray(b_rep), jnp.asarray(y_rep), jnp.asarray(is_pos),
        jnp.asarray(h_val), jnp.asarray(b_val), jnp.asarray(y_val),
        full_leaves=tuple(idx.leaves),
        population=int(config.population), n_parents=int(config.n_parents),
        max_generations=int(config.max_generations),
        patience=int(config.patience), mut_prob=float(config.mut_prob),
        cx_prob=float(config.cx_prob))

    new_vars = dict(variables)
    new_vars["params"] = new_params
    localised = np.stack([lay, rows, cols], axis=1)
    info = {
        "localised": jnp.asarray(localised),
        "num_localised": jnp.int32(idx.size),
        "k_per_layer": jnp.asarray([loc["k"][n] for n in layers], jnp.int32),
        "generations": res.generations,
        "fitness_trace": res.trace,
        "best_fitness": res.best_fitness,
        "stop_reason": res.stop_reason,
        "evaluations": res.evaluations,
        **extra,
    }
    return base.FixResult(new_vars, mask, info)
