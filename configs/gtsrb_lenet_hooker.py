"""Hooker et al. (2019) as they ran it, on GTSRB LeNet-5: 30 independently seeded members per level
(`compax.config.hooker_config`: gradual pruning to 0.3/0.5/0.7/0.9 from scratch, post-training
variants of the baseline members, every analysis).

python launch.py --config=configs/gtsrb_lenet_hooker.py --workdir=runs/gtsrb_lenet_hooker
python launch.py --config=configs/gtsrb_lenet_hooker.py:members=4 ...   # fewer members per level
"""

from compax.config import hooker_config


def get_config(arg: str = ""):
    return hooker_config("gtsrb", arg)
