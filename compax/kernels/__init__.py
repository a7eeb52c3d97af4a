"""Hand-written CPU kernels where XLA:CPU is far slower than the study's PyTorch (see conv_cpu.py).

`cpu_convolutions()` swaps them into any flax model by interception, around a function being traced.
"""

from compax.kernels.conv_cpu import cpu_convolutions

__all__ = ["cpu_convolutions"]
