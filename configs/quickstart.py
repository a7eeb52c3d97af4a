"""LeNet-5 on the embedded synthetic_signs data: needs no files, runs in a few minutes on 2 CPU cores.

python launch.py --config=configs/quickstart.py --workdir=runs/quickstart
"""

from compax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "synthetic_signs"
    c.model = "lenet5"
    c.population = 2
    c.max_epochs = 15
    c.patience = 5
    return c
