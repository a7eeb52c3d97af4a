"""Stages of a run and their records: what each made, from which config, inputs and code.

A run is `train -> compress -> analyse -> export -> report`. Each stage writes its outputs under the workdir
atomically (a temporary name, then a rename) and then its record `stages/<stage>.json`:

    {"stage", "fingerprint", "config" (the keys the stage depends on), "inputs" (the fingerprints
     of the stages it reads), "code_version", "started", "finished", "wall_seconds", "machine",
     "outputs", "output_sha256" (of each output file, and of the checksum manifest of each output
     folder that has one)}

The fingerprint is the SHA-256 of the config keys and input fingerprints (and of the stage's
results version, `STAGE_VERSIONS`, where it has one), so a stage is up to date
exactly when its record exists, its fingerprint equals the one the current config gives and its
outputs are still those it wrote (a run with other keys, killed while it rewrote them, leaves
them changed); a change of a stage's keys (e.g. `compress.sparsity_tolerance_pp`) makes it and
every stage after it run again, while the stages before it are skipped. The record is written
last: a stage killed midway has no record and runs again, and its half-written outputs are never
read. After the record, `config.json` is rewritten with the config of the run (so it always
describes the results of the stages that finished; a run that fails before finishing a stage
never changes it). A record that cannot be read or lacks a field is a one-line error naming the
file.
"""

import datetime
import hashlib
import json
import os
import pathlib
import platform
import time

import ml_collections

from compax.distributed import is_main_process
from compax.errors import UserError
from compax.safe_files import MANIFEST, read_json, sha256_file, write_json_atomic

CONFIG_FILE = "config.json"

STAGES = ("train", "compress", "analyse", "export", "report")
# Config keys read by each stage (beyond those of the stages before it). Training reads every key
# that is not listed for a later stage nor in RUNTIME_KEYS.
STAGE_KEYS = {"compress": ("compress", "eval_batch_size"), "analyse": ("analysis",),
              "export": ("export",), "report": ()}
# The stages whose outputs a stage reads: every stage before it, but the export reads only the
# trained population and the variants (so it needs no analysis, and exporting again leaves the
# analyses current). An optional input counts only where it has a record: a run that never
# exports still reports; one that exported reports the export, and must keep it up to date.
STAGE_INPUTS = {"export": ("train", "compress")}
OPTIONAL_INPUTS = ("export",)
# Keys that change how a run is carried out, not what it computes.
RUNTIME_KEYS = ("progress", "data_dir", "download", "population_chunk", "stages")
# The version of a stage's results, for the stages whose layout or statistics changed since
# workdirs were first made: raising it makes a finished workdir run that stage (and those after it)
# again instead of keeping results of the old kind. analyse 2: each analysis's results under its
# own key (`variants.<variant>.<analysis>`), its settings in its own block.
STAGE_VERSIONS = {"analyse": 2}
# The fields of every record, and the type of each.
RECORD_FIELDS = {"stage": str, "fingerprint": str, "config": dict, "inputs": dict,
                 "code_version": str, "finished": str, "wall_seconds": (int, float),
                 "machine": dict, "outputs": list}


def parse_stages(text: str) -> tuple[str, ...]:
    """The stages named in a comma-separated `--config.stages` value, in run order."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise UserError(f"unknown stage {unknown[0] if unknown else '(none)'!r} in --config.stages:"
                        f" use a comma-separated subset of {','.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)


def stage_config(config: ml_collections.ConfigDict, stage: str) -> dict:
    """The config keys `stage` depends on, as JSON-compatible values."""
    as_json = json.loads(json.dumps(config.to_dict()))
    if stage == "train":
        later = {k for keys in STAGE_KEYS.values() for k in keys}
        return {k: v for k, v in sorted(as_json.items()) if k not in later | set(RUNTIME_KEYS)}
    return {k: as_json[k] for k in STAGE_KEYS[stage]}


def code_version() -> str:
    """SHA-256 (12 hex digits) of the compax package sources: which code made an output."""
    digest = hashlib.sha256()
    root = pathlib.Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def fingerprint(config_part: dict, inputs: dict, version: int | None = None) -> str:
    """SHA-256 of a stage's config keys, its inputs' fingerprints and its results version (None:
    the stage has none)."""
    fields = {"config": config_part, "inputs": inputs}
    if version is not None:
        fields["version"] = version
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_config(workdir: pathlib.Path) -> dict | None:
    """The config recorded in `workdir/config.json` (None when there is none)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    config = read_json(path, "recorded config", "delete it (the next run that finishes a stage"
                       " writes it again)")
    if not isinstance(config, dict):
        raise UserError(f"recorded config {path} is not a config: delete it (the next run that"
                        " finishes a stage writes it again)")
    return config


def write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Records `config` as the one whose results the workdir holds (`config.json`)."""
    write_json_atomic(pathlib.Path(workdir) / CONFIG_FILE, config.to_dict())


class StageRecords:
    """The records of the stages of one workdir."""

    def __init__(self, workdir: pathlib.Path, config: ml_collections.ConfigDict):
        self.directory = workdir / "stages"
        self.config = config

    def path(self, stage: str) -> pathlib.Path:
        return self.directory / f"{stage}.json"

    def read(self, stage: str) -> dict | None:
        """The record of `stage`, or None when it has none; a damaged record is a UserError."""
        path = self.path(stage)
        if not path.exists():
            return None
        fix = f"delete it and stage {stage} runs again"
        record = read_json(path, "stage record", fix)
        if not isinstance(record, dict):
            raise UserError(f"stage record {path} is not a record: {fix}")
        for field, kind in RECORD_FIELDS.items():
            if not isinstance(record.get(field), kind):
                raise UserError(f"stage record {path} lacks its field {field!r} or it is damaged:"
                                f" {fix}")
        return record

    def inputs(self, stage: str) -> tuple[str, ...]:
        """The stages whose outputs `stage` reads (`STAGE_INPUTS`, `OPTIONAL_INPUTS`)."""
        names = STAGE_INPUTS.get(stage, STAGES[:STAGES.index(stage)])
        return tuple(s for s in names if s not in OPTIONAL_INPUTS or self.path(s).exists())

    def expected(self, stage: str) -> str | None:
        """The fingerprint `stage` must have for the current config, or None when an input stage
        has no record."""
        inputs = {}
        for before in self.inputs(stage):
            record = self.read(before)
            if record is None:
                return None
            inputs[before] = record["fingerprint"]
        return fingerprint(stage_config(self.config, stage), inputs, STAGE_VERSIONS.get(stage))

    def is_current(self, stage: str) -> bool:
        """Whether `stage` has a record for the current config and inputs, and its outputs exist."""
        record = self.read(stage)
        return (record is not None and record["fingerprint"] == self.expected(stage)
                and all((self.directory.parent / p).exists() for p in record["outputs"])
                and self._outputs_unchanged(record))

    def _outputs_unchanged(self, record: dict) -> bool:
        """Whether the outputs of `record` are those its stage wrote (records without
        output_sha256, from an older compax, are taken as they are)."""
        recorded = record.get("output_sha256")
        return recorded is None or output_sha256(self.directory.parent, recorded) == recorded

    def why_stale(self, stage: str) -> str:
        """Why `stage` has to run, in words."""
        record = self.read(stage)
        if record is None:
            return "not run yet"
        now = stage_config(self.config, stage)
        changed = sorted(k for k in now.keys() | record["config"].keys()
                         if now.get(k) != record["config"].get(k))
        if changed:
            return f"config changed ({', '.join(changed)})"
        if record.get("version") != STAGE_VERSIONS.get(stage):
            return (f"its results are of version {record.get('version', 1)}, this compax makes"
                    f" version {STAGE_VERSIONS.get(stage, 1)}")
        if not all((self.directory.parent / p).exists() for p in record["outputs"]):
            return "outputs missing"
        if not self._outputs_unchanged(record):
            return "outputs changed since it finished"
        return "an earlier stage was run again"

    def finish(self, stage: str, started: float, outputs: list[str], **extra) -> dict:
        """Writes the record of `stage`, which has just written all its `outputs` (paths relative
        to the workdir)."""
        inputs = {s: self.read(s)["fingerprint"] for s in self.inputs(stage)}
        config_part = stage_config(self.config, stage)
        record = {
            "stage": stage,
            "fingerprint": fingerprint(config_part, inputs, STAGE_VERSIONS.get(stage)),
            **({"version": STAGE_VERSIONS[stage]} if stage in STAGE_VERSIONS else {}),
            "config": config_part,
            "inputs": inputs,
            "code_version": code_version(),
            "started": _iso(started),
            "finished": _iso(time.time()),
            "wall_seconds": round(time.time() - started, 1),
            "machine": machine(),
            "outputs": outputs,
            "output_sha256": output_sha256(self.directory.parent, outputs),
            **extra,
        }
        if is_main_process():  # multi-host: one writer, on the shared workdir
            write_json_atomic(self.path(stage), record)
            write_config(self.directory.parent, self.config)
        return record


def output_sha256(workdir: pathlib.Path, outputs) -> dict:
    """{output: SHA-256} of each output file and of the checksum manifest of each output folder
    that has one (the compressed variants); other folders (checkpoints/) are left out."""
    digests = {}
    for output in outputs:
        path = pathlib.Path(workdir) / output
        if path.is_file():
            digests[output] = sha256_file(path)
        elif (path / MANIFEST).is_file():
            digests[output] = sha256_file(path / MANIFEST)
    return digests


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


def machine() -> dict:
    """The host and JAX devices a stage ran on."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = jax.devices()
    return {"host": platform.node(), "cpu": cpu, "cpu_cores": os.cpu_count(),
            "backend": jax.default_backend(), "devices": [d.device_kind for d in devices],
            "processes": jax.process_count()}
