"""Runs the enabled analyses (`compax.analyses`, `--config.analysis.analyses`) for every variant.

The test logits of the original population and of each variant are computed once and shared by
every analysis. Returns results.json's analysis fields: the original population's under
"baseline", each variant's under its name (each analysis documents its keys; means over members
unless named otherwise), "analysis_seconds" (wall seconds per analysis, summed over the original
and every variant, and "predict": the test logits), and `arrays` (numpy, keyed
"<variant>.<name>") that the report draws.
"""

import time

from absl import logging

from compax import methods  # noqa: F401  (registers the analyses)
from compax.analyses import Compared, Reference, check_analyses


def analyse_population(config, dataset, model, original, models: dict, populations: dict,
                       chunk: int, designs: dict | None = None) -> tuple[dict, dict]:
    """(summary for results.json, arrays for the figures) of every variant in `populations`.

    `original` is the uncompressed population as a `Compressed` (leading member axis), `models`
    and `populations` give each variant's flax module and compressed population, `designs` each
    variant's "paired" (the default) or "independent" (`Compared.design`).
    """
    analyses = check_analyses(config.analysis)
    started = time.perf_counter()
    ref = Reference(config, dataset, model, original, chunk)
    seconds = {"predict": time.perf_counter() - started, **{a.name: 0.0 for a in analyses}}
    variants, arrays = {"baseline": {}}, {}
    for analysis in analyses:
        started = time.perf_counter()
        analysis.prepare(ref)
        results, baseline_arrays = analysis.baseline(ref)
        variants["baseline"].update(results)
        arrays.update({f"baseline.{k}": v for k, v in baseline_arrays.items()})
        seconds[analysis.name] += time.perf_counter() - started
        logging.info("analysis %s: original population in %.0f s", analysis.name,
                     time.perf_counter() - started)
    for name, population in populations.items():
        started = time.perf_counter()
        variant = Compared(name, models[name], population, ref.predict(models[name], population),
                           (designs or {}).get(name, "paired"))
        seconds["predict"] += time.perf_counter() - started
        variants[name] = {}
        for analysis in analyses:
            begun = time.perf_counter()
            results, variant_arrays = analysis.compare(ref, variant)
            variants[name].update(results)
            arrays.update({f"{name}.{k}": v for k, v in variant_arrays.items()})
            seconds[analysis.name] += time.perf_counter() - begun
        logging.info("analysed %s in %.0f s", name, time.perf_counter() - started)
    logging.info("analysis seconds: %s", ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return {"variants": variants,
            "analysis_seconds": {k: round(v, 1) for k, v in seconds.items()}}, arrays
