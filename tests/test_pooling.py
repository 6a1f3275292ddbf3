"""The tiled max-pooling fast path (layers.Pool / tiled_max_pool) against
flax's nn.max_pool: same outputs, JVPs and VJPs (ties included), and the
general path for configurations the fast path does not cover."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlfix_jax import models
from dlfix_jax.models import layers as L

# (input NHWC shape, window, padding) handled by the fast path.
FAST = [
    ((3, 24, 24, 6), (3, 3), "VALID"),   # LeNet5's first pool
    ((3, 6, 6, 16), (2, 2), "VALID"),    # LeNet5's second pool
    ((2, 32, 32, 4), (2, 2), "VALID"),   # VGG16 block pools
    ((2, 8, 8, 3), (2, 2), "SAME"),      # SAME that pads nothing
    ((2, 7, 9, 3), (2, 2), "VALID"),     # trailing row/column dropped
    ((2, 6, 6, 2), (2, 3), "VALID"),     # non-square window
    ((2, 1, 1, 5), (1, 1), "VALID"),
]
# (input shape, window, strides, padding) left to nn.max_pool.
GENERAL = [
    ((2, 7, 7, 3), (2, 2), (2, 2), "SAME"),    # pads
    ((2, 9, 9, 3), (3, 3), (2, 2), "VALID"),   # overlapping windows
    ((2, 8, 8, 3), (2, 2), (1, 1), "SAME"),
]


def _inputs(shape, seed, ties):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if ties:  # many exact ties inside windows
        x = np.round(x)
    return jnp.asarray(x)


def _pool(window, strides, padding):
    module = L.Pool(kind="max", window=window, strides=strides,
                    padding=padding)
    return lambda x: module.apply({}, x)


def _assert_same_derivatives(fast, ref, x, seed):
    y_ref, vjp_ref = jax.vjp(ref, x)
    y_fast, vjp_fast = jax.vjp(fast, x)
    np.testing.assert_array_equal(y_fast, y_ref)
    g = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(
        y_ref.shape).astype(np.float32))
    np.testing.assert_array_equal(vjp_fast(g)[0], vjp_ref(g)[0])
    t = jnp.asarray(np.random.default_rng(seed + 2).standard_normal(
        x.shape).astype(np.float32))
    np.testing.assert_array_equal(jax.jvp(fast, (x,), (t,))[1],
                                  jax.jvp(ref, (x,), (t,))[1])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape,window,padding", FAST)
def test_fast_path_equals_max_pool(shape, window, padding, ties):
    assert L._tiles(shape, window, window, padding)
    x = _inputs(shape, 0, ties)
    ref = lambda x: nn.max_pool(x, window, window, padding)
    _assert_same_derivatives(_pool(window, None, padding), ref, x, 0)
    _assert_same_derivatives(jax.jit(_pool(window, None, padding)),
                             jax.jit(ref), x, 3)


def test_all_ties_derivative_goes_to_first_element():
    # Constant windows: select-and-scatter gives the whole cotangent to the
    # first (row-major) element of each window; so must the fast path.
    x = jnp.zeros((1, 4, 6, 2))
    g = jnp.arange(1.0, 1 + 1 * 2 * 2 * 2).reshape(1, 2, 2, 2)
    grad = jax.vjp(lambda x: L.tiled_max_pool(x, (2, 3)), x)[1](g)[0]
    expected = np.zeros((1, 4, 6, 2), np.float32)
    expected[:, ::2, ::3] = g
    np.testing.assert_array_equal(grad, expected)


def test_fast_path_backward_has_no_select_and_scatter():
    x = jnp.ones((2, 8, 8, 3))
    grad = jax.grad(lambda x: jnp.sum(_pool((2, 2), None, "VALID")(x)))
    assert "select_and_scatter" not in str(jax.make_jaxpr(grad)(x))
    assert "reduce_window" not in str(jax.make_jaxpr(grad)(x))


def test_fast_path_vmaps():
    x = _inputs((3, 2, 6, 6, 2), 5, ties=True)
    f = _pool((2, 2), None, "VALID")
    ref = lambda x: nn.max_pool(x, (2, 2), (2, 2), "VALID")
    np.testing.assert_array_equal(
        jax.vmap(jax.grad(lambda x: jnp.sum(f(x) ** 2)))(x),
        jax.vmap(jax.grad(lambda x: jnp.sum(ref(x) ** 2)))(x))


@pytest.mark.parametrize("shape,window,strides,padding", GENERAL)
def test_general_path_kept(shape, window, strides, padding):
    assert not L._tiles(shape, window, strides, padding)
    x = _inputs(shape, 1, ties=True)
    ref = lambda x: nn.max_pool(x, window, strides, padding)
    f = _pool(window, strides, padding)
    assert "reduce_window" in str(jax.make_jaxpr(f)(x))
    _assert_same_derivatives(f, ref, x, 1)


def test_avg_pool_unchanged():
    x = _inputs((2, 7, 7, 3), 2, ties=False)
    f = L.Pool(kind="avg", window=(2, 2), padding="SAME")
    np.testing.assert_array_equal(
        f.apply({}, x),
        nn.avg_pool(x, (2, 2), (2, 2), "SAME", count_include_pad=False))


def test_lenet5_gradients_identical_to_reduce_window(monkeypatch):
    model = models.get("lenet5")
    v = model.init(jax.random.key(0))
    x = _inputs((8, 28, 28, 1), 4, ties=False)
    y = jnp.arange(8) % 10

    def grads():
        def loss(p):
            logits = model.apply({**v, "params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, y).mean()
        return jax.jit(jax.value_and_grad(loss))(v["params"])

    fast = grads()
    monkeypatch.setattr(L, "_tiles", lambda *a: False)
    ref = grads()
    jax.tree.map(np.testing.assert_array_equal, fast, ref)


@pytest.mark.parametrize("shape,kernel", [((3, 2, 2, 8), (3, 3)),
                                          ((2, 1, 1, 4), (3, 3)),
                                          ((2, 2, 3, 5), (5, 5))])
def test_small_input_conv_matches_nn_conv(shape, kernel):
    """The im2col path (input smaller than the kernel window) has nn.Conv's
    parameters and equals it within float32 round-off, values and grads."""
    import flax.linen as nn
    from dlfix_jax.models import layers
    x = jax.random.normal(jax.random.key(0), shape)
    ours = layers.Conv(6, kernel, padding="SAME")
    ref = nn.Conv(6, kernel, padding="SAME")
    v = ref.init(jax.random.key(1), x)
    v_ours = ours.init(jax.random.key(1), x)
    for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(v_ours)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(ours.apply(v, x)),
                               np.asarray(ref.apply(v, x)), rtol=1e-5, atol=1e-5)
    g1 = jax.grad(lambda vv: jnp.sum(jnp.sin(ours.apply(vv, x))))(v)
    g2 = jax.grad(lambda vv: jnp.sum(jnp.sin(ref.apply(vv, x))))(v)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


ONE_CHANNEL = [((3, 28, 28, 1), (5, 5), "VALID"),   # LeNet5's conv1
               ((2, 9, 7, 1), (3, 2), "SAME"),
               ((2, 8, 8, 1), (3, 3), "SAME")]


def _conv_pair(shape, kernel, padding, features=4):
    x = jax.random.normal(jax.random.key(0), shape)
    ours = L.Conv(features, kernel, padding=padding)
    ref = nn.Conv(features, kernel, padding=padding)
    v = ref.init(jax.random.key(1), x)
    v_ours = ours.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, v, v_ours)
    return x, v, ours, ref


def _close(a, b, rtol=1e-4, atol=1e-5):
    jax.tree.map(lambda p, q: np.testing.assert_allclose(
        np.asarray(p), np.asarray(q), rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("shape,kernel,padding", ONE_CHANNEL)
def test_one_channel_conv_matches_nn_conv(shape, kernel, padding):
    """The one-input-channel CPU path: nn.Conv's parameters, its values,
    gradients (parameters and input), JVPs and vmap within round-off."""
    x, v, ours, ref = _conv_pair(shape, kernel, padding)
    assert "one_channel_conv" in str(jax.make_jaxpr(
        lambda x: ours.apply(v, x))(x))
    _close(ours.apply(v, x), ref.apply(v, x), 1e-5, 1e-5)
    loss = lambda m: lambda vv, xx: jnp.sum(jnp.sin(m.apply(vv, xx)))
    _close(jax.grad(loss(ours), argnums=(0, 1))(v, x),
           jax.grad(loss(ref), argnums=(0, 1))(v, x))
    _close(jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(v, x),
           jax.grad(loss(ref), argnums=(0, 1))(v, x))
    tv = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)
                                        ).reshape(a.shape), v)
    tx = jnp.sin(x)
    _close(jax.jvp(lambda vv, xx: ours.apply(vv, xx), (v, x), (tv, tx))[1],
           jax.jvp(lambda vv, xx: ref.apply(vv, xx), (v, x), (tv, tx))[1])
    gx = lambda m: jax.vmap(jax.grad(lambda xx: loss(m)(v, xx[None])))(x)
    _close(gx(ours), gx(ref))


def test_one_channel_conv_fence_vmap_hessian_nan():
    """The fenced forward (a one-trip while loop) keeps vmap over inputs and
    over kernels, second derivatives and NaN propagation of a plain conv."""
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.random.uniform(jax.random.key(2), (3, 2, 9, 8, 1))
    k = jax.random.normal(jax.random.key(3), (3, 3, 2, 1, 4))
    assert "while" in str(jax.make_jaxpr(L.one_channel_conv)(x[0], k[0]))
    _close(jax.vmap(L.one_channel_conv)(x, k), jax.vmap(conv)(x, k))
    _close(jax.vmap(L.one_channel_conv, (None, 0))(x[0], k),
           jax.vmap(conv, (None, 0))(x[0], k))
    sq = lambda f: lambda kk: jnp.sum(jnp.sin(f(x[0], kk)))
    _close(jax.hessian(sq(L.one_channel_conv))(k[0]),
           jax.hessian(sq(conv))(k[0]))
    y = L.one_channel_conv(x[0].at[0, 0, 0, 0].set(jnp.nan), k[0])
    assert bool(jnp.isnan(y[0, 0, 0]).all())
    assert not bool(jnp.isnan(y[1]).any())


def test_one_channel_conv_switch_and_multi_channel_untouched(monkeypatch):
    x, v, ours, _ = _conv_pair((2, 8, 8, 1), (3, 3), "VALID")
    monkeypatch.setattr(L, "ONE_CHANNEL_CONV", False)
    jaxpr = str(jax.make_jaxpr(lambda x: ours.apply(v, x))(x))
    assert "one_channel_conv" not in jaxpr and "conv_general_dilated" in jaxpr
    monkeypatch.setattr(L, "ONE_CHANNEL_CONV", True)
    x2, v2, ours2, _ = _conv_pair((2, 8, 8, 2), (3, 3), "VALID")
    jaxpr = str(jax.make_jaxpr(lambda x: ours2.apply(v2, x))(x2))
    assert "one_channel_conv" not in jaxpr and "conv_general_dilated" in jaxpr


def test_cpu_workarounds_only_on_cpu(monkeypatch):
    """On a backend other than XLA:CPU every layer is plain flax/XLA."""
    assert L.on_cpu() == (jax.default_backend() == "cpu")
    monkeypatch.setattr(L, "on_cpu", lambda: False)
    for shape, kernel, padding in [((2, 8, 8, 1), (3, 3), "VALID"),
                                   ((2, 2, 2, 4), (3, 3), "SAME"),
                                   ((2, 8, 8, 3), (3, 3), "SAME")]:
        x, v, ours, ref = _conv_pair(shape, kernel, padding)
        jaxpr = str(jax.make_jaxpr(lambda x: ours.apply(v, x))(x))
        assert "one_channel_conv" not in jaxpr and "conv_general_dilated" in jaxpr
        assert "custom_jvp" not in jaxpr
        np.testing.assert_array_equal(ours.apply(v, x), ref.apply(v, x))
    x = _inputs((2, 8, 8, 3), 0, ties=False)
    assert "reduce_window" in str(jax.make_jaxpr(
        _pool((2, 2), None, "VALID"))(x))


@pytest.mark.parametrize("max_width", [0, 32])
def test_one_channel_kernel_gradient_both_forms(monkeypatch, max_width):
    """The kernel gradient (and forward tangent) equals XLA's in the banded
    form (inputs up to ``BANDED_MAX_WIDTH`` wide) and in the im2col form
    (wider inputs; forced here with a width limit of 0)."""
    monkeypatch.setattr(L, "BANDED_MAX_WIDTH", max_width)
    kx, kk, kd = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (3, 10, 9, 1))
    k = jax.random.normal(kk, (4, 3, 1, 5))
    ref = lambda k_: jax.lax.conv_general_dilated(  # noqa: E731
        x, k_, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    dy = jax.random.normal(kd, ref(k).shape)
    got = jax.grad(lambda k_: jnp.vdot(L.one_channel_conv(x, k_), dy))(k)
    want = jax.grad(lambda k_: jnp.vdot(ref(k_), dy))(k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    t = jax.random.normal(kd, k.shape)
    _, jvp = jax.jvp(lambda k_: L.one_channel_conv(x, k_), (k,), (t,))
    np.testing.assert_allclose(jvp, jax.jvp(ref, (k,), (t,))[1],
                               rtol=1e-5, atol=1e-5)


# (input shape, kernel, padding, KERNEL_GRAD_ROWS): several chunks with a
# remainder, one chunk, SAME and VALID, non-square kernels.
CHUNKED = [((7, 8, 8, 3), (3, 3), "SAME", 128),     # chunks of 2, one left
           ((5, 10, 9, 6), (5, 5), "VALID", 60),    # LeNet5's conv2 kind
           ((4, 6, 5, 2), (2, 3), "SAME", 2048),    # the batch in one chunk
           ((3, 4, 4, 4), (3, 3), "SAME", 1)]       # one image per chunk


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU paths")
@pytest.mark.parametrize("shape,kernel,padding,rows", CHUNKED)
def test_chunked_kernel_grad_conv_matches_nn_conv(monkeypatch, shape, kernel,
                                                  padding, rows):
    """The multi-channel CPU path (XLA's value and input gradient, the
    chunked kernel gradient): nn.Conv's parameters, values, gradients
    (parameters only, input only, both), JVPs, vmap over kernels and
    Hessians within round-off, whatever the chunking."""
    monkeypatch.setattr(L, "KERNEL_GRAD_ROWS", rows)
    monkeypatch.setattr(L, "CHUNKED_MIN_COLUMN_BYTES", 0)
    x, v, ours, ref = _conv_pair(shape, kernel, padding, features=5)
    assert ours.cpu_path(x) == "chunked"
    loss = lambda m: lambda vv, xx: jnp.sum(jnp.sin(m.apply(vv, xx)))
    assert "scan" in str(jax.make_jaxpr(jax.grad(loss(ours)))(v, x))
    _close(ours.apply(v, x), ref.apply(v, x), 1e-5, 1e-5)
    for argnums in (0, 1, (0, 1)):
        _close(jax.jit(jax.grad(loss(ours), argnums=argnums))(v, x),
               jax.grad(loss(ref), argnums=argnums)(v, x))
    tv = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)
                                        ).reshape(a.shape), v)
    _close(jax.jvp(ours.apply, (v, x), (tv, jnp.sin(x)))[1],
           jax.jvp(ref.apply, (v, x), (tv, jnp.sin(x)))[1])
    vs = jax.tree.map(lambda a: jnp.stack([a, -0.5 * a]), v)
    _close(jax.vmap(jax.grad(loss(ours)), (0, None))(vs, x),
           jax.vmap(jax.grad(loss(ref)), (0, None))(vs, x))
    xs = jnp.stack([x, jnp.cos(x)])  # models and inputs both batched
    _close(jax.vmap(jax.grad(loss(ours)))(vs, xs),
           jax.vmap(jax.grad(loss(ref)))(vs, xs))
    k = v["params"]["kernel"]
    hess = lambda f: jax.hessian(lambda kk: jnp.sum(jnp.sin(f(x, kk))))(k)
    _close(hess(lambda xx, kk: L.chunked_kernel_conv(xx, kk, padding)),
           hess(lambda xx, kk: L._xla_conv(xx, kk, padding)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU paths")
def test_chunked_kernel_grad_one_sided_tangents_and_switch(monkeypatch):
    """Forward mode with only an input tangent (RA's use) or only a kernel
    tangent; ``CHUNKED_KERNEL_GRAD = False`` leaves the convolution wholly
    to nn.Conv (no scan in the gradient)."""
    monkeypatch.setattr(L, "CHUNKED_MIN_COLUMN_BYTES", 0)
    x, v, ours, ref = _conv_pair((3, 8, 8, 3), (3, 3), "SAME")
    tv = jax.tree.map(jnp.cos, v)
    zv = jax.tree.map(jnp.zeros_like, v)
    for tangents in ((zv, jnp.sin(x)), (tv, jnp.zeros_like(x))):
        _close(jax.jvp(ours.apply, (v, x), tangents)[1],
               jax.jvp(ref.apply, (v, x), tangents)[1])
    # Symbolic zeros: no kernel tangent, then no input tangent.
    _close(jax.jvp(lambda xx: ours.apply(v, xx), (x,), (jnp.sin(x),))[1],
           jax.jvp(lambda xx: ref.apply(v, xx), (x,), (jnp.sin(x),))[1])
    _close(jax.jvp(lambda vv: ours.apply(vv, x), (v,), (tv,))[1],
           jax.jvp(lambda vv: ref.apply(vv, x), (v,), (tv,))[1])
    grad = lambda: str(jax.make_jaxpr(jax.grad(  # noqa: E731
        lambda vv: jnp.sum(ours.apply(vv, x))))(v))
    assert "scan" in grad()
    monkeypatch.setattr(L, "CHUNKED_KERNEL_GRAD", False)
    jaxpr = grad()
    assert "scan" not in jaxpr and "custom_jvp" not in jaxpr


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU paths")
@pytest.mark.parametrize("shape,kernel,padding", [
    ((2, 8, 8, 3), (3, 3), "SAME"),      # chunked
    ((2, 8, 8, 1), (3, 3), "VALID"),     # one-channel
    ((2, 2, 2, 4), (3, 3), "SAME")])     # im2col
def test_cpu_paths_promote_dtypes_as_nn_conv(monkeypatch, shape, kernel,
                                             padding):
    """Every CPU path computes in the dtype nn.Conv would: bfloat16 or
    integer inputs with float32 parameters, and an explicit ``dtype``."""
    monkeypatch.setattr(L, "CHUNKED_MIN_COLUMN_BYTES", 0)
    x, v, _, _ = _conv_pair(shape, kernel, padding)
    for xin, dtype in ((x.astype(jnp.bfloat16), None),
                       ((x * 10).astype(jnp.uint8), None),
                       (x, jnp.bfloat16)):
        ours = L.Conv(4, kernel, padding=padding, dtype=dtype)
        ref = nn.Conv(4, kernel, padding=padding, dtype=dtype)
        assert ours.cpu_path(xin) is not None
        got, want = ours.apply(v, xin), ref.apply(v, xin)
        assert got.dtype == want.dtype, (xin.dtype, dtype)
        _close(got.astype(jnp.float32), want.astype(jnp.float32), 2e-2, 2e-2)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU paths")
def test_conv_cpu_path_names_the_path_taken(monkeypatch):
    """``Conv.cpu_path`` (also read by ``benchmarks._onednn_conv``) names
    the path ``__call__`` takes; the small-input path wins over the
    one-channel one; multi-channel convolutions are chunked from
    ``CHUNKED_MIN_COLUMN_BYTES`` of im2col columns; other backends get
    None."""
    default = L.Conv(64, (3, 3), padding="SAME")
    assert default.cpu_path(jnp.zeros((128, 32, 32, 3))) == "chunked"  # VGG16
    assert default.cpu_path(jnp.zeros((16, 32, 32, 3))) == "xla"  # 1.8 MB
    assert L.Conv(16, (3, 3), padding="VALID").cpu_path(
        jnp.zeros((128, 8, 8, 6))) == "xla"  # LeNet5's conv2, 1 MB
    monkeypatch.setattr(L, "CHUNKED_MIN_COLUMN_BYTES", 0)
    cases = [((2, 2, 2, 4), "SAME", {}, "im2col"),
             ((2, 2, 2, 1), "SAME", {}, "im2col"),
             ((2, 8, 8, 1), "VALID", {}, "one_channel"),
             ((2, 8, 8, 3), "SAME", {}, "chunked"),
             ((2, 3, 3, 4), "VALID", {}, "chunked"),
             ((2, 8, 8, 3), "SAME", {"strides": 2}, None),
             ((2, 2, 2, 4), "VALID", {}, None),   # input < kernel
             ((2, 8, 8, 3), "SAME", {"precision": "highest"}, None),
             ((2, 8, 8, 3), "SAME", {"kernel_dilation": 2}, None)]
    for shape, padding, kw, want in cases:
        conv = L.Conv(4, (3, 3), padding=padding, **kw)
        assert conv.cpu_path(jnp.zeros(shape)) == want, (shape, padding, kw)
    monkeypatch.setattr(L, "CHUNKED_KERNEL_GRAD", False)
    assert L.Conv(4, (3, 3), padding="SAME").cpu_path(
        jnp.zeros((2, 8, 8, 3))) == "xla"
    monkeypatch.setattr(L, "ONE_CHANNEL_CONV", False)
    assert L.Conv(4, (3, 3), padding="VALID").cpu_path(
        jnp.zeros((2, 8, 8, 1))) == "xla"
    monkeypatch.setattr(L, "on_cpu", lambda: False)
    assert L.Conv(4, (3, 3), padding="SAME").cpu_path(
        jnp.zeros((2, 2, 2, 4))) is None


def test_lenet5_training_gradients_match_plain_layers(monkeypatch):
    """All CPU paths together on LeNet5 (one-channel conv1, tiled pools)
    against plain flax layers: loss and parameter gradients."""
    model = models.get("lenet5")
    v = model.init(jax.random.key(0))
    x = _inputs((16, 28, 28, 1), 7, ties=False)
    y = jnp.arange(16) % 10

    def grads():
        def loss(p):
            logits = model.apply({**v, "params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, y).mean()
        return jax.jit(jax.value_and_grad(loss))(v["params"])

    fast = grads()
    monkeypatch.setattr(L, "on_cpu", lambda: False)
    ref = grads()
    _close(fast, ref, 1e-4, 1e-6)
