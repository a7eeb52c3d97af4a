"""squeezenet on gtsrb as in Schwaiger et al. (2022), Table 1.

python launch.py --config=configs/gtsrb_squeezenet.py        # paper-sized on accelerators, else CPU-sized
python launch.py --config=configs/gtsrb_squeezenet.py:paper  # the study's setting, forced
"""

from compax.config import study_config


def get_config(size: str = "auto"):
    return study_config("gtsrb", "squeezenet", size)
