"""Every module that registers a compression step or an analysis. A new method is a new module
plus one import line here, a new analysis a new module plus its name in the import line at the end
of `compax/analyses/__init__.py` (which imports no jax, for the config); importing this module
makes the registries complete."""

import compax.analyses  # noqa: F401  (registers the analyses)
from compax.compress.methods import (  # noqa: F401
    ablation,
    cast,
    distill,
    dynamic,
    filters,
    gradient_prune,
    half_storage,
    quantize,
    random_prune,
    snip,
    training,
    unstructured,
)
