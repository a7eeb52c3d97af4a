"""Every module that registers a compression step or an analysis. A new method or analysis is a
new module plus one import line here; importing this module makes the registries complete."""

from compax.analyses import attacks, attention, calibration, classes, embeddings, hooker  # noqa: F401
from compax.compress.methods import (  # noqa: F401  # noqa: F401
    ablation,
    cast,
    dynamic,
    filters,
    half_storage,
    quantize,
    training,
    unstructured,
)
