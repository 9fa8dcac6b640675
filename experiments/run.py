"""Run an experiment from a config file.

    python -m experiments.run --config=configs/default.py --workdir=/tmp/run \
        [--config.data.seqlen=1024 ...]

Overrides are type-checked against the config; unknown keys are errors.
"""

from absl import app, flags
from ml_collections import config_flags

import shrinkjax.run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/shrinkjax", "Where outputs go.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    shrinkjax.run.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
