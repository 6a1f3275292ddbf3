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
``dlfix_jax``: its gradient is reverse mode only (``custom_vjp``, no
``jvp``, so no forward-over-reverse Hessians), ``vmap`` over it runs the
callback once per batch element, and it makes TensorFlow a runtime
dependency of the model layers (BENCHMARKS.md, "VGG16 on CPU").
"""

from __future__ import annotations

STRIDES = [1, 1, 1, 1]


def _tf():
    import tensorflow as tf
    return tf


def out_shape(x_shape, w_shape, padding: str) -> tuple:
    """NHWC output shape of a stride-1 ``padding`` convolution."""
    b, h, w, _ = x_shape
    kh, kw, _, f = w_shape
    if padding == "SAME":
        return (b, h, w, f)
    return (b, h - kh + 1, w - kw + 1, f)


def forward(x, w, padding: str):
    """oneDNN forward convolution on host arrays (NHWC x, HWIO w)."""
    return _tf().nn.conv2d(x, w, 1, padding).numpy()


def grad_input(w, dy, x_shape, padding: str):
    """oneDNN input gradient (``Conv2DBackpropInput``) on host arrays."""
    tf = _tf()
    return tf.raw_ops.Conv2DBackpropInput(
        input_sizes=list(x_shape), filter=w, out_backprop=dy,
        strides=STRIDES, padding=padding).numpy()


def grad_kernel(x, dy, w_shape, padding: str):
    """oneDNN kernel gradient (``Conv2DBackpropFilter``) on host arrays."""
    tf = _tf()
    return tf.raw_ops.Conv2DBackpropFilter(
        input=x, filter_sizes=list(w_shape), out_backprop=dy,
        strides=STRIDES, padding=padding).numpy()


def _callback(fn, shape, *args):
    import jax
    import jax.numpy as jnp
    return jax.pure_callback(fn, jax.ShapeDtypeStruct(shape, jnp.float32),
                             *args, vmap_method="sequential")


def make_conv(padding: str):
    """``conv(x, w)`` for jitted JAX code: each of the three kernels is one
    ``pure_callback`` into TensorFlow (imported here, on the calling
    thread: a first import inside a callback, on one of XLA's threads,
    crashes the process)."""
    import jax
    _tf()

    @jax.custom_vjp
    def conv(x, w):
        return _callback(lambda a, b: forward(a, b, padding),
                         out_shape(x.shape, w.shape, padding), x, w)

    def fwd(x, w):
        return conv(x, w), (x, w)

    def bwd(res, dy):
        x, w = res
        xs, ws = tuple(x.shape), tuple(w.shape)
        return (_callback(lambda a, b: grad_input(a, b, xs, padding),
                          xs, w, dy),
                _callback(lambda a, b: grad_kernel(a, b, ws, padding),
                          ws, x, dy))

    conv.defvjp(fwd, bwd)
    return conv


def patch_layers() -> None:
    """Makes ``dlfix_jax.models.layers.Conv`` (for models built after this
    call, in this process) route every convolution it would give
    ``nn.Conv`` (stride 1, no dilation or groups, SAME/VALID) through
    :func:`make_conv`; its own CPU paths (small-input im2col, one-channel
    convolution) are kept. For the A/B measurement only."""
    import flax.linen as nn

    from dlfix_jax.models import layers

    base = layers.Conv
    convs = {p: make_conv(p) for p in ("SAME", "VALID")}

    class OneDnnConv(base):
        @nn.compact
        def __call__(self, x):
            kh, kw = self.kernel_size
            plain = (x.ndim == 4 and layers._all_ones(self.strides)
                     and self.feature_group_count == 1
                     and layers._all_ones(self.kernel_dilation)
                     and layers._all_ones(self.input_dilation)
                     and self.padding in ("SAME", "VALID")
                     and x.shape[-1] > 1
                     and not (self.padding == "SAME"
                              and x.shape[1] * x.shape[2] < kh * kw))
            if not plain:
                return base.__call__(self, x)
            kernel = self.param("kernel", self.kernel_init,
                                (kh, kw, x.shape[-1], self.features),
                                self.param_dtype)
            y = convs[self.padding](x, kernel)
            if self.use_bias:
                y = y + self.param("bias", self.bias_init, (self.features,),
                                   self.param_dtype)
            return y

    layers.Conv = OneDnnConv
