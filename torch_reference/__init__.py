"""PyTorch twins of compax's models and PyTorch's reference runs (quantization, training and
inference steps): test-only references, never imported by compax (PyTorch is not a dependency)."""
