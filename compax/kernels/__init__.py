"""CPU convolution kernels where XLA:CPU is far slower than the study's PyTorch: hand-written ones
for few channels (conv_cpu.py) and oneDNN's for wide layers (conv_onednn.py).

`cpu_convolutions()` swaps them into any flax model by interception, around a function being traced.
"""

from compax.kernels.conv_cpu import cpu_convolutions

__all__ = ["cpu_convolutions"]
