"""Runs the enabled analyses (`compax.analyses`, `--config.analysis.analyses`) for every variant.

The test logits of the original population and of each variant are computed once and shared by
every analysis. Returns results.json's analysis fields: each analysis's results of the original
population under "baseline", then of each variant under the variant's name, each under the
analysis's name (`variants.<variant>.<analysis>.<key>`; each analysis documents its keys, means
over members unless named otherwise), "skipped_analyses" ({analysis: why}: those of the default
list that do not apply to the model), "analysis_seconds" (wall seconds per analysis, summed over
the original and every variant, and "predict": the test logits), and `arrays` (numpy, keyed
"<variant>.<analysis>.<key>") that the report draws.

Given a `parts_dir`, each part (the original population's results, then each variant's) is kept
there as soon as it is done: `<name>.npz` (its arrays) and `<name>.json` ({"inputs": what it was
computed from, "results_version", "results", "seconds", "arrays_sha256"}), written in that order,
each atomically. A rerun takes every part whose inputs and results version (`stages.STAGE_VERSIONS`:
the layout and statistics of the analyses' results) match and whose arrays pass their checksum,
and computes the others: a killed analyse stage resumes after its last finished variant, and adding a variant
analyses only it. "analysis_seconds" then sums each part's seconds as first measured, plus what
this run spent on the test logits and the analyses' preparation.
"""

import pathlib
import time

import jax
import numpy as np
from absl import logging

from compax.analyses import ANALYSES, DataInfo, applicable_analyses, settings_block
from compax.analyses.reference import Compared, Reference
from compax.compress.registry import Variant
from compax.errors import UserError
from compax.member_vmap import population_chunk
from compax.safe_files import read_json, sha256_file, write_json_atomic
from compax.stages import STAGE_VERSIONS

RESULTS_VERSION = STAGE_VERSIONS["analyse"]


def load_part(parts_dir: pathlib.Path | None, name: str, inputs) -> dict | None:
    """The part `name` kept in `parts_dir` ({"results", "arrays", "seconds"}) when it was computed
    from `inputs` by this results version and its arrays are intact; None otherwise (it is then
    computed again)."""
    if parts_dir is None or not (parts_dir / f"{name}.json").is_file():
        return None
    try:
        record = read_json(parts_dir / f"{name}.json", "analysis part", "")
    except UserError:
        record = None
    arrays = parts_dir / f"{name}.npz"
    if (not isinstance(record, dict) or record.get("inputs") != inputs
            or record.get("results_version") != RESULTS_VERSION or not arrays.is_file()):
        return None
    if sha256_file(arrays) != record.get("arrays_sha256"):
        logging.warning("the kept analysis of %s fails its checksum (%s): analysed again", name,
                        arrays)
        return None
    with np.load(arrays, allow_pickle=False) as kept:
        return {"results": record["results"], "arrays": dict(kept), "seconds": record["seconds"]}


def save_part(parts_dir: pathlib.Path | None, name: str, inputs, part: dict) -> None:
    """Keeps the finished part `name` in `parts_dir` (None: nowhere), see `load_part`."""
    if parts_dir is None:
        return
    parts_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = parts_dir / f"{name}.npz", parts_dir / f"{name}.tmp.npz"
    np.savez_compressed(tmp, **part["arrays"])
    tmp.replace(path)
    write_json_atomic(parts_dir / f"{name}.json", {
        "inputs": inputs, "results_version": RESULTS_VERSION, "results": part["results"],
        "seconds": part["seconds"], "arrays_sha256": sha256_file(path)})


def analyse_population(config, dataset, model, original, models: dict, populations: dict,
                       chunk: int, designs: dict | None = None, parts_dir=None,
                       inputs: dict | None = None) -> tuple[dict, dict]:
    """(summary for results.json, arrays for the figures) of every variant in `populations`.

    `original` is the uncompressed population as a `Compressed` (leading member axis), `models`
    and `populations` give each variant's flax module and compressed population, `designs` each
    variant's "paired" (the default) or "independent" (`Compared.design`). `parts_dir` keeps each
    finished part with `inputs[name]` ("baseline" and each variant; JSON), see the module doc.
    """
    analyses, skipped = applicable_analyses(config.analysis, model, DataInfo.of(dataset))
    parts_dir = pathlib.Path(parts_dir) if parts_dir is not None else None
    inputs = inputs or {}
    kept = {name: load_part(parts_dir, name, inputs.get(name))
            for name in ("baseline", *populations)}
    seconds = {"predict": 0.0, **{a.name: 0.0 for a in analyses}}
    ref = None
    if any(part is None for part in kept.values()):
        started = time.perf_counter()
        ref = Reference(config, dataset, model, original, chunk)
        seconds["predict"] += time.perf_counter() - started
        for analysis in analyses:
            started = time.perf_counter()
            analysis.prepare(ref)
            seconds[analysis.name] += time.perf_counter() - started
    variants, arrays = {}, {}
    for name, part in kept.items():
        if part is not None:
            logging.info("analysis of %s: kept from an earlier run (%s)", name, parts_dir)
        elif name == "baseline":
            part = _analysed(analyses, lambda analysis: analysis.baseline(ref))
            logging.info("analysed the original population in %.0f s", sum(part["seconds"].values()))
        else:
            started = time.perf_counter()
            variant = Compared(name, models[name], populations[name],
                               ref.predict(models[name], populations[name]),
                               (designs or {}).get(name, "paired"))
            predict = time.perf_counter() - started
            part = _analysed(analyses, lambda analysis, v=variant: analysis.compare(ref, v))
            part["seconds"]["predict"] = predict
            logging.info("analysed %s in %.0f s", name, sum(part["seconds"].values()))
        if part is not kept[name]:
            save_part(parts_dir, name, inputs.get(name), part)
        variants[name] = part["results"]
        arrays.update({f"{name}.{k}": v for k, v in part["arrays"].items()})
        for key, value in part["seconds"].items():
            seconds[key] = seconds.get(key, 0.0) + value
    logging.info("analysis seconds: %s", ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return {"variants": variants, "skipped_analyses": skipped,
            "analysis_seconds": {k: round(v, 1) for k, v in seconds.items()}}, arrays


def compare_populations(name: str, config, dataset, original: Variant, compressed: Variant,
                        **settings) -> tuple[dict, dict]:
    """(results, arrays) of the one analysis `name` of the population `compressed` against the
    population `original`, as `analyse_population` gives them for a variant (without the other
    analyses, nor kept parts). Both are `Variant`s: the flax module evaluating the population and
    its `Compressed` with a leading member axis (member m of `compressed` is compared with member
    m of `original`; `compressed.info["design"]`, "paired" by default, says whether it was
    compressed from it). The settings are those of `config.analysis.<name>`, with `settings`
    replacing some (e.g. bins=10 for calibration); each is checked as
    `--config.analysis.<name>.<key>` is. An analysis that does not apply to the original's model
    is a one-line UserError."""
    config = config.copy_and_resolve_references()
    known = settings_block(config.analysis, name) if name in ANALYSES else {}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise UserError(f"unknown analysis setting {unknown[0]!r} of {name}: its settings are"
                        f" {', '.join(known) or '(none)'}")
    if settings:
        config.analysis[name].update(settings)
    config.analysis.analyses = name
    (analysis,), _ = applicable_analyses(config.analysis, original.model, DataInfo.of(dataset))
    chunk = population_chunk(config.population_chunk,
                             jax.tree.leaves(original.compressed)[0].shape[0])
    ref = Reference(config, dataset, original.model, original.compressed, chunk)
    analysis.prepare(ref)
    variant = Compared("compressed", compressed.model, compressed.compressed,
                       ref.predict(compressed.model, compressed.compressed),
                       compressed.info.get("design", "paired"))
    return analysis.compare(ref, variant)


def _analysed(analyses, run) -> dict:
    """One part: `run(analysis) -> (results, arrays)` for every analysis, each under its name
    (results[name], arrays["<name>.<key>"]), and timed."""
    part = {"results": {}, "arrays": {}, "seconds": {}}
    for analysis in analyses:
        started = time.perf_counter()
        results, part_arrays = run(analysis)
        part["results"][analysis.name] = results
        part["arrays"].update({f"{analysis.name}.{k}": v for k, v in part_arrays.items()})
        part["seconds"][analysis.name] = time.perf_counter() - started
    return part
