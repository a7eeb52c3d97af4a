"""Stages of a run and their records: what each made, from which config, inputs and code.

A run is `train -> compress -> analyse -> report`. Each stage writes its outputs under the workdir
atomically (a temporary name, then a rename) and then its record `stages/<stage>.json`:

    {"stage", "fingerprint", "config" (the keys the stage depends on), "inputs" (the fingerprints
     of the stages it reads), "code_version", "started", "finished", "wall_seconds", "machine"}

The fingerprint is the SHA-256 of the config keys and input fingerprints, so a stage is up to date
exactly when its record exists and its fingerprint equals the one the current config gives; a
change of a stage's keys (e.g. `compress.sparsity_tolerance_pp`) makes it and every stage after it
run again, while the stages before it are skipped. The record is written last: a stage killed
midway has no record and runs again, and its half-written outputs are never read.
"""

import datetime
import hashlib
import json
import os
import pathlib
import platform
import tempfile
import time

import ml_collections

from compax.distributed import is_main_process
from compax.errors import UserError

STAGES = ("train", "compress", "analyse", "report")
# Config keys read by each stage (beyond those of the stages before it). Training reads every key
# that is not listed for a later stage nor in RUNTIME_KEYS.
STAGE_KEYS = {"compress": ("compress", "eval_batch_size"), "analyse": ("analysis",), "report": ()}
# Keys that change how a run is carried out, not what it computes.
RUNTIME_KEYS = ("progress", "data_dir", "download", "population_chunk", "stages")


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


def fingerprint(config_part: dict, inputs: dict) -> str:
    """SHA-256 of a stage's config keys and its inputs' fingerprints."""
    text = json.dumps({"config": config_part, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json_atomic(path: pathlib.Path, payload: dict) -> None:
    """Writes JSON to a temporary file beside `path`, then renames it, so a kill leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(payload, f, indent=1, allow_nan=False, default=_plain)
    os.replace(f.name, path)


def _plain(value):
    """JSON form of numpy scalars and arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class StageRecords:
    """The records of the stages of one workdir."""

    def __init__(self, workdir: pathlib.Path, config: ml_collections.ConfigDict):
        self.directory = workdir / "stages"
        self.config = config

    def path(self, stage: str) -> pathlib.Path:
        return self.directory / f"{stage}.json"

    def read(self, stage: str) -> dict | None:
        path = self.path(stage)
        return json.loads(path.read_text()) if path.exists() else None

    def expected(self, stage: str) -> str | None:
        """The fingerprint `stage` must have for the current config, or None when an input stage
        has no record."""
        inputs = {}
        for before in STAGES[:STAGES.index(stage)]:
            record = self.read(before)
            if record is None:
                return None
            inputs[before] = record["fingerprint"]
        return fingerprint(stage_config(self.config, stage), inputs)

    def is_current(self, stage: str) -> bool:
        """Whether `stage` has a record for the current config and inputs, and its outputs exist."""
        record = self.read(stage)
        return (record is not None and record["fingerprint"] == self.expected(stage)
                and all((self.directory.parent / p).exists() for p in record["outputs"]))

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
        if not all((self.directory.parent / p).exists() for p in record["outputs"]):
            return "outputs missing"
        return "an earlier stage was run again"

    def finish(self, stage: str, started: float, outputs: list[str], **extra) -> dict:
        """Writes the record of `stage`, which has just written all its `outputs` (paths relative
        to the workdir)."""
        inputs = {s: self.read(s)["fingerprint"] for s in STAGES[:STAGES.index(stage)]}
        config_part = stage_config(self.config, stage)
        record = {
            "stage": stage,
            "fingerprint": fingerprint(config_part, inputs),
            "config": config_part,
            "inputs": inputs,
            "code_version": code_version(),
            "started": _iso(started),
            "finished": _iso(time.time()),
            "wall_seconds": round(time.time() - started, 1),
            "machine": machine(),
            "outputs": outputs,
            **extra,
        }
        if is_main_process():  # multi-host: one writer, on the shared workdir
            write_json_atomic(self.path(stage), record)
        return record


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
