"""dlfix_jax: deep-learning model fixing approaches in JAX/Flax, and the
harness that measures their side effects."""

__version__ = "0.1.0"
