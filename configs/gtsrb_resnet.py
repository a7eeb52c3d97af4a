"""resnet18 on gtsrb as in Schwaiger et al. (2022), Table 1.

python launch.py --config=configs/gtsrb_resnet.py        # paper-sized on accelerators, else CPU-sized
python launch.py --config=configs/gtsrb_resnet.py:paper  # the study's setting, forced
"""

from compax.config import study_config


def get_config(size: str = "auto"):
    return study_config("gtsrb", "resnet18", size)
