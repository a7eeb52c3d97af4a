"""Hand-written CPU kernels where XLA:CPU is far slower than the study's PyTorch (see conv_cpu.py)."""
