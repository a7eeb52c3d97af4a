"""resnet18 on gtsrb as in Schwaiger et al. (2022), Table 1.

python launch.py --config=configs/gtsrb_resnet.py        # CPU-sized (default)
python launch.py --config=configs/gtsrb_resnet.py:paper  # the study's setting, for accelerators
"""

from compax.config import study_config


def get_config(size: str = "cpu"):
    return study_config("gtsrb", "resnet18", size)
