"""Extending compax by adding code, not by editing it: a new model, compression step and analysis,
defined in this file alone, run through launch.py and reach results.json and the report.

The config file that launch.py reads is Python: it imports this module, whose decorators register
the step and the analysis, registers the model in `MODELS`, then builds the config (`base_config`
adds the analysis's settings; `study_config` takes the model's CPU size).
"""

import dataclasses
import json
import pathlib
import subprocess
import sys
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compax.analyses import Analysis, register_analysis
from compax.compress.compressed import Compressed
from compax.compress.registry import STEPS, MemberStep, register_step, variant_recipes
from compax.data import synthetic_signs
from compax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


class ToyNet(nn.Module):
    """A toy CNN: conv3x3(8)-ReLU-maxpool2, conv3x3(16)-ReLU-maxpool2 (the last block), dense."""

    cpu_size: ClassVar[tuple[float, int, int]] = (1.0, 2, 1)  # width, max_epochs, patience
    head_layers: ClassVar[tuple[str, ...]] = ("head",)
    num_classes: int
    width: float = 1.0
    drop_last_block: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        del train
        blocks = (8,) if self.drop_last_block else (8, 16)
        for i, channels in enumerate(blocks):
            x = nn.relu(nn.Conv(max(1, round(channels * self.width)), (3, 3), name=f"conv{i + 1}")(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


@register_step
@dataclasses.dataclass(frozen=True)
class ToySignQuantizer(MemberStep):
    """A toy 1-bit quantizer: every conv / dense kernel becomes scale * sign(w), one scale per
    output channel, scale = mean |w| of that channel (Rastegari et al. 2016, XNOR-Net's BWN)."""

    name: ClassVar[str] = "toy_sign"
    keep_first: bool = True

    def member(self, model, compressed, *, ctx):
        def binarize(path, w):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            if w.ndim < 2 or (self.keep_first and name.startswith("conv1/")):
                return w
            scale = jnp.mean(jnp.abs(w), axis=tuple(range(w.ndim - 1)))
            return scale * jnp.sign(w)
        params = jax.tree_util.tree_map_with_path(binarize, compressed.variables["params"])
        return Compressed({**compressed.variables, "params": params}, None, weight_bits=1)


@register_analysis
class ToyLogitNorm(Analysis):
    """A toy analysis: the mean L2 norm of the logits of the compressed population, and its ratio to
    the original's."""

    name = "toy_logit_norm"
    title = "Toy logit norm"
    settings = {"toy_logit_power": 2.0}

    def compare(self, ref, variant):
        power = ref.settings.toy_logit_power
        norm = float(np.mean(np.sum(np.abs(variant.logits) ** power, -1) ** (1 / power)))
        original = float(np.mean(np.sum(np.abs(ref.logits) ** power, -1) ** (1 / power)))
        return {"toy_logit_norm": norm, "toy_logit_norm_ratio": norm / original}, {
            "toy_norms": np.linalg.norm(variant.logits[0], axis=-1)}

    def columns(self, results):
        return {"toy norm ratio": f"{results['toy_logit_norm_ratio']:.3f}"}

    def report(self, page, results, arrays):
        page.table(self.title, ["variant", "toy logit norm"],
                   [[n, f"{v['toy_logit_norm']:.4f}"] for n, v in page.compressed(results)],
                   "Toy logit norms")


CONFIG = '''
from tests import test_extending  # registers the toy step and analysis

from compax.config import study_config
from compax.models import MODELS

MODELS.setdefault("toynet", test_extending.ToyNet)


def get_config():
    c = study_config("synthetic_signs", "toynet", "cpu")  # ToyNet's cpu_size: 2 epochs
    c.population = 2
    c.progress = False
    c.compress.sparsity_step = 0.1
    c.compress.calibration_images = 64
    c.compress.variants = ("w8a8", "toy=toy_sign(keep_first=True)",
                           "toy_p50=l1_global(amount=0.5)+toy_sign()", "ablated")
    c.analysis.analyses = "classes,toy_logit_norm"
    c.analysis.toy_logit_power = 1.0
    return c
'''


def test_a_model_a_step_and_an_analysis_defined_here_run_through_launch(tmp_path):
    config = tmp_path / "toy_config.py"
    config.write_text(CONFIG)
    workdir = tmp_path / "run"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(pathlib.Path.home())}
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), f"--config={config}",
                           f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    toy, toy_p50 = results["variants"]["toy"], results["variants"]["toy_p50"]
    assert toy["recipe"] == "toy_sign(keep_first=True)" and toy["weight_bits"] == 1
    assert toy_p50["recipe"].startswith("l1_global(amount=0.5") and toy_p50["sparsity"]["amount"] == 0.5
    for name in ("w8a8", "toy", "toy_p50"):
        v = results["variants"][name]
        assert v["toy_logit_norm"] > 0 and np.isfinite(v["toy_logit_norm_ratio"])
        assert "disagreement" in v  # the registered analyses ran too
    config = json.loads((workdir / "config.json").read_text())
    assert config["analysis"]["toy_logit_power"] == 1.0
    assert config["model"] == "toynet" and config["max_epochs"] == 2 and config["patience"] == 1
    # ToyNet without its last block: conv2 is gone, the head reads 16x16x8 maps instead of 8x8x16
    base, ablated = results["variants"]["baseline"], results["variants"]["ablated"]
    classes = len(synthetic_signs.CLASSES)
    assert ablated["recipe"] == "ablate(epochs=5)" and ablated["macs"] < base["macs"]
    assert ablated["params"] == base["params"] - (3 * 3 * 8 * 16 + 16) + (16 * 16 * 8 - 8 * 8 * 16) * classes
    summary = (workdir / "report" / "summary.md").read_text()
    assert "Toy logit norms" in summary and "toy norm ratio" in summary


def test_recipes_are_checked_before_any_work():
    assert "toy_sign" in STEPS
    with pytest.raises(UserError, match="unknown compression step 'nope'"):
        variant_recipes(["x=nope()"])
    with pytest.raises(UserError, match="has no setting 'bits'"):
        variant_recipes(["x=quantize(bits=3)"])
    with pytest.raises(UserError, match="unknown variant 'w3a8'"):
        variant_recipes(["w3a8"])
    with pytest.raises(UserError, match="amount must be a fraction"):
        variant_recipes(["x=l1_global(amount=1.5)"])
    with pytest.raises(UserError, match="appears twice"):
        variant_recipes(["w8a8", "w8a8"])
    recipe = variant_recipes(["a=l1_layer(amount=0.3)+quantize(weight_bits=4,activation_bits=8)"])["a"]
    assert [s.name for s in recipe] == ["l1_layer", "quantize"] and recipe[1].weight_bits == 4


def launch(*args, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_the_registered_recipes_run_from_a_config(tmp_path):
    """Per-layer L1, filter pruning with the filters removed, a fixed Hooker level, layer ablation
    and a recipe written on the command line, through launch.py on synthetic_signs."""
    workdir = tmp_path / "run"
    variants = ("('pruned_layer','filters_pruned','sparsity_50','ablated',"
                "'f50_w8=filters(amount=0.5)+quantize(weight_bits=8,activation_bits=8)')")
    done = launch("--config=configs/quickstart.py", f"--workdir={workdir}",
                  "--config.population=2", "--config.max_epochs=2", "--config.progress=False",
                  "--config.compress.sparsity_step=0.1", "--config.compress.calibration_images=64",
                  f"--config.compress.variants={variants}", "--config.analysis.analyses=classes")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    v = results["variants"]
    base = v["baseline"]
    assert v["sparsity_50"]["sparsity"]["amount"] == 0.5
    assert abs(v["sparsity_50"]["sparsity"]["fraction_of_weights"] - 0.5) < 1e-4
    assert v["pruned_layer"]["sparsity"]["amount"] == results["sparsity_search"]["chosen"]
    for layer, share in v["pruned_layer"]["sparsity"]["layers"].items():  # every layer alike
        assert abs(share - v["pruned_layer"]["sparsity"]["amount"]) < 0.01, layer
    structure = v["filters_pruned"]["structure"]
    assert structure["params_after"] == v["filters_pruned"]["params"] < base["params"]
    assert structure["macs_after"] == v["filters_pruned"]["macs"] < v["sparsity_50"]["macs"]
    assert v["f50_w8"]["params"] < v["filters_pruned"]["params"]
    assert v["f50_w8"]["int8"]["argmax_agreement"] > 0.95
    # LeNet-5 without conv2: fc1 reads 14x14x6 maps, so more parameters and fewer multiply-adds
    assert v["ablated"]["params"] != base["params"] and v["ablated"]["macs"] < base["macs"]
    assert v["ablated"]["recipe"] == "ablate(epochs=5)"
    assert set(results["inference"]) == set(v)
    assert all(r["images_per_second"] > 0 for r in results["inference"].values())
    assert "Inference cost" in (workdir / "report" / "summary.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--config.compress.variants=('pruned','w3a8')"], "unknown variant 'w3a8'"),
    (["--config.compress.variants=('x=prune_random(amount=0.5)',)"],
     "unknown compression step 'prune_random'"),
    (["--config.compress.variants=('x=quantize(bits=3)',)"], "has no setting 'bits'"),
    (["--config.compress.variants=('x=filters(amount=1.2)',)"], "amount must be a fraction"),
    (["--config.compress.observer=percentile"], "unknown observer 'percentile'"),
    (["--config.compress.variants=('x=quantize(observer=percentile)',)"], "unknown observer"),
    (["--config.analysis.ece_bins=0"], "ece_bins"),
])
def test_bad_names_are_refused_before_training(args, message, tmp_path):
    done = launch("--config=configs/quickstart.py", f"--workdir={tmp_path / 'run'}", *args,
                  timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "checkpoints").exists()
