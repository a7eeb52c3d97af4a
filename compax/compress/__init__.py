"""Model compression as functional transforms on flax parameter pytrees (and on the forward pass).

Pruning: `global_l1_masks` (torch's global_unstructured with L1Unstructured), `apply_masks`,
structured `layer_filter_masks` / `global_filter_masks`, sweeps over sparsity levels and the
selection of the largest level that keeps accuracy, sparsity reports. Quantization: the fake-quant
kernel with a straight-through gradient, PyTorch's observers, fbgemm-style post-training
quantization (`ptq`, `quantized_apply`) and its true-integer execution (`int8_apply`). Variants are
recipes of registered steps (`registry.py`, the methods in `methods/`); `apply_compressed`
evaluates a variant (one model's: `compax.one_model.compress`); `size.py` counts bytes, `flops.py`
multiply-adds.
"""

from compax.compress.compressed import (
    VARIANTS,
    Compressed,
    apply_compressed,
    compression_ratio,
    size_bytes,
)
from compax.compress.int8 import int8_apply
from compax.compress.prune import apply_masks, global_l1_masks, layer_l1_masks, num_to_prune
from compax.compress.ptq import QuantConfig, QuantState, ptq, quantized_apply
from compax.compress.quant import dequantize, fake_quant, quantize
from compax.compress.size import storage_bytes
from compax.compress.sparsity import sparsity_report
from compax.compress.structured import global_filter_masks, layer_filter_masks
from compax.compress.sweep import (
    FIXED_LEVELS,
    level_masks,
    select_max_sparsity,
    sparsity_sweep,
)

__all__ = [
    "FIXED_LEVELS", "VARIANTS", "Compressed", "QuantConfig", "QuantState", "apply_compressed",
    "apply_masks", "compression_ratio", "dequantize", "fake_quant", "global_filter_masks",
    "global_l1_masks", "int8_apply", "layer_filter_masks", "layer_l1_masks", "level_masks",
    "num_to_prune", "ptq",
    "quantize", "quantized_apply", "select_max_sparsity", "size_bytes", "sparsity_report",
    "sparsity_sweep", "storage_bytes",
]
