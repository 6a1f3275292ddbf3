"""Dataset flags shared by ``dlfix fix`` and ``dlfix evaluate`` (defined
once, so both modules can be imported in one process)."""

from absl import flags

DATASET = flags.DEFINE_string("dataset", None,
                              "Dataset name (dlfix_jax.data.names()).")
DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (default: "
                               "$DLFIX_DATA_DIR or ../shared/data).")
DATA_SEED = flags.DEFINE_integer("data_seed", 0, "Split seed of the dataset "
                                 "(must match the one the models were "
                                 "trained/fixed with).")
