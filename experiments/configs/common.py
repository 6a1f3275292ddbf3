"""Shared defaults of the base-model training configs.

``base(dataset, model, **train)`` returns a ConfigDict with every key the
trainer reads declared (``lock_config=True`` rejects overrides of keys that
do not exist). ``dataset.data_dir`` is a string placeholder: None means the
default (``$DLFIX_DATA_DIR``, else ``../shared/data``), and
``--config.dataset.data_dir=PATH`` overrides it.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base(dataset: str, model: str, *, epochs: int, batch_size: int = 128,
         learning_rate: float = 1e-3, optimizer: str = "adam",
         weight_decay: float = 0.0, momentum: float = 0.9,
         schedule: str = "constant", warmup_epochs: float = 0.0,
         eval_batch_size: int = 1000, seed: int = 0
         ) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = seed

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = dataset
    c.dataset.data_dir = config_dict.placeholder(str)
    c.dataset.seed = 0  # the split seed; the study's splits are fixed

    c.model = ml_collections.ConfigDict()
    c.model.name = model

    c.train = ml_collections.ConfigDict()
    c.train.epochs = epochs
    c.train.batch_size = batch_size
    c.train.learning_rate = learning_rate
    c.train.optimizer = optimizer  # adam | adamw | sgd | momentum
    c.train.weight_decay = weight_decay
    c.train.momentum = momentum  # used by "momentum" only
    c.train.schedule = schedule  # constant | cosine
    c.train.warmup_epochs = warmup_epochs
    c.train.steps_per_call = 50  # steps dispatched between loss checks

    c.eval_batch_size = eval_batch_size
    return c
