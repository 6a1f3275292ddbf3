"""Models: one functional interface (``Model.init`` / ``Model.apply``).

See :mod:`dlfix_jax.models.base` for the interface and the (layer, unit)
addressing scheme, :mod:`dlfix_jax.models.zoo` for the study's models.
"""

from dlfix_jax.models.base import (Model, Variables, count_params,
                                   get_layer_params, param_layers,
                                   set_layer_params)
from dlfix_jax.models.layers import LayerSpec, spec
from dlfix_jax.models.zoo import get, names, register, sequential

__all__ = ["Model", "Variables", "LayerSpec", "spec", "get", "names",
           "register", "sequential", "count_params", "get_layer_params",
           "set_layer_params", "param_layers"]
