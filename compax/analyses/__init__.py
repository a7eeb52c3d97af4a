"""The analyses of a run, registered by name: each compares a compressed population with the original.

`compax.measure` holds the research as pure functions (confusion changes, ECE, saliency, Welch
tests, ...); each module here turns one of them into an analysis of a run, in the shape of
big_vision's evaluators:

- `settings`: its keys with their defaults, its own block `config.analysis.<name>.<key>`
  (`base_config` adds it), checked by `check` before any stage runs;
- `applies(model, data)`: None when it can analyse the run's flax module on data shaped like
  `data` (`DataInfo`), else the reason in one line (Grad-CAM needs a convolution); checked
  before any stage runs;
- `baseline(ref)`: results of the original population alone (e.g. its ECE);
- `compare(ref, variant)`: (results, arrays) of one compressed population against the original,
  results JSON-ready, arrays (numpy) for the figures; results.json holds them under
  `variants.<variant>.<name>` (and `variants.baseline.<name>`), the arrays under
  `<variant>.<name>.<key>` in analysis/arrays.npz;
- `columns(results)`: its headline cells of one variant in the report's summary table;
- `report(page, results, arrays)`: its tables and figures, drawn from its results only.

The package (its base, `base.py`) and every analysis module import no numerical library beyond
numpy at import time (they import jax and `compax.measure` inside the methods that compute), so
that the config, which lists their settings, loads in a fraction of a second. A new analysis is
one module with an `@register_analysis` class (importing `compax.analyses.base`), plus its name in
the import line at the end of this file.
`compax/analyse_population.py` runs the enabled ones for every variant (`Reference`, `Compared`:
`compax/analyses/reference.py`).

`--config.analysis.analyses` is "default" (every registered analysis that applies to the run's
model: one that does not is skipped, its reason logged, recorded in results.json's
`skipped_analyses` and shown in the report) or a comma-separated list (each must apply, or the
run is refused before any stage).
"""

from compax.analyses.base import (  # noqa: F401  (the package's API)
    ANALYSES,
    DEFAULT,
    RESERVED_NAMES,
    Analysis,
    DataInfo,
    applicable_analyses,
    check_analyses,
    finite,
    fmt,
    fmt_mean_std,
    integer_setting,
    mean_std,
    named_analyses,
    register_analysis,
    settings_block,
    subset,
)

# The registered analyses, in the order of the report: a new one is a module beside this file and
# its name here.
# isort: off
from compax.analyses import classes, calibration, attention, hooker, embeddings, attacks  # noqa: E402,F401
# isort: on
