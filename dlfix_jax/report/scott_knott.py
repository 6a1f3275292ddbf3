"""Scott-Knott Effect Size Difference (ESD) test.

After Tantithamthavorn, McIntosh, Hassan and Matsumoto, "The Impact of
Automated Parameter Optimization on Defect Prediction Models" (TSE 2018) and
"An Empirical Comparison of Model Validation Techniques" (TSE 2017), and the
semantics of the R package ``ScottKnottESD`` (``sk_esd(x, version, alpha)``,
v2.0.3 on CRAN and v3.0.0 on GitHub; read, not copied). The study ranks the
approaches with it (reference ``approaches.md`` §4, "groups" table).

What the package does, and therefore what :func:`sk_esd` does:

1. **Order.** Treatments are sorted from best to worst by their mean
   (``version="p"`` and ``"o"``) or median (``version="np"``).
2. **Partition.** Recursively, a contiguous range ``[k..g]`` of the sorted
   treatments is cut at the point that maximises a between-group statistic:

   * ``"p"``/``"o"``: the Scott-Knott between-group sum of squares of the
     treatment *means*, ``B = T1²/k1 + T2²/k2 − (T1+T2)²/(k1+k2)`` (T = sum of
     the means on each side, k = number of treatments on each side);
   * ``"np"``: the Kruskal-Wallis H statistic between the pooled
     observations of the left and the right part (a rank-based between-group
     sum of squares, so the data are rank-transformed within every range).

3. **Split or merge.** The range is split at that point when the
   *extreme* treatments of the range (the best, ``k``, and the worst, ``g``)
   differ by a non-negligible effect size, and otherwise becomes one group:

   * ``"p"``: Cohen's d (pooled standard deviation), negligible when
     ``|d| < 0.2`` (the ``effsize`` package's thresholds);
   * ``"np"``: Cliff's δ, negligible when ``|δ| < 0.147``;
   * ``"o"``: the original Scott & Knott (1974) likelihood-ratio test:
     ``λ = π/(2(π−2)) · B / σ0²`` against χ² with ``(g−k+1)/(π−2)`` degrees
     of freedom at level ``alpha``, with ``σ0² = (Σ(m − m̄)² + v·MSE/r) /
     (g−k+1 + v)`` (MSE and v = residual mean square and degrees of freedom
     of the one-way ANOVA over all treatments, r = replicates per treatment).

   The recursion visits the left (better) part first, so groups are numbered
   from best (1, letter "a") to worst.

Notes and deliberate differences from the R code:

* **No significance test in "p"/"np".** The package's v2+ partition removes
  the χ² test of the original Scott-Knott test and decides only by effect
  size (its README: "Instead of using a likelihood ratio test ... we analyze
  the magnitude of the difference"); ``alpha`` is unused there. To get the
  TSE-2017 (v1.x) two-stage behaviour, "statistically distinct *and*
  non-negligible", pass ``test="chisq"``: a split then needs both the χ²
  test of ``"o"`` and a non-negligible effect size.
* The package's effect-size check compares only the two extreme treatments
  of a range (its README speaks of "any one pair", but the loop indexes the
  extremes only); we follow the code.
* For ``"np"`` the R code partitions in median order but labels the groups
  in *mean* order, which mislabels treatments whenever the two orders
  differ; we label in the order we partition (median, ties by mean, then
  input order).
* Unbalanced data (treatments with different numbers of observations) are
  allowed. For ``"o"``/``test="chisq"`` the replicate count r is the harmonic
  mean of the per-treatment counts (R's ``model.tables`` assumes balance).
* Cohen's d of two constant samples is 0 when their means are equal and
  infinite (non-negligible) otherwise; the R code gets NaN and fails.
* Orientation: ``higher_is_better=False`` negates the observations, so "a"
  is always the best group (the R package ranks large means first).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

VERSIONS = ("p", "np", "o")
COHEN_NEGLIGIBLE = 0.2
CLIFF_NEGLIGIBLE = 0.147


@dataclasses.dataclass(frozen=True)
class SKResult:
    """Outcome of :func:`sk_esd`.

    Attributes:
      order: treatment names from best to worst (the partition order).
      ranks: treatment -> group number, 1 = best.
      letters: treatment -> group letter, "a" = best.
      centers: treatment -> mean ("p"/"o") or median ("np") of the oriented
        observations' original values (not negated).
      version: "p", "np" or "o".
      higher_is_better: the orientation used.
    """

    order: tuple[str, ...]
    ranks: dict[str, int]
    letters: dict[str, str]
    centers: dict[str, float]
    version: str
    higher_is_better: bool

    @property
    def num_groups(self) -> int:
        return max(self.ranks.values()) if self.ranks else 0


def group_letter(rank: int) -> str:
    """1 -> "a", 26 -> "z", 27 -> "aa", ... (spreadsheet-style)."""
    if rank < 1:
        raise ValueError(f"group ranks start at 1, got {rank}")
    out = ""
    while rank > 0:
        rank, rem = divmod(rank - 1, 26)
        out = chr(ord("a") + rem) + out
    return out


def cohens_d(a, b) -> float:
    """Cohen's d with the pooled standard deviation (``effsize::cohen.d``).

    ``(mean(a) − mean(b)) / s_p`` with ``s_p² = ((na−1)·var_a + (nb−1)·var_b)
    / (na + nb − 2)`` (sample variances). With a zero (or undefined, one
    observation each) pooled deviation the result is 0 for equal means and
    ±inf otherwise.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    _check_sample(a), _check_sample(b)
    diff = a.mean() - b.mean()
    dof = a.size + b.size - 2
    ss = ((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum()
    sp = math.sqrt(ss / dof) if dof > 0 else 0.0
    if sp == 0.0 or not np.isfinite(sp):
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return float(diff / sp)


def cliffs_delta(a, b) -> float:
    """Cliff's δ = (#{a_i > b_j} − #{a_i < b_j}) / (na·nb), in [−1, 1]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    _check_sample(a), _check_sample(b)
    gt = (a[:, None] > b[None, :]).sum()
    lt = (a[:, None] < b[None, :]).sum()
    return float((gt - lt) / (a.size * b.size))


def magnitude(value: float, kind: str) -> str:
    """effsize's magnitude label of a Cohen's d or Cliff's δ value."""
    v = abs(value)
    if kind == "cohen":
        cuts = (0.2, 0.5, 0.8)
    elif kind == "cliff":
        cuts = (0.147, 0.33, 0.474)
    else:
        raise ValueError(f"unknown effect size kind {kind!r}; "
                         "use 'cohen' or 'cliff'")
    for cut, label in zip(cuts, ("negligible", "small", "medium")):
        if v < cut:
            return label
    return "large"


def _check_sample(a: np.ndarray) -> None:
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"a treatment needs a non-empty 1-D array of "
                         f"observations, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("observations must be finite (drop NaN/inf first)")


def _bss_means(means: np.ndarray) -> np.ndarray:
    """Scott-Knott between-group SS of every cut of ``means`` (len n−1)."""
    n = means.size
    csum = np.cumsum(means)
    total = csum[-1]
    k1 = np.arange(1, n)
    t1 = csum[:-1]
    t2 = total - t1
    return t1 ** 2 / k1 + t2 ** 2 / (n - k1) - total ** 2 / n


def _kruskal_cuts(samples: Sequence[np.ndarray]) -> np.ndarray:
    """Kruskal-Wallis H (tie-corrected) of left-vs-right for every cut."""
    pooled = np.concatenate(samples)
    if np.all(pooled == pooled[0]):
        return np.zeros(len(samples) - 1)
    out = []
    for cut in range(1, len(samples)):
        left = np.concatenate(samples[:cut])
        right = np.concatenate(samples[cut:])
        out.append(stats.kruskal(left, right).statistic)
    return np.asarray(out, np.float64)


def _chisq_significant(means: np.ndarray, bss: float, mse_r: float,
                       dfr: int, alpha: float) -> bool:
    """Original Scott-Knott likelihood-ratio test of one range's best cut."""
    n = means.size
    sigma0 = (((means - means.mean()) ** 2).sum() + dfr * mse_r) / (n + dfr)
    if sigma0 <= 0:
        return bss > 0
    lam = (math.pi / (2 * (math.pi - 2))) * bss / sigma0
    crit = stats.chi2.isf(alpha, df=n / (math.pi - 2))
    return bool(lam > crit)


def sk_esd(data: Mapping[str, Sequence[float]], *, version: str = "p",
           alpha: float = 0.05, higher_is_better: bool = True,
           test: str | None = None) -> SKResult:
    """Ranks treatments into groups with the Scott-Knott ESD test.

    Args:
      data: treatment name -> 1-D observations (finite; lengths may differ).
        Treatments with no observations must be left out by the caller.
      version: "p" (parametric, Cohen's d; the package default), "np"
        (non-parametric, Kruskal-Wallis cuts and Cliff's δ) or "o" (the
        original Scott-Knott test, χ² only).
      alpha: significance level of the χ² test ("o", or ``test="chisq"``).
      higher_is_better: orientation; False ranks small values first.
      test: None (package semantics: effect size only for "p"/"np") or
        "chisq" (version "p" only: also require the original
        likelihood-ratio test to split).

    Returns:
      An :class:`SKResult` with group numbers and letters per treatment.

    Raises:
      ValueError: on an unknown version/test, no treatments, or empty /
        non-finite observation arrays.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown Scott-Knott version {version!r}; "
                         f"use one of {VERSIONS}")
    if test not in (None, "chisq"):
        raise ValueError(f"unknown test {test!r}; use None or 'chisq'")
    if test == "chisq" and version == "np":
        raise ValueError("test='chisq' is the parametric Scott-Knott test; "
                         "it applies to version 'p' (or use version 'o')")
    if not data:
        raise ValueError("sk_esd needs at least one treatment")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    names = list(data)
    raw = {n: np.asarray(data[n], np.float64).reshape(-1) for n in names}
    for n, a in raw.items():
        try:
            _check_sample(a)
        except ValueError as e:
            raise ValueError(f"treatment {n!r}: {e}") from None
    sign = 1.0 if higher_is_better else -1.0
    obs = {n: sign * a for n, a in raw.items()}
    means = {n: float(obs[n].mean()) for n in names}
    medians = {n: float(np.median(obs[n])) for n in names}
    pos = {n: i for i, n in enumerate(names)}
    if version == "np":
        key = lambda n: (-medians[n], -means[n], pos[n])  # noqa: E731
    else:
        key = lambda n: (-means[n], pos[n])  # noqa: E731
    order = sorted(names, key=key)
    sorted_means = np.asarray([means[n] for n in order])
    samples = [obs[n] for n in order]

    # One-way ANOVA residuals over all treatments, for the χ² test.
    counts = np.asarray([s.size for s in samples], np.float64)
    dfr = int(counts.sum() - len(samples))
    sse = float(sum(((s - s.mean()) ** 2).sum() for s in samples))
    mse = sse / dfr if dfr > 0 else 0.0
    mse_r = mse / stats.hmean(counts)
    use_chisq = version == "o" or test == "chisq"

    def negligible(k: int, g: int) -> bool:
        if version == "o":
            return False
        a, b = samples[k], samples[g]
        if a.shape == b.shape and np.array_equal(a, b):
            return True
        if version == "np":
            return magnitude(cliffs_delta(a, b), "cliff") == "negligible"
        return magnitude(cohens_d(a, b), "cohen") == "negligible"

    groups = np.zeros(len(order), np.int64)
    next_group = [0]

    def close(k: int, g: int) -> None:
        next_group[0] += 1
        groups[k:g + 1] = next_group[0]

    def partition(k: int, g: int) -> None:
        if k == g:
            close(k, g)
            return
        if version == "np":
            stat = _kruskal_cuts(samples[k:g + 1])
        else:
            stat = _bss_means(sorted_means[k:g + 1])
        best = int(np.argmax(stat))  # first maximum, as R's order()[1]
        split = not negligible(k, g)
        if split and use_chisq:
            split = _chisq_significant(sorted_means[k:g + 1],
                                       float(stat[best]), mse_r, dfr, alpha)
        if not split:
            close(k, g)
            return
        cut = k + best  # left part is [k..cut]
        partition(k, cut)
        partition(cut + 1, g)

    partition(0, len(order) - 1)
    ranks = {n: int(groups[i]) for i, n in enumerate(order)}
    center = medians if version == "np" else means
    return SKResult(order=tuple(order), ranks=ranks,
                    letters={n: group_letter(r) for n, r in ranks.items()},
                    centers={n: sign * center[n] for n in names},
                    version=version, higher_is_better=higher_is_better)
