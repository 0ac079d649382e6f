"""Train this bundle: ``python scripts/train.py run --config_file configs/hyper_parameters.yaml [--key value]``.

Works under ``torchrun`` too. Exit 0 when done (or already done), 75 after a checkpoint on
SIGUSR1/SIGTERM (rerun the same command to resume).
"""

import sys

from training.trainer import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
