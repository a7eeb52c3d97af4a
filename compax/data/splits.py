"""Deterministic train/validation splits: stratified by class, optionally by whole groups."""

import numpy as np


def _num_val(num: int, val_fraction: float) -> int:
    """How many of `num` units of one class go to validation: the rounded fraction, but at least one
    and never all."""
    return int(np.clip(round(val_fraction * num), 1, max(num - 1, 1)))


def group_split(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices holding out whole (label, group) groups, stratified by class.

    For each class, `round(val_fraction * number of its groups)` groups (at least one, and never all
    when the class has two or more) go to validation with all their examples. A (label, group) pair
    is never in both parts. Deterministic from `seed`.
    """
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        in_class = labels == label
        class_groups = np.unique(groups[in_class])
        chosen = rng.permutation(class_groups)[: _num_val(len(class_groups), val_fraction)]
        is_val |= in_class & np.isin(groups, chosen)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices with `round(val_fraction * class size)` examples of each class
    (at least one, and never all) in validation. Deterministic from `seed`."""
    return group_split(labels, np.arange(len(labels)), val_fraction, seed)
