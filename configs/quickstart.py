"""LeNet-5 on the embedded synthetic_signs data: needs no files; the whole study (train, compress,
analyse, report) in minutes on 2 CPU cores.

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
    # The study's four variants and lighter analyses, so that the whole run takes minutes.
    c.compress.variants = ("pruned", "w8a8", "w4a8", "pruned_w8a8")
    c.analysis.saliency.images = 1000
    c.analysis.gradcam.images = 1000
    c.analysis.attacks.images = 32
    return c
