"""Table 1 of Schwaiger, Schwienbacher & Roscher, "Beyond Test Accuracy: The Effects of Model
Compression on CNNs" (SafeAI 2022), as data, to set every run next to the study's row.

Accuracy of the uncompressed model in %, the pruned share in % (of all parameters, see DESIGN.md)
and the change of each compressed variant in percentage points, as printed in the paper
(../shared/paper_table1.md).
"""

# (model, dataset) -> row; variant names are compax's.
TABLE1 = {
    ("lenet5", "gtsrb"): {"pruned_percent": 54.8, "accuracy": 92.3,
                          "diff_pp": {"pruned": -0.4, "w4a8": -0.4, "w8a8": -0.2, "pruned_w8a8": -0.7}},
    ("lenet5", "cifar10"): {"pruned_percent": 39.8, "accuracy": 74.8,
                            "diff_pp": {"pruned": -0.5, "w4a8": -7.9, "w8a8": -0.1,
                                        "pruned_w8a8": -0.6}},
    ("squeezenet", "gtsrb"): {"pruned_percent": 49.4, "accuracy": 93.0,
                              "diff_pp": {"pruned": -0.8, "w4a8": -2.2, "w8a8": -0.2,
                                          "pruned_w8a8": -0.8}},
    ("squeezenet", "cifar10"): {"pruned_percent": 49.4, "accuracy": 84.5,
                                "diff_pp": {"pruned": -0.4, "w4a8": -4.0, "w8a8": 0.0,
                                            "pruned_w8a8": -0.4}},
    ("resnet18", "gtsrb"): {"pruned_percent": 67.4, "accuracy": 95.4,
                            "diff_pp": {"pruned": 0.0, "w4a8": -0.2, "w8a8": -0.1, "pruned_w8a8": -0.1}},
    ("resnet18", "cifar10"): {"pruned_percent": 72.4, "accuracy": 86.5,
                              "diff_pp": {"pruned": 0.0, "w4a8": -0.9, "w8a8": -0.1,
                                          "pruned_w8a8": -0.2}},
}
TABLE1_VARIANTS = ("pruned", "w4a8", "w8a8", "pruned_w8a8")


def table1_row(model: str, dataset: str) -> dict | None:
    """The study's row for a model and dataset, or None where the study has none."""
    return TABLE1.get((model, dataset))
