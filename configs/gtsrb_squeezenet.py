"""squeezenet on gtsrb as in Schwaiger et al. (2022), Table 1.

python launch.py --config=configs/gtsrb_squeezenet.py        # CPU-sized (default)
python launch.py --config=configs/gtsrb_squeezenet.py:paper  # the study's setting, for accelerators
"""

from compax.config import study_config


def get_config(size: str = "cpu"):
    return study_config("gtsrb", "squeezenet", size)
