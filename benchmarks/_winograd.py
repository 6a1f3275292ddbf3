"""Winograd F(2x2, 3x3) convolution in plain JAX: an experiment for
``benchmarks.conv_kernels`` (framework ``winograd``), not a library path.

A stride-1 SAME 3x3 convolution computes each 2x2 output tile from a 4x4
input tile with 16 products per channel pair instead of 36 (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", CVPR 2016):
``Y = A^T [(G g G^T) * (B^T d B)] A``. Here the input transform is done
with strided slices and signed adds, the 16 products are one batched
(16, tiles, C) x (16, C, F) matmul, and the output transform is signed
adds again; both gradients come from JAX's autodiff of that program
(no hand-written transposed transform). Equal to
``lax.conv_general_dilated`` within float32 round-off (the transforms'
coefficients are 0, +-1 and +-1/2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The F(2x2, 3x3) matrices (Lavin & Gray, section 4.1).
B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
             np.float32)
A_T = ((1, 1, 1, 0), (0, 1, -1, -1))


def _signed_sum(coefs, parts):
    """sum(c * p) for coefficients in {-1, 0, 1}, with no multiplies."""
    out = None
    for c, p in zip(coefs, parts):
        if c:
            term = p if c == 1 else -p
            out = term if out is None else out + term
    return out


def conv3x3_same(x, w):
    """Stride-1 SAME convolution of NHWC ``x`` with a 3x3 HWIO kernel
    ``w`` (any H, W >= 1; odd sizes are padded to whole tiles and
    cropped)."""
    if w.shape[:2] != (3, 3):
        raise ValueError(f"conv3x3_same needs a 3x3 kernel, got {w.shape}")
    n, h, wd, c = x.shape
    f = w.shape[-1]
    th, tw = -(-h // 2), -(-wd // 2)
    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - wd),
                     (0, 0)))
    rows = [xp[:, i:i + 2 * th:2] for i in range(4)]
    v = []
    for a in range(4):
        r = _signed_sum(B_T[a], rows)
        cols = [r[:, :, j:j + 2 * tw:2] for j in range(4)]
        v.extend(_signed_sum(B_T[b], cols) for b in range(4))
    v = jnp.stack(v).reshape(16, n * th * tw, c)
    u = jnp.einsum("ai,ijcf,bj->abcf", G, w, G).reshape(16, c, f)
    m = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))
    m = m.reshape(4, 4, n, th, tw, f)
    t = [[_signed_sum(A_T[r], [m[a, b] for a in range(4)])
          for b in range(4)] for r in range(2)]
    y = jnp.stack([jnp.stack([_signed_sum(A_T[s], t[r]) for s in range(2)],
                             axis=3) for r in range(2)], axis=2)
    return y.reshape(n, 2 * th, 2 * tw, f)[:, :h, :wd]
