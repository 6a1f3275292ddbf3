"""Sequential layer specs and the small linen modules they build.

A sequential model is a tuple of :class:`LayerSpec` (kind, name, options).
Every layer, parameter-free ones included, is a named linen submodule, so
``Model.apply(..., capture=...)`` can report the input and output of any of
them by name, and the spec doubles as the description that piecewise-linear
fixers (RA) and the Keras importer work with.

Kinds and options:

=========== =================================================================
``conv``    features, kernel (h, w), strides (1, 1), padding "VALID"|"SAME",
            use_bias True
``dense``   features, use_bias True
``bn``      momentum 0.99, epsilon 1e-3 (Keras defaults), use_scale/use_bias
``relu``    (none)
``maxpool`` window (h, w), strides (default = window), padding "VALID"
``avgpool`` window (h, w), strides (default = window), padding "VALID"
``gap``     global average pooling over H, W
``flatten`` (none)
``dropout`` rate
=========== =================================================================

A Dense layer's output is its pre-activation; a ``relu`` layer that follows
it has its own name.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("conv", "dense", "bn", "relu", "maxpool", "avgpool", "gap", "flatten",
         "dropout")
PIECEWISE_LINEAR_KINDS = ("conv", "dense", "bn", "relu", "maxpool", "avgpool",
                          "gap", "flatten", "dropout")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a sequential model: kind, unique name and options."""

    kind: str
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"unknown layer kind {self.kind!r} for layer {self.name!r}; "
                f"known kinds: {', '.join(KINDS)}")

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)


def spec(kind: str, name: str, **options) -> LayerSpec:
    """Builds a :class:`LayerSpec`; list options become tuples (hashable)."""
    items = tuple(sorted(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
    return LayerSpec(kind, name, items)


class Relu(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(x)


class Flatten(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x.reshape((x.shape[0], -1))


class GlobalAvgPool(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


class Pool(nn.Module):
    """Max or average pooling over H, W of an NHWC batch.

    Max pooling whose windows tile the input (strides == window, and VALID
    padding, or SAME padding on sizes divisible by the window, which pads
    nothing) takes a fast path, :func:`tiled_max_pool`: same values and
    same derivatives as ``nn.max_pool`` (the first maximum of a window, in
    row-major order, gets the whole derivative, as XLA's select-and-scatter
    does), but its backward pass is a masked broadcast instead of
    select-and-scatter, which is slow on XLA:CPU. Every other configuration
    (overlapping or strided windows, SAME padding that pads), average
    pooling, and every backend but XLA:CPU (where the fast path was
    measured, :func:`on_cpu`) use flax's ``nn.max_pool`` / ``nn.avg_pool``.
    """

    kind: str = "max"
    window: tuple[int, int] = (2, 2)
    strides: tuple[int, int] | None = None
    padding: str = "VALID"

    @nn.compact
    def __call__(self, x):
        window = tuple(self.window)
        strides = tuple(self.strides or window)
        if self.kind == "max":
            if on_cpu() and _tiles(x.shape, window, strides, self.padding):
                return tiled_max_pool(x, window)
            return nn.max_pool(x, window, strides, self.padding)
        # Keras AveragePooling2D with SAME padding excludes the padded cells.
        return nn.avg_pool(x, window, strides, self.padding,
                           count_include_pad=False)


def _tiles(shape, window, strides, padding) -> bool:
    """Whether a pooling's windows tile the (cropped) NHWC input, so that
    :func:`tiled_max_pool` computes it."""
    if len(shape) != 4 or len(window) != 2 or strides != window:
        return False
    if padding == "VALID":
        return shape[1] >= window[0] and shape[2] >= window[1]
    if padding == "SAME":  # pads nothing when the window divides H and W
        return shape[1] % window[0] == 0 and shape[2] % window[1] == 0
    return False


def _windows(x, window):
    """(B, Ho, wh, Wo, ww, C) view of the VALID, stride == window windows of
    an NHWC ``x`` (rows/columns that fill no whole window are dropped)."""
    b, h, w, c = x.shape
    (wh, ww), ho, wo = window, h // window[0], w // window[1]
    return x[:, :ho * wh, :wo * ww].reshape(b, ho, wh, wo, ww, c)


def _first_max_mask(xw, y):
    """One-hot (per window) mask of the first maximum in row-major window
    order: the element XLA's select-and-scatter (select ``>=``) picks."""
    eq = xw == y[:, :, None, :, None, :]
    taken = jnp.zeros_like(eq[:, :, 0, :, 0, :])
    rows = []
    for i in range(xw.shape[2]):
        cols = []
        for j in range(xw.shape[4]):
            e = eq[:, :, i, :, j, :]
            cols.append(e & ~taken)
            taken = taken | e
        rows.append(jnp.stack(cols, axis=3))
    return jnp.stack(rows, axis=2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def tiled_max_pool(x, window):
    """Max pooling of an NHWC ``x`` with strides == ``window``, VALID.

    Equals ``nn.max_pool(x, window, window, "VALID")`` exactly, and so do
    its JVP and VJP (derivative to the first maximum of each window). It is
    a ``custom_jvp`` so forward mode (RA's ``jax.jvp``), reverse mode and
    vmap all work; the reverse pass is a masked broadcast. (A window that
    holds a NaN has a NaN maximum in both; its derivative is zero here,
    while select-and-scatter's depends on where the NaN sits.)
    """
    return _windows(x, window).max(axis=(2, 4))


@tiled_max_pool.defjvp
def _tiled_max_pool_jvp(window, primals, tangents):
    (x,), (t,) = primals, tangents
    xw = _windows(x, window)
    y = xw.max(axis=(2, 4))
    mask = _first_max_mask(xw, y)
    # Exactly one non-zero term per window: the sum is exact.
    dy = jnp.sum(jnp.where(mask, _windows(t, window), 0), axis=(2, 4))
    return y, dy


def on_cpu() -> bool:
    """Whether the computation being traced targets XLA:CPU (the default
    backend), the only backend the CPU workarounds of this module
    (tiled max pool, small-input im2col, one-channel convolution, chunked
    kernel gradient) were measured on; other backends get the plain
    flax/XLA operations."""
    return jax.default_backend() == "cpu"


class Conv(nn.Conv):
    """``nn.Conv`` with the same parameters, plus three XLA:CPU-only paths
    (:func:`on_cpu`; other backends always take ``nn.Conv``):

    * a stride-1 SAME convolution whose input is spatially smaller than its
      kernel window (VGG16's 2x2 block-5 maps under 3x3 kernels) is computed
      as im2col plus one matmul: XLA:CPU swaps the operands of such
      convolutions and then runs them ~70x slower (about 1 GFLOP/s; 80% of a
      VGG16 training step);
    * a stride-1 convolution of a one-channel input (LeNet5's first layer
      on MNIST) is :func:`one_channel_conv`: a sum of kh*kw broadcast
      products forward (fenced off from XLA:CPU's YNNPACK fusion), an
      im2col matmul for the input gradient and banded row matmuls for the
      kernel gradient (inputs up to ``BANDED_MAX_WIDTH`` wide; im2col for
      wider ones), instead of XLA:CPU's convolution kernels, which are
      slow for one input channel (quiet machine: LeNet5 training 1.58x the
      examples/s of plain layers before the banded kernel gradient, PGD
      forward 3x);
    * any other stride-1 convolution (``"chunked"``) keeps XLA's kernels
      for the value and the input gradient but takes its kernel gradient
      from :func:`chunked_kernel_conv`: im2col over a few images at a time
      and one matmul each, accumulated over the batch (XLA:CPU's own
      filter-gradient convolution runs at about a third of its forward
      speed; VGG16's kernel gradients 1.6-2.5x faster on its 32x32 to 8x8
      layers, its training step 1.14-1.20x).

    Results equal ``nn.Conv``'s within float32 round-off (summation order).
    """

    def cpu_path(self, x) -> str | None:
        """How this layer computes ``x`` on XLA:CPU: ``"im2col"`` (input
        smaller than the kernel window), ``"one_channel"``, ``"chunked"``
        (any other stride-1 NHWC convolution whose whole-batch im2col
        columns would take at least ``CHUNKED_MIN_COLUMN_BYTES``: XLA's
        kernels but the chunked kernel gradient), ``"xla"`` (the same left
        wholly to ``nn.Conv``: smaller, or ``CHUNKED_KERNEL_GRAD`` off), or
        None (another backend, or a form these paths do not cover: strides,
        dilation, groups, explicit padding, a weight mask, an explicit
        precision or convolution function, a VALID input smaller than the
        kernel)."""
        kh, kw = self.kernel_size
        if not (x.ndim == 4 and on_cpu() and _all_ones(self.strides)
                and self.feature_group_count == 1
                and _all_ones(self.kernel_dilation)
                and _all_ones(self.input_dilation)
                and self.padding in ("SAME", "VALID")
                and self.mask is None and self.precision is None
                and self.conv_general_dilated is None
                and self.conv_general_dilated_cls is None):
            return None
        if self.padding == "VALID" and (x.shape[1] < kh or x.shape[2] < kw):
            return None
        if self.padding == "SAME" and x.shape[1] * x.shape[2] < kh * kw:
            return "im2col"
        if ONE_CHANNEL_CONV and x.shape[-1] == 1:
            return "one_channel"
        ho, wo = _out_hw(x.shape, (kh, kw), self.padding)
        columns = (x.shape[0] * ho * wo * kh * kw * x.shape[-1]
                   * jnp.dtype(self.param_dtype).itemsize)
        if CHUNKED_KERNEL_GRAD and columns >= CHUNKED_MIN_COLUMN_BYTES:
            return "chunked"
        return "xla"

    @nn.compact
    def __call__(self, x):
        path = self.cpu_path(x)
        if path not in ("im2col", "one_channel", "chunked"):
            return super().__call__(x)
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init,
                            (kh, kw, x.shape[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,),
                           self.param_dtype) if self.use_bias else None)
        # As nn.Conv: the computation dtype from the inputs, parameters and
        # ``dtype``.
        x, kernel, bias = self.promote_dtype(x, kernel, bias,
                                             dtype=self.dtype)
        if path == "im2col":
            y = _im2col_conv(x, kernel, "SAME")
        elif path == "chunked":
            y = chunked_kernel_conv(x, kernel, self.padding)
        else:
            y = one_channel_conv(_same_pad(x, kernel.shape)
                                 if self.padding == "SAME" else x, kernel)
        return y if bias is None else y + bias


def _all_ones(v) -> bool:
    """True for None, 1 or a sequence of ones (flax's stride/dilation forms)."""
    if v is None:
        return True
    if isinstance(v, int):
        return v == 1
    return all(int(a) == 1 for a in v)


def _same_pad(x, kernel_shape):
    """Zero-pads an NHWC ``x`` for a stride-1 SAME convolution with XLA's
    split (the smaller half before)."""
    ph, pw = kernel_shape[0] - 1, kernel_shape[1] - 1
    return jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2),
                       (pw // 2, pw - pw // 2), (0, 0)))


# Off switch (A/B measurements, tests): False makes one-channel
# convolutions take nn.Conv on CPU too.
ONE_CHANNEL_CONV = True

# Off switch (A/B measurements, tests): False leaves the kernel gradient of
# the "chunked" path's convolutions to XLA (cpu_path then says "xla").
CHUNKED_KERNEL_GRAD = True

# Smallest whole-batch im2col column array (bytes) whose convolution takes
# the chunked kernel gradient. Measured wins from 14 MB up (every VGG16
# layer at batch 128: 32x32x3, 30.8 -> 12.5 ms); at LeNet5's conv2 (1 MB at
# batch 128) training was level (1.01x), and on small models the extra scan
# only costs compile time (`make study` on digits: 7m43s with every
# multi-channel convolution chunked, 6m33s with none; BENCHMARKS.md).
CHUNKED_MIN_COLUMN_BYTES = 8 * 2**20

# Output positions per chunk of the chunked kernel gradient (2 images of
# 32x32, 8 of 16x16). Of 1,024 / 2,048 / 4,096 no size was fastest on every
# VGG16 layer: 2,048 was fastest on the largest layer (32x32x64, 147 vs
# 202 / 158 ms) and within 25% of the fastest on the others (scratch,
# BENCHMARKS.md). The chunk ignores a vmap axis (S models hold S times the
# columns).
KERNEL_GRAD_ROWS = 2048

_DN = ("NHWC", "HWIO", "NHWC")


def _out_hw(x_shape, kernel_hw, padding):
    """Output (height, width) of a stride-1 SAME or VALID convolution."""
    if padding == "SAME":
        return x_shape[1], x_shape[2]
    return x_shape[1] - kernel_hw[0] + 1, x_shape[2] - kernel_hw[1] + 1


def _xla_conv(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                        dimension_numbers=_DN)


def _im2col_conv(x, kernel, padding):
    """Stride-1 ``padding`` convolution as one im2col matmul (XLA's SAME
    split)."""
    kh, kw, cin, f = kernel.shape
    if padding == "SAME":
        x = _same_pad(x, kernel.shape)
    b, ho, wo = x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = jnp.concatenate([_shifted(x, i, j, ho, wo)
                            for i in range(kh) for j in range(kw)], axis=-1)
    return (cols.reshape(-1, kh * kw * cin)
            @ kernel.reshape(kh * kw * cin, f)).reshape(b, ho, wo, f)


def _kernel_tangent(x, tk, padding):
    """``conv(x, tk)`` as im2col matmuls over chunks of about
    ``KERNEL_GRAD_ROWS`` output positions (a ``lax.scan`` over the batch),
    each chunk rematerialised (``jax.checkpoint``): reverse mode then
    rebuilds one chunk's columns at a time and accumulates the kernel
    gradient, with no whole-batch column array (VGG16's first 32x32 layer:
    302 MB) and no residual but ``x``."""
    b = x.shape[0]
    ho, wo = _out_hw(x.shape, tk.shape[:2], padding)
    c = max(1, min(b, KERNEL_GRAD_ROWS // max(1, ho * wo)))
    full = b // c
    part = jax.checkpoint(functools.partial(_im2col_conv, padding=padding),
                          policy=jax.checkpoint_policies.nothing_saveable)
    xs = x[:full * c].reshape(full, c, *x.shape[1:])
    _, ys = jax.lax.scan(lambda carry, xc: (carry, part(xc, tk)), None, xs)
    y = ys.reshape(full * c, *ys.shape[2:])
    if b % c:
        y = jnp.concatenate([y, part(x[full * c:], tk)])
    return y


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def chunked_kernel_conv(x, kernel, padding):
    """Stride-1 NHWC/HWIO convolution with ``padding`` "SAME" or "VALID":
    XLA's convolution for the value and the input gradient; the kernel
    tangent is :func:`_kernel_tangent`, so the kernel gradient (its
    transpose) is one (kh*kw*C, R) x (R, F) matmul per chunk of R ~
    ``KERNEL_GRAD_ROWS`` output positions, accumulated by a scan.

    XLA:CPU's filter-gradient convolution runs at about a third of its
    forward speed for the same FLOPs; this form is 1.6-2.5x faster on
    VGG16's 32x32, 16x16 and 8x8 layers and on par on its 4x4 ones
    (batch 128, ``benchmarks.conv_kernels``; BENCHMARKS.md). Forward
    mode, reverse mode, vmap and higher derivatives all work
    (``custom_jvp`` over standard primitives). Equal to
    ``lax.conv_general_dilated`` within float32 round-off.
    """
    return _xla_conv(x, kernel, padding)


@functools.partial(chunked_kernel_conv.defjvp, symbolic_zeros=True)
def _chunked_kernel_conv_jvp(padding, primals, tangents):
    (x, kernel), (tx, tk) = primals, tangents
    y = _xla_conv(x, kernel, padding)
    # Symbolic zeros: no input-gradient convolution for a network's input,
    # no kernel gradient for a frozen kernel (JAX never calls the rule with
    # both tangents zero, so one part at least is present).
    parts = []
    if not isinstance(tx, jax.custom_derivatives.SymbolicZero):
        parts.append(_xla_conv(tx, kernel, padding))
    if not isinstance(tk, jax.custom_derivatives.SymbolicZero):
        parts.append(_kernel_tangent(x, tk, padding))
    return y, functools.reduce(jnp.add, parts)


def _shifted(x, i, j, ho, wo):
    return x[:, i:i + ho, j:j + wo]


def fenced(f, x, *rest):
    """``f(x, *rest)`` computed as one XLA:CPU loop fusion of its own.

    jax 0.10's XLA:CPU hands elementwise chains that feed a reduction (a max
    pool, a loss) to its YNNPACK fusion pass, which splits a long
    multiply-add chain into materialised pieces: :func:`one_channel_conv`'s
    25 products then run ~10x slower than the same chain alone (2.9 vs
    0.23 ms for LeNet5's conv1 at batch 128, followed by a max pool or a
    sum). The chain is therefore evaluated inside a one-trip
    ``lax.while_loop`` whose start predicate XLA cannot fold (``x0 != x0
    and x0 == x0``: False for every value, NaN included), so no fusion pass
    reaches across it. Values and vmap are those of ``f``; callers
    differentiate through a ``custom_jvp``, never through the loop. Used
    only on :func:`on_cpu` paths, where it was measured.
    """
    x0 = jax.lax.stop_gradient(x.reshape(-1)[0])
    start = (x0 != x0) & (x0 == x0)  # deliberately opaque to XLA
    out = jax.eval_shape(f, x, *rest)
    # The initial value is never read (the loop always runs once), but it
    # must carry every input's type under shard_map (varying over a mesh
    # axis when any input is), so it is built from all inputs.
    zero = sum(0 * jax.lax.stop_gradient(a.reshape(-1)[0]).astype(out.dtype)
               for a in (x, *rest))
    return jax.lax.while_loop(
        lambda c: jnp.logical_not(c[0]),
        lambda c: (jnp.ones_like(c[0]), f(x, *rest)),
        (start, jnp.broadcast_to(zero, out.shape)))[1]


def _shifted_products(x, kernel):
    """``sum_ij x[:, i:, j:] * kernel[i, j, 0]``: the VALID one-channel
    convolution as kh*kw broadcast multiply-adds."""
    kh, kw = kernel.shape[:2]
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            t = _shifted(x, i, j, ho, wo) * kernel[i, j, 0]
            y = t if y is None else y + t
    return y


@jax.custom_jvp
def one_channel_conv(x, kernel):
    """VALID, stride-1 convolution of a one-channel NHWC ``x`` (B, H, W, 1)
    with an HWIO ``kernel`` (kh, kw, 1, F): ``sum_ij x[:, i:, j:] * k[i, j]``.

    The value is kh*kw broadcast multiply-adds (one elementwise pass, ~10x
    faster than XLA:CPU's convolution for one input channel), kept in one
    fusion by :func:`fenced`. The JVP (``custom_jvp``, so forward mode,
    reverse mode and vmap all work) is ``cols(t_x) @ k + cols(x) @ t_k``;
    reverse mode runs its transposes: the input gradient is one
    (N, F) x (F, kh*kw) matmul over the N = B*Ho*Wo output positions plus
    kh*kw shifted adds (col2im), the kernel gradient kh row matmuls
    (:func:`_banded_rows`; one (kh*kw, N) x (N, F) matmul for inputs wider
    than ``BANDED_MAX_WIDTH``). Equal to ``lax.conv_general_dilated`` within
    float32 round-off.
    """
    return fenced(_shifted_products, x, kernel)


def _cols(x, kh, kw):
    """(B, Ho, Wo, kh*kw) VALID windows of a one-channel NHWC ``x``."""
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return jnp.stack([_shifted(x, i, j, ho, wo)[..., 0]
                      for i in range(kh) for j in range(kw)], axis=-1)


# Widest input (W) whose kernel tangent takes _banded_rows: its matmuls do
# about W/kw times im2col's arithmetic, a win measured at W = 28 (MNIST);
# wider inputs keep the im2col matmul until measured.
BANDED_MAX_WIDTH = 32


def _banded_rows(x, k):
    """``_cols(x) @ k`` for a one-channel NHWC ``x`` and a (kh, kw, 1, F)
    ``k``, as kh row matmuls: image rows (B*Ho, W) times banded (W, Wo*F)
    matrices built from ``k[i]``. Its transpose in ``k`` (the kernel
    gradient) is then kh matmuls (W, B*Ho) x (B*Ho, Wo*F) and a small
    band sum, with no (B, Ho, Wo, kh*kw) column array."""
    kh, kw, _, f = k.shape
    b, h, w = x.shape[:3]
    ho, wo = h - kh + 1, w - kw + 1
    # band[j, a, c] = 1 iff a == c + j
    band = jnp.asarray(np.stack([np.eye(w, wo, -j) for j in range(kw)]),
                       k.dtype)
    y = None
    for i in range(kh):
        m = jnp.einsum("jac,jf->acf", band, k[i, :, 0, :])
        t = x[:, i:i + ho, :, 0].reshape(b * ho, w) @ m.reshape(w, wo * f)
        y = t if y is None else y + t
    return y.reshape(b, ho, wo, f)


@one_channel_conv.defjvp
def _one_channel_conv_jvp(primals, tangents):
    (x, kernel), (tx, tk) = primals, tangents
    kh, kw, _, f = kernel.shape
    y = one_channel_conv(x, kernel)
    # Transposed, the input gradient (what PGD needs) is one im2col matmul
    # plus kh*kw shifted adds, ~6x faster than XLA:CPU's transposed
    # convolution (0.83 vs 4.8 ms, LeNet5 conv1, batch 128), and the kernel
    # gradient, for inputs up to BANDED_MAX_WIDTH wide, kh banded row
    # matmuls: 0.79 ms alone against 2.06 for the (kh*kw, N) x (N, F)
    # im2col matmul (kept for wider inputs; its column stack cost as much
    # as its matmul), measured in one session; a LeNet5 training step went
    # from 5.1 to 3.6 ms (BENCHMARKS.md).
    dk = (_banded_rows(x, tk) if x.shape[2] <= BANDED_MAX_WIDTH
          else _cols(x, kh, kw) @ tk.reshape(kh * kw, f))
    dy = _cols(tx, kh, kw) @ kernel.reshape(kh * kw, f) + dk
    return y, dy


class Sequential(nn.Module):
    """A linen module built from a tuple of :class:`LayerSpec`."""

    layers: tuple[LayerSpec, ...]

    @nn.compact
    def __call__(self, x, train: bool = False):
        for s in self.layers:
            x = _layer(s, x, train)
        return x


def _layer(s: LayerSpec, x, train: bool):
    """Creates (inside a compact parent) and applies the module of one layer."""
    o = s.opts
    if s.kind == "conv":
        return Conv(o["features"], tuple(o["kernel"]),
                    strides=tuple(o.get("strides", (1, 1))),
                    padding=o.get("padding", "VALID"),
                    use_bias=o.get("use_bias", True), name=s.name)(x)
    if s.kind == "dense":
        return nn.Dense(o["features"], use_bias=o.get("use_bias", True),
                        name=s.name)(x)
    if s.kind == "bn":
        return nn.BatchNorm(momentum=o.get("momentum", 0.99),
                            epsilon=o.get("epsilon", 1e-3),
                            use_scale=o.get("use_scale", True),
                            use_bias=o.get("use_bias", True),
                            name=s.name)(x, use_running_average=not train)
    if s.kind == "relu":
        return Relu(name=s.name)(x)
    if s.kind in ("maxpool", "avgpool"):
        strides = o.get("strides")
        return Pool(kind=s.kind[:3], window=tuple(o["window"]),
                    strides=tuple(strides) if strides else None,
                    padding=o.get("padding", "VALID"), name=s.name)(x)
    if s.kind == "gap":
        return GlobalAvgPool(name=s.name)(x)
    if s.kind == "flatten":
        return Flatten(name=s.name)(x)
    if s.kind == "dropout":
        return nn.Dropout(o["rate"], name=s.name)(x, deterministic=not train)
    raise ValueError(f"unknown layer kind {s.kind!r}")


def check_unique_names(layers: Sequence[LayerSpec]) -> None:
    names = [s.name for s in layers]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate layer names: {dup}")
