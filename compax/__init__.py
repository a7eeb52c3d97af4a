"""compax: what model compression does to a CNN beyond test accuracy."""
