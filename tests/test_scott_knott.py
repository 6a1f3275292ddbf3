"""Scott-Knott ESD on hand-worked cases."""

import math

import numpy as np
import pytest

from dlfix_jax.report import scott_knott as sk

SEPARATED = {"A": [10.0, 10.1, 9.9], "B": [5.0, 5.1, 4.9],
             "C": [0.0, 0.1, -0.1]}


def test_effect_sizes_by_hand():
    # means 2 and 3, pooled sd 1 -> d = -1.
    assert sk.cohens_d([1, 2, 3], [2, 3, 4]) == pytest.approx(-1.0)
    # a > b in 1 pair (3 > 2), a < b in 6 pairs -> (1 - 6) / 9.
    assert sk.cliffs_delta([1, 2, 3], [2, 3, 4]) == pytest.approx(-5 / 9)
    assert sk.cohens_d([1, 1], [1, 1]) == 0.0
    assert sk.cohens_d([2, 2], [1, 1]) == math.inf
    assert sk.magnitude(0.19, "cohen") == "negligible"
    assert sk.magnitude(-0.2, "cohen") == "small"
    assert sk.magnitude(0.146, "cliff") == "negligible"
    assert sk.magnitude(0.5, "cliff") == "large"


def test_bss_of_cuts_by_hand():
    # means (10, 5, 0): cut 1 -> 100 + 12.5 - 75; cut 2 -> 112.5 + 0 - 75.
    np.testing.assert_allclose(sk._bss_means(np.array([10.0, 5.0, 0.0])),
                               [37.5, 37.5])


@pytest.mark.parametrize("version", ["p", "np", "o"])
def test_clearly_separated_get_distinct_letters(version):
    res = sk.sk_esd(SEPARATED, version=version)
    assert res.letters == {"A": "a", "B": "b", "C": "c"}
    assert res.order == ("A", "B", "C")
    assert res.num_groups == 3


@pytest.mark.parametrize("version", ["p", "np", "o"])
def test_identical_treatments_form_one_group(version):
    data = {n: [1.0, 2.0, 3.0] for n in "XYZ"}
    res = sk.sk_esd(data, version=version)
    assert set(res.letters.values()) == {"a"}


def test_negligible_difference_is_merged():
    base = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    # B vs A: d = 0.02 / 1.58 = 0.013 and δ = (11 - 10) / 25 = 0.04, both
    # negligible; C lies 10 below (large), so the ranking is {A, B} > {C}.
    data = {"A": base, "B": base + [0, 0, 0, 0, 0.1], "C": base - 10}
    assert sk.cliffs_delta(data["B"], data["A"]) == pytest.approx(0.04)
    for version in ("p", "np"):
        res = sk.sk_esd(data, version=version)
        assert res.letters == {"A": "a", "B": "a", "C": "b"}, version
    # A uniform +0.1 shift is negligible for d (0.06) but not for δ (0.2).
    shifted = {"A": base, "B": base + 0.1}
    assert set(sk.sk_esd(shifted, version="p").letters.values()) == {"a"}
    assert sk.sk_esd(shifted, version="np").letters == {"B": "a", "A": "b"}


def test_orientation_flip():
    res = sk.sk_esd(SEPARATED, higher_is_better=False)
    assert res.letters == {"A": "c", "B": "b", "C": "a"}
    assert res.centers["C"] == pytest.approx(0.0)
    assert res.centers["A"] == pytest.approx(10.0)


def test_two_clusters_of_two():
    data = {"w": [9.0, 9.2, 9.1], "x": [9.05, 9.15, 9.1],
            "y": [1.0, 1.2, 1.1], "z": [1.1, 1.0, 1.2]}
    res = sk.sk_esd(data)
    assert res.letters == {"w": "a", "x": "a", "y": "b", "z": "b"}


def test_chisq_test_merges_a_small_nonsignificant_difference():
    # d = 0.5 ("small", not negligible): the package's "p" splits. The
    # original test: BSS = 1.5² + 1² - 2.5²/2 = 0.125, MSE = 1, v = 4,
    # r = 3, σ0² = (0.125 + 4/3) / 6 = 0.243, λ = 1.376 · 0.125 / 0.243
    # = 0.71 < χ²(0.95; 2/(π-2)) ≈ 5.6, so it keeps one group.
    data = {"A": [0.5, 1.5, 2.5], "B": [0.0, 1.0, 2.0]}
    assert sk.sk_esd(data, version="p").letters == {"A": "a", "B": "b"}
    assert set(sk.sk_esd(data, version="p", test="chisq")
               .letters.values()) == {"a"}
    assert set(sk.sk_esd(data, version="o").letters.values()) == {"a"}


def test_np_orders_by_median_and_labels_in_that_order():
    # Mean of P is pulled up by one outlier; its median is the lowest.
    data = {"P": [0.0, 0.0, 0.1, 0.0, 100.0], "Q": [5.0, 5.1, 5.2, 5.0, 5.1]}
    res = sk.sk_esd(data, version="np")
    assert res.order == ("Q", "P")
    assert res.letters == {"Q": "a", "P": "b"}


def test_unbalanced_and_single_treatment():
    res = sk.sk_esd({"A": [1.0, 2.0], "B": [10.0, 11.0, 12.0, 11.0]})
    assert res.letters == {"B": "a", "A": "b"}
    assert sk.sk_esd({"only": [1.0]}).letters == {"only": "a"}


def test_group_letters_and_errors():
    assert [sk.group_letter(r) for r in (1, 26, 27, 28)] == \
        ["a", "z", "aa", "ab"]
    with pytest.raises(ValueError, match="version"):
        sk.sk_esd(SEPARATED, version="x")
    with pytest.raises(ValueError, match="treatment 'A'"):
        sk.sk_esd({"A": [], "B": [1.0]})
    with pytest.raises(ValueError, match="finite"):
        sk.sk_esd({"A": [np.nan], "B": [1.0]})
    with pytest.raises(ValueError, match="chisq"):
        sk.sk_esd(SEPARATED, version="np", test="chisq")
