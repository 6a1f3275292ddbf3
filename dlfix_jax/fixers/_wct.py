"""Whitening-colouring style transfer in the features of a small wavelet
auto-encoder trained here: DeepRepair's substitute for WCT2.

DeepRepair (``SaikaQH/DeepRepair`` ``WCT2/transfer.py``, ``utils/core.py``)
stylises training images with WCT2 (Yoo et al., ICCV 2019): a VGG-19
encoder to relu4_1 whose max-pools are Haar wavelet pools, a mirrored
decoder whose unpooling takes the wavelet high-frequency skips, both
pretrained on ImageNet/COCO (``wave_{encoder,decoder}_cat5_l4.pth``), and
the whitening-colouring transform (WCT) of the content features toward the
style's at every encoder level and every decoder level
(``transfer_at = {encoder, decoder}``, ``alpha = 1``). Those checkpoints are
PyTorch pickles that are neither available here nor loadable without
unpickling, so this module replaces the *network* and keeps the *transfer*:

* **What replaces WCT2's VGG encoder/decoder:** :func:`init_variables` builds a
  3-level wavelet auto-encoder of our own (level widths ``w, 2w, 4w``,
  default w = 16): encoder ``conv3x3 + ReLU`` at full, 1/2 and 1/4
  resolution with an orthonormal Haar pool between levels (LL goes on, LH /
  HL / HH are kept as skips); decoder ``conv3x3 + ReLU`` at 1/4 and 1/2
  resolution, each followed by the exact inverse Haar transform with the
  skips (WCT2's ``sum`` unpooling; WCT2's shipped default is ``cat5``), and
  a linear ``conv3x3`` to the image channels. It is trained on the
  problem's own training images (pixels in [0, 1]) for pixel-MSE
  reconstruction with the shared training loop (WCT2 trains its decoder for
  pixel plus feature reconstruction behind a fixed pretrained encoder; ours
  has no pretrained encoder, so both halves are trained together). It is
  far smaller than VGG-19 (4 conv layers to relu4_1 per side there), works
  on any number of channels (WCT2 needs RGB) and on any image side that is a
  multiple of 4 (others are zero-padded).
* **What is kept:** the WCT of ``utils/core.py:wct_core`` at the same five
  places as ``transfer_at = {encoder, decoder}`` (after each of the 3
  encoder levels, and on the 2 unpooled decoder features before the next
  decoder conv; the style's decoder features come from decoding the style
  itself, as ``get_all_feature``), with its details: per-channel means,
  covariances with divisor n - 1 and ``eps * I`` added to both (``iden=True``,
  eps = 1 there), whitening by ``E diag(e^-1/2) E^T``, colouring by the
  style's ``E diag(e^1/2) E^T``, the style mean added, the result clamped to
  the content feature's [min, max], then ``alpha * target + (1 - alpha) *
  content``. The eigen-decomposition is ``eigh`` of the symmetric covariance
  (WCT2: ``svd``, the same for a symmetric positive-definite matrix); with
  ``+ eps I`` every eigenvalue is >= eps, so WCT2's rank cut at 1e-5 never
  applies for eps >= 1e-5.

Feature scale: WCT2's VGG features are large (variances in the tens to
hundreds), so its ``+ I`` is a small regulariser; our features are far
smaller, so :func:`train` rescales each level's features to unit mean
variance over the training images (``variables["scale"]``, multiplied back
before the next layer), which keeps ``eps = 1`` the small
regulariser it is in WCT2.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dlfix_jax.models import layers
from dlfix_jax.training import loop

LEVELS = ("enc1", "enc2", "enc3", "dec2", "dec1")


# ---------------------------------------------------------------------------
# The auto-encoder (plain param dicts, NHWC).


@functools.partial(jax.jit, static_argnums=(1, 2))
def init_variables(key: jax.Array, channels: int, width: int = 16) -> dict:
    """Auto-encoder variables for images with ``channels`` channels:
    ``{"params": conv kernels and biases, "scale": per-level feature
    scales}`` (the scales are not trained; :func:`train` sets them).
    Kernels are He-uniform (variance 2 / fan_in), biases 0; all kernels come
    from one uniform draw (one random kernel to compile)."""
    w = int(width)
    shapes = {"enc1": (channels, w), "enc2": (w, 2 * w),
              "enc3": (2 * w, 4 * w), "dec3": (4 * w, 2 * w),
              "dec2": (2 * w, w), "dec1": (w, channels)}
    sizes = [9 * a * b for a, b in shapes.values()]
    u = jax.random.uniform(key, (sum(sizes),), minval=-1.0, maxval=1.0)
    params, at = {}, 0
    for (name, (cin, cout)), n in zip(shapes.items(), sizes):
        lim = math.sqrt(6.0 / (9 * cin))
        params[name] = {"kernel": lim * u[at:at + n].reshape(3, 3, cin, cout),
                        "bias": jnp.zeros((cout,))}
        at += n
    return {"params": params, "scale": {n: jnp.ones(()) for n in LEVELS}}


def _conv(p, x):
    y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO",
                                                        "NHWC"))
    return y + p["bias"]


def haar(x):
    """Orthonormal Haar pool of (N, H, W, C) with even H, W: (LL, skips)."""
    a, b = x[:, 0::2, 0::2], x[:, 0::2, 1::2]
    c, d = x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    ll = (a + b + c + d) / 2
    return ll, ((-a + b - c + d) / 2, (-a - b + c + d) / 2,
                (a - b - c + d) / 2)


def unhaar(ll, skips):
    """Exact inverse of :func:`haar`."""
    lh, hl, hh = skips
    a = (ll - lh - hl + hh) / 2
    b = (ll + lh - hl - hh) / 2
    c = (ll - lh + hl - hh) / 2
    d = (ll + lh + hl + hh) / 2
    n, h, w, ch = ll.shape
    top = jnp.stack([a, b], axis=3).reshape(n, h, 2 * w, ch)
    bot = jnp.stack([c, d], axis=3).reshape(n, h, 2 * w, ch)
    return jnp.stack([top, bot], axis=2).reshape(n, 2 * h, 2 * w, ch)


def _pad4(x):
    h, w = x.shape[1], x.shape[2]
    ph, pw = (-h) % 4, (-w) % 4
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    return x, (h, w)


def forward(variables: dict, pixels: jax.Array, transform=None,
            collect: bool = False):
    """The auto-encoder on (N, H, W, C) pixels.

    ``transform(level, features) -> features`` (default identity) runs at
    each level of :data:`LEVELS` on the *scaled* features (divided by
    ``variables["scale"][level]``); ``collect=True`` also returns ``{level: features}`` (as
    seen by ``transform``, before it).

    Returns:
      The decoded pixels (not clipped), or ``(pixels, features)``.
    """
    x, (h0, w0) = _pad4(pixels)
    feats = {}
    params, scale = variables["params"], variables["scale"]

    def at(level, f):
        f = f / scale[level]
        feats[level] = f
        if transform is not None:
            f = transform(level, f)
        return f * scale[level]

    e1 = at("enc1", jax.nn.relu(_conv(params["enc1"], x)))
    ll1, sk1 = haar(e1)
    e2 = at("enc2", jax.nn.relu(_conv(params["enc2"], ll1)))
    ll2, sk2 = haar(e2)
    e3 = at("enc3", jax.nn.relu(_conv(params["enc3"], ll2)))
    u2 = at("dec2", unhaar(jax.nn.relu(_conv(params["dec3"], e3)), sk2))
    u1 = at("dec1", unhaar(jax.nn.relu(_conv(params["dec2"], u2)), sk1))
    out = _conv(params["dec1"], u1)[:, :h0, :w0]
    return (out, feats) if collect else out


# ---------------------------------------------------------------------------
# Training (shared loop) and feature scales.


@functools.lru_cache(maxsize=None)
def recon_loss(mean: tuple, std: tuple):
    """Pixel-MSE reconstruction of ``(x, y)`` batches of normalised inputs
    (``x * std + mean`` are the pixels); the loss of :func:`train`."""
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def loss_fn(variables, batch, key):
        del key
        px = jnp.clip(batch[0] * s + m, 0.0, 1.0)
        out = forward(variables, px)
        loss = jnp.mean((out - px) ** 2)
        return loss, ({}, {"loss": loss})

    return loss_fn


@jax.jit
def _feature_var(variables, pixels):
    """(reconstruction MSE, {level: mean per-channel feature variance})."""
    out, feats = forward(variables, pixels, collect=True)
    return jnp.mean((out - pixels) ** 2), {
        n: jnp.mean(jnp.var(f, axis=(1, 2))) for n, f in feats.items()}


def train(key: jax.Array, source, channels: int, mean: tuple, std: tuple, *,
          width: int = 16, steps: int = 1000, batch_size: int = 64,
          lr: float = 1e-3, scale_images: int = 512) -> tuple[dict, float]:
    """Trains the auto-encoder on a training :class:`Source`; returns
    ``(variables, reconstruction MSE on scale_images training images)``.

    Afterwards each level's feature scale is set so that the features the
    WCT sees have unit mean per-channel variance on ``scale_images``
    training images (module docstring).
    """
    k_init, k_order = jax.random.split(key)
    variables = init_variables(k_init, channels, width)
    tx = loop.optimizer("adam", float(lr))
    step_fn = loop.make_step(recon_loss(tuple(mean), tuple(std)), tx)
    bs = min(int(batch_size), len(source))
    res = loop.fit(loop.step_key(key), variables,
                   source.take_steps(loop.order_key(k_order), bs, int(steps)),
                   step_fn=step_fn, tx=tx, num_steps=int(steps),
                   desc="DeepRepair style auto-encoder")
    variables = res.variables
    x = next(source.epoch(jax.random.fold_in(k_order, 10**6),
                          min(int(scale_images), len(source))))[0]
    px = jnp.asarray(np.clip(x * np.asarray(std, np.float32)
                             + np.asarray(mean, np.float32), 0.0, 1.0))
    mse, var = _feature_var(variables, px)
    variables = {**variables, "scale": {n: jnp.sqrt(jnp.maximum(v, 1e-12))
                                        for n, v in var.items()}}
    return variables, float(mse)


# ---------------------------------------------------------------------------
# The whitening-colouring transform.


def _moments(f, eps):
    """Per-channel mean (c,) and covariance + eps*I (c, c) of (H, W, c)."""
    x = f.reshape(-1, f.shape[-1])
    mu = jnp.mean(x, 0)
    xc = x - mu
    n = x.shape[0]
    cov = xc.T @ xc / max(n - 1, 1) + eps * jnp.eye(x.shape[1], dtype=x.dtype)
    return mu, cov, xc


def eigh_each(covs):
    """``eigh`` of a stack (B, c, c) of symmetric matrices, one at a time.

    Not ``vmap``: a batched ``eigh`` on XLA:CPU runs through jaxlib's LAPACK
    ``ParallelBatchMap``, which waits for its batch tasks on the same
    intra-op thread pool that runs the computation; on a 2-core machine
    that pool has two threads, and with the other one blocked on an async
    input the tasks never run (a deadlock observed three times in the
    DeepRepair fidelity run, gdb backtraces in BENCHMARKS.md). A
    ``lax.map`` issues B unbatched calls: the same LAPACK routine per
    matrix, so the same numbers. CPU only (:func:`layers.on_cpu`), like every
    CPU workaround; other backends keep the batched ``eigh``.
    """
    if layers.on_cpu():
        return jax.lax.map(jnp.linalg.eigh, covs)
    return jax.vmap(jnp.linalg.eigh)(covs)  # not measured off CPU


def style_stats(f, eps: float = 1.0):
    """A style feature map's (mean, colouring matrix E diag(e^1/2) E^T)."""
    mu, colour = styles_stats(f[None], eps)
    return mu[0], colour[0]


def styles_stats(fs, eps: float = 1.0):
    """:func:`style_stats` of a stack (B, H, W, c) of style feature maps."""
    mu, cov, _ = jax.vmap(lambda f: _moments(f, eps))(fs)
    e, v = eigh_each(cov)
    colour = jax.vmap(
        lambda e, v: (v * jnp.sqrt(jnp.maximum(e, 0.0))) @ v.T)(e, v)
    return mu, colour


def wct(f, stats, eps: float = 1.0, alpha: float = 1.0):
    """WCT of one content feature map (H, W, c) toward style ``stats``
    (:func:`style_stats`), as WCT2's ``wct_core`` + ``feature_wct``."""
    mu_s, colour = stats
    return wct_batch(f[None], (mu_s[None], colour[None]), eps, alpha)[0]


def wct_batch(fs, stats, eps: float = 1.0, alpha: float = 1.0):
    """:func:`wct` of a stack (B, H, W, c) of content feature maps, map i
    toward the i-th of the stacked ``stats`` (eigh one at a time:
    :func:`eigh_each`)."""
    mu_s, colour = stats
    _, cov, xc = jax.vmap(lambda f: _moments(f, eps))(fs)
    e, v = eigh_each(cov)

    def finish(f, xc, e, v, mu_s, colour):
        lo, hi = jnp.min(f), jnp.max(f)
        whiten = (v * jax.lax.rsqrt(jnp.maximum(e, 1e-12))) @ v.T
        target = xc @ whiten @ colour + mu_s
        target = jnp.clip(target, lo, hi).reshape(f.shape)
        return alpha * target + (1.0 - alpha) * f

    return jax.vmap(finish)(fs, xc, e, v, mu_s, colour)


@functools.partial(jax.jit, static_argnames=("eps",))
def styles(variables: dict, style_pixels: jax.Array, eps: float = 1.0
           ) -> dict:
    """Per level, the stacked (mean, colouring) of S style images."""
    _, feats = forward(variables, style_pixels, collect=True)
    return {n: styles_stats(feats[n], eps) for n in LEVELS}


@functools.partial(jax.jit, static_argnames=("eps", "alpha"))
def transfer(variables: dict, content: jax.Array, stats: dict,
             style_index: jax.Array, eps: float = 1.0, alpha: float = 1.0
             ) -> jax.Array:
    """Stylises (N, H, W, C) content pixels, image i toward style
    ``style_index[i]`` of ``stats`` (:func:`styles`); returns pixels clipped
    to [0, 1] (as WCT2's ``save_image(img.clamp_(0, 1))``)."""
    picked = {n: (m[style_index], c[style_index])
              for n, (m, c) in stats.items()}

    def transform(level, f):
        return wct_batch(f, picked[level], eps, alpha)

    return jnp.clip(forward(variables, content, transform), 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("level",))
def feature_moments(variables: dict, pixels: jax.Array, level: str = "enc1"):
    """(mean (N, c), covariance (N, c, c)) of each image's features at
    ``level`` (eps = 0), to check that a transfer moves them."""
    _, feats = forward(variables, pixels, collect=True)
    out = jax.vmap(lambda f: _moments(f, 0.0)[:2])(feats[level])
    return out
