"""AugMix-style augmentation: PIL / dm-pix semantics of the operations, the
Dirichlet/Beta mixing, the DeepRepair style op, keys and jit."""

import functools

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from dlfix_jax.data import augment


def _levels_image(seed=0, shape=(12, 10, 1), lo=0, hi=256):
    rng = np.random.default_rng(seed)
    q = rng.integers(lo, hi, size=shape).astype(np.uint8)
    return q, jnp.asarray(q, jnp.float32) / 255.0


def _apply(lut, img):
    return augment._apply_lut(img, jnp.broadcast_to(lut, (img.shape[-1], 256)))


def _to_levels(img):
    return np.asarray(jnp.round(img * 255)).astype(np.uint8)


@pytest.mark.parametrize("lo,hi", [(0, 256), (30, 200), (0, 40)])
def test_autocontrast_and_equalize_match_pil(lo, hi):
    q, img = _levels_image(lo=lo, hi=hi)
    pil = Image.fromarray(q[..., 0])
    qq = augment._quantize(img).reshape(-1, 1)
    got = _to_levels(_apply(augment._lut_autocontrast(None, qq, 3.0), img))
    # The exact stretch; PIL computes it in doubles and may land one level
    # lower where the exact value is an integer.
    exact = (q.astype(int) - q.min()) * 255 // (q.max() - q.min())
    np.testing.assert_array_equal(got, exact)
    d = got[..., 0].astype(int) - np.asarray(ImageOps.autocontrast(pil))
    assert set(np.unique(d)) <= {0, 1} and np.mean(d == 0) > 0.95
    got = _to_levels(_apply(augment._lut_equalize(None, qq, 3.0), img))
    np.testing.assert_array_equal(got[..., 0],
                                  np.asarray(ImageOps.equalize(pil)))


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_posterize_matches_pil(bits):
    q, img = _levels_image(1)
    got = _to_levels(_apply(augment.posterize_lut(bits), img))
    want = np.asarray(ImageOps.posterize(Image.fromarray(q[..., 0]), bits))
    np.testing.assert_array_equal(got[..., 0], want)


@pytest.mark.parametrize("threshold", [0, 77, 128, 256])
def test_solarize_matches_pil(threshold):
    q, img = _levels_image(2)
    got = _to_levels(_apply(augment.solarize_lut(threshold), img))
    want = np.asarray(ImageOps.solarize(Image.fromarray(q[..., 0]),
                                        threshold))
    np.testing.assert_array_equal(got[..., 0], want)


def test_geometry_matches_dm_pix():
    img = jax.random.uniform(jax.random.key(0), (11, 9, 3))
    for deg in (-8.0, 3.0, 30.0):
        ours = augment.affine(img, augment.rotation_matrix(deg, img.shape))
        ref = pix.rotate(img, deg * np.pi / 180, order=1, mode="constant")
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    m3 = jnp.array([[1.0, 0.21, -2.0], [0.1, 1.0, 3.0], [0.0, 0.0, 1.0]])
    m4 = jnp.eye(4).at[:2, :2].set(m3[:2, :2]).at[:2, 3].set(m3[:2, 2])
    ref = pix.affine_transform(img, m4, order=1, mode="constant", cval=0.0)
    np.testing.assert_allclose(augment.affine(img, m3), ref, atol=1e-5)


def test_every_op_keeps_shape_range_and_is_keyed():
    _, img = _levels_image(3, shape=(16, 16, 3))
    for op in augment.ALL_OPS:
        a = augment.apply_op(op, jax.random.key(1), img, 3.0)
        b = augment.apply_op(op, jax.random.key(1), img, 3.0)
        assert a.shape == img.shape and a.dtype == img.dtype, op
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0, op
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Random strength: some keys give different results (not for the
    # parameter-free ops).
    for op in ("rotate", "shear_x", "translate_y", "posterize", "brightness"):
        outs = {np.asarray(augment.apply_op(op, jax.random.key(k), img,
                                            3.0)).tobytes() for k in range(8)}
        assert len(outs) > 1, op
    with pytest.raises(ValueError, match="unknown augmentation 'blur'"):
        augment.apply_op("blur", jax.random.key(0), img)


def test_augmix_batch_is_keyed_jittable_and_independent_per_image():
    _, one = _levels_image(4, shape=(16, 16, 1))
    x = jnp.stack([one] * 4)
    f = jax.jit(functools.partial(augment.augmix, width=3, depth=-1))
    a = f(jax.random.key(0), x, severity=3.0)
    b = f(jax.random.key(0), x, severity=3.0)
    c = f(jax.random.key(1), x, severity=2.0)   # traced severity: no recompile
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # Identical images, independent draws.
    assert len({np.asarray(r).tobytes() for r in a}) == 4
    with pytest.raises(ValueError, match=r"batch \(N, H, W, C\)"):
        augment.augmix(jax.random.key(0), one)


def test_mixing_is_convex_and_identity_ops_give_the_image():
    # autocontrast is the identity on an image that uses levels 0 and 255,
    # so every chain returns the image and so must any convex mixture.
    q, img = _levels_image(5, shape=(8, 8, 1))
    q[0, 0, 0], q[0, 1, 0] = 0, 255
    img = jnp.asarray(q, jnp.float32)[None] / 255.0
    out = augment.augmix(jax.random.key(3), img, ops=("autocontrast",))
    np.testing.assert_allclose(out, img, atol=1e-6)


def test_style_op_starts_chains_from_the_styled_image():
    q, img = _levels_image(6, shape=(8, 8, 1))
    q[0, 0, 0], q[0, 1, 0] = 0, 255
    img = jnp.asarray(q, jnp.float32)[None] / 255.0
    styled = 1.0 - img                     # also full range: identity ops
    ts = []
    for k in range(12):
        out = augment.augmix(jax.random.key(k), img, ops=("autocontrast",),
                             styled=styled)
        # out = img + t * (styled - img) for one t in [0, 1] (convex mix of
        # chains that are either the image or the styled image).
        d = np.asarray(styled - img).ravel()
        t = float(np.dot(np.asarray(out - img).ravel(), d) / np.dot(d, d))
        np.testing.assert_allclose(out, img + t * (styled - img), atol=1e-5)
        assert -1e-6 <= t <= 1 + 1e-6
        ts.append(t)
    assert max(ts) > 0.05                  # the style op was drawn
    with pytest.raises(ValueError, match="must match the batch"):
        augment.augmix(jax.random.key(0), img, styled=styled[0])


def test_single_image_is_the_batch_row_and_any_alpha_works():
    _, img = _levels_image(7, shape=(16, 16, 1))
    x = jnp.stack([img, img * 0.5])
    key = jax.random.key(7)
    batch = augment.augmix(key, x, depth=2)
    row = augment.augment_and_mix(jax.random.split(key, 2)[1], x[1], depth=2)
    np.testing.assert_allclose(row, batch[1], atol=1e-6)
    out = augment.augmix(key, x, alpha=0.5)       # the gamma-based draws
    assert np.isfinite(np.asarray(out)).all()
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    with pytest.raises(ValueError, match="depth must be -1 or >= 1"):
        augment.augmix(key, x, depth=0)
