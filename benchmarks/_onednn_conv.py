"""An experiment, not a library path: stride-1 2-D convolutions whose three
kernels (forward, input gradient, kernel gradient) are TensorFlow's oneDNN
ops, called from inside a jitted JAX computation through
``jax.pure_callback``.

It answers one question for issue 13 (VGG16 training on CPU vs Keras): how
much of the gap would close if XLA:CPU's convolution kernels were swapped
for the ones Keras runs, with the cost of handing every activation to
TensorFlow and back included. ``benchmarks.conv_kernels`` times it per
layer (``--frameworks=...,callback``), ``benchmarks.train_throughput`` per
training step (``--frameworks=...,jax_onednn``). It is not used by
``dlfix_jax``: its gradient is reverse mode only (``custom_vjp``, so
``jax.jvp`` through it, as RA's, fails), ``vmap`` over it runs the
callback once per batch element, and it makes TensorFlow a runtime
dependency of the model layers (BENCHMARKS.md, "VGG16 on CPU").
"""

from __future__ import annotations

STRIDES = [1, 1, 1, 1]


def _tf():
    import tensorflow as tf
    return tf


def tf_ops(x_shape, w_shape, padding: str):
    """TensorFlow's three kernels for one convolution, on TensorFlow
    tensors (oneDNN on x86): ``fwd(x, w)``, ``grad_input(w, dy)``,
    ``grad_kernel(x, dy)``; shared with ``benchmarks.conv_kernels``."""
    tf = _tf()
    xs, ws = list(x_shape), list(w_shape)

    def fwd(x, w):
        return tf.nn.conv2d(x, w, 1, padding)

    def grad_input(w, dy):
        return tf.raw_ops.Conv2DBackpropInput(
            input_sizes=xs, filter=w, out_backprop=dy, strides=STRIDES,
            padding=padding)

    def grad_kernel(x, dy):
        return tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=ws, out_backprop=dy, strides=STRIDES,
            padding=padding)

    return fwd, grad_input, grad_kernel


def out_shape(x_shape, w_shape, padding: str) -> tuple:
    """NHWC output shape of a stride-1 ``padding`` convolution."""
    b, h, w, _ = x_shape
    kh, kw, _, f = w_shape
    if padding == "SAME":
        return (b, h, w, f)
    return (b, h - kh + 1, w - kw + 1, f)


def _callback(fn, shape, dtype, *args):
    import jax
    return jax.pure_callback(fn, jax.ShapeDtypeStruct(shape, dtype),
                             *args, vmap_method="sequential")


def callbacks(x_shape, w_shape, padding: str, dtype):
    """The three kernels as functions of jitted JAX arrays, each one
    ``pure_callback`` into :func:`tf_ops` (results copied back)."""
    fwd, gx, gw = tf_ops(x_shape, w_shape, padding)
    ys = out_shape(x_shape, w_shape, padding)
    xs, ws = tuple(x_shape), tuple(w_shape)
    return (
        lambda x, w: _callback(lambda a, b: fwd(a, b).numpy(), ys, dtype,
                               x, w),
        lambda w, dy: _callback(lambda a, b: gx(a, b).numpy(), xs, dtype,
                                w, dy),
        lambda x, dy: _callback(lambda a, b: gw(a, b).numpy(), ws, dtype,
                                x, dy))


def make_conv(padding: str):
    """``conv(x, w)`` for jitted JAX code (NHWC x, HWIO w, stride 1): each
    of the three kernels is one ``pure_callback`` into TensorFlow
    (imported here, on the calling thread: a first import inside a
    callback, on one of XLA's threads, crashes the process)."""
    import jax
    _tf()

    @jax.custom_vjp
    def conv(x, w):
        return callbacks(x.shape, w.shape, padding, x.dtype)[0](x, w)

    def fwd(x, w):
        return conv(x, w), (x, w)

    def bwd(res, dy):
        x, w = res
        _, gx, gw = callbacks(x.shape, w.shape, padding, x.dtype)
        return gx(w, dy), gw(x, dy)

    conv.defvjp(fwd, bwd)
    return conv


def patch_layers() -> None:
    """Makes ``dlfix_jax.models.layers.Conv`` (for models built after this
    call, in this process) route every convolution whose
    ``Conv.cpu_path`` is ``"chunked"`` or ``"xla"`` (the ones XLA:CPU's
    own convolution kernels would run) through :func:`make_conv`; its
    other CPU paths (small-input im2col, one-channel convolution) and
    other backends are unchanged.
    For the A/B measurement only."""
    import flax.linen as nn

    from dlfix_jax.models import layers

    base = layers.Conv
    convs = {p: make_conv(p) for p in ("SAME", "VALID")}

    class OneDnnConv(base):
        @nn.compact
        def __call__(self, x):
            if self.cpu_path(x) not in ("chunked", "xla"):
                return base.__call__(self, x)
            kh, kw = self.kernel_size
            kernel = self.param("kernel", self.kernel_init,
                                (kh, kw, x.shape[-1], self.features),
                                self.param_dtype)
            y = convs[self.padding](x, kernel)
            if self.use_bias:
                y = y + self.param("bias", self.bias_init, (self.features,),
                                   self.param_dtype)
            return y

    layers.Conv = OneDnnConv
