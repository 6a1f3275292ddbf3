"""Base-model training (:mod:`.train`) and checkpoints (:mod:`.checkpoint`).

``train_and_evaluate(config, workdir) -> TrainResult`` trains a config of
``experiments/configs``; ``load_model(path)`` reads back a workdir of ours
or a Keras ``.h5`` file; ``load_history(workdir)`` gives the per-epoch
variables.
"""

from dlfix_jax.training.checkpoint import (CheckpointError, load_history,
                                           load_model, load_variables,
                                           save_variables)
from dlfix_jax.training.train import TrainResult, train_and_evaluate

__all__ = ["train_and_evaluate", "TrainResult", "load_model", "load_history",
           "load_variables", "save_variables", "CheckpointError"]
