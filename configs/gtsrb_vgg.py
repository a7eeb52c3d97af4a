"""VGG-6 (Zee, Lakshmana and Nwogu) on gtsrb, with their compressions: pruning, 8-bit
quantization, filter pruning with the filters removed, and layer ablation, beside the study's
variants.

python launch.py --config=configs/gtsrb_vgg.py        # paper size on accelerators, else width 0.25
python launch.py --config=configs/gtsrb_vgg.py:paper  # full width, patience 40, for accelerators
"""

from compax.config import study_config


def get_config(size: str = "auto"):
    c = study_config("gtsrb", "vgg6", size)
    c.compress.variants = c.compress.variants + ("pruned_layer", "filters_pruned", "ablated")
    return c
