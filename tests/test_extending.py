"""Extending compax by adding code, not by editing it: the four extensions of README "Extending
compax", each defined in this file alone and run through launch.py into results.json and the report.

- a model: `MLP`, two dense layers, no convolution (so Grad-CAM and the embeddings cannot apply);
- a compression method: `per_tensor_weights`, symmetric per-tensor b-bit weights (its size is
  charged one scale and zero point per kernel, from the `granularity` it records);
- two pruning criteria: `toy_random` (a PRNG key per member) and `toy_taylor` (gradients on a
  calibration batch), which write only their scores;
- an analysis: `class_confidence`, the change of each class's mean confidence, with its own
  settings block and its own results key.

The config file that launch.py reads is Python: it imports this module, whose decorators register
the steps and the analysis, and registers the model in `MODELS`, then builds the config.
"""

import dataclasses
import json
import math
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
from compax.compress.criterion import PruningStep
from compax.compress.registry import STEPS, MemberStep, register_step, variant_recipes
from compax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


class MLP(nn.Module):
    """Two dense layers on the flattened image: Dense(64 * width)-ReLU-Dense(classes)."""

    cpu_size: ClassVar[tuple[float, int, int]] = (1.0, 2, 1)  # width, max_epochs, patience
    num_classes: int
    width: float = 1.0

    @nn.compact
    def __call__(self, x, train=False):
        del train
        x = nn.relu(nn.Dense(max(1, round(64 * self.width)), name="fc1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="fc2")(x)


def per_tensor(w, bits: int):
    """Symmetric per-tensor quantization of one kernel, as floats on its grid:
    s = max|w| / ((2^b - 1) / 2), w_q = s * clip(round(w / s), -2^(b-1), 2^(b-1) - 1)."""
    scale = jnp.max(jnp.abs(w)) / ((2**bits - 1) / 2)
    return scale * jnp.clip(jnp.round(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@register_step
@dataclasses.dataclass(frozen=True)
class PerTensorWeights(MemberStep):
    """Weights of every conv and dense kernel quantized per tensor to `bits` (`per_tensor`),
    activations kept in float32."""

    name: ClassVar[str] = "per_tensor_weights"
    bits: int = 6

    def member(self, model, compressed, *, ctx):
        params = jax.tree_util.tree_map_with_path(
            lambda path, w: per_tensor(w, self.bits) if path[-1].key == "kernel" else w,
            compressed.variables["params"])
        return Compressed({**compressed.variables, "params": params}, None,
                          weight_bits=self.bits, granularity="per_tensor")


@register_step
@dataclasses.dataclass(frozen=True)
class ToyRandom(PruningStep):
    """Random unstructured pruning: uniform scores from the member's own key."""

    name: ClassVar[str] = "toy_random"
    needs: ClassVar[frozenset] = frozenset({"key"})
    scope: ClassVar[str] = "global"

    def scores(self, params, *, key, **_):
        leaves, treedef = jax.tree.flatten(params)
        return treedef.unflatten([jax.random.uniform(jax.random.fold_in(key, i), leaf.shape)
                                  for i, leaf in enumerate(leaves)])


@register_step
@dataclasses.dataclass(frozen=True)
class ToyTaylor(PruningStep):
    """First-order Taylor pruning, |w * dL/dw| on a calibration batch (Molchanov et al. 2017),
    each layer alone."""

    name: ClassVar[str] = "toy_taylor"
    needs: ClassVar[frozenset] = frozenset({"grads"})
    scope: ClassVar[str] = "layer"
    batch: int = 32

    def scores(self, params, *, grads, **_):
        return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)


def class_confidence(logits, labels, num_classes: int, temperature: float):
    """(members, classes) mean softmax(logits / T) probability of the true class per class."""
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    true = np.take_along_axis(p, np.broadcast_to(labels[None, :, None], p.shape[:2] + (1,)), -1)[..., 0]
    return np.stack([true[:, labels == c].mean(1) for c in range(num_classes)], 1)


@register_analysis
class ClassConfidence(Analysis):
    """The change of each class's mean confidence in the true class (softmax at temperature T),
    member m against original member m."""

    name = "class_confidence"
    title = "Per-class confidence"
    settings = {"temperature": 1.0}

    @classmethod
    def check(cls, settings):
        if not settings.temperature > 0:
            raise UserError(f"--config.analysis.class_confidence.temperature must be > 0, got"
                            f" {settings.temperature}")

    def compare(self, ref, variant):
        before, after = (class_confidence(logits, ref.labels, ref.num_classes,
                                          self.settings.temperature)
                         for logits in (ref.logits, variant.logits))
        change = (after - before).mean(0)
        return ({"mean_change": float(change.mean()), "largest_drop": float(change.min()),
                 "largest_drop_class": int(change.argmin())}, {"change": change})

    def columns(self, results):
        return {"confidence drop": f"{results['largest_drop']:+.3f}"}

    def report(self, page, results, arrays):
        page.table(self.title, ["variant", "mean change", "largest drop", "class"],
                   [[n, f"{v['mean_change']:+.4f}", f"{v['largest_drop']:+.4f}",
                     str(v["largest_drop_class"])] for n, v in page.compressed(results)],
                   "Per-class confidence in the true class")


CONFIG = '''
from tests import test_extending  # registers the steps and the analysis

from compax.config import study_config
from compax.models import MODELS

MODELS.setdefault("mlp", test_extending.MLP)


def get_config():
    c = study_config("synthetic_signs", "mlp", "cpu")  # the MLP's cpu_size: 2 epochs
    c.population = 2
    c.progress = False
    c.compress.sparsity_step = 0.1
    c.compress.calibration_images = 64
    c.compress.variants = ("pt6=per_tensor_weights(bits=6)", "rand50=toy_random(amount=0.5)",
                           "taylor50=toy_taylor(amount=0.5)", "taylor=toy_taylor(amount=searched)",
                           "taylor50_pt6=toy_taylor(amount=0.5)+per_tensor_weights()")
    c.analysis.class_confidence.temperature = 2.0
    c.analysis.saliency.images = 32
    c.analysis.attacks.images = 16
    c.analysis.embeddings.per_class = 5
    return c
'''


def launch(*args, timeout=900, env=None):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def refused(done, message: str, workdir: pathlib.Path) -> None:
    """One `error:` line naming `message`, exit 2, no traceback, nothing trained."""
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (workdir / "checkpoints").exists()


@pytest.fixture(scope="module")
def extension_run(tmp_path_factory):
    """(config file, workdir, env) of the four extensions run by launch.py with the defaults."""
    tmp = tmp_path_factory.mktemp("extensions")
    config = tmp / "mlp_config.py"
    config.write_text(CONFIG)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(pathlib.Path.home())}
    done = launch(f"--config={config}", f"--workdir={tmp / 'run'}", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return config, tmp / "run", env


def test_the_four_extensions_run_through_launch(extension_run):
    _, workdir, _ = extension_run
    results = json.loads((workdir / "results.json").read_text())
    v = results["variants"]
    base, pt6 = v["baseline"], v["pt6"]
    # The per-tensor quantizer: its size from its granularity (one 8-byte scale and zero point
    # per kernel), its 6-bit kernels (at most 2^6 distinct values) on their grid.
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"] == "mlp" and config["max_epochs"] == 2
    classes = results["dataset"]["classes"]
    kernels = [(32 * 32 * 3, 64), (64, classes)]
    expected = sum(math.ceil(i * o * 6 / 8) + 8 + 4 * o for i, o in kernels)
    assert pt6["weight_bits"] == 6 and pt6["bytes"] == expected
    assert pt6["compression_ratio"] == pytest.approx(base["bytes"] / expected)
    # The criteria: exact counts, the searched level of their own criterion.
    assert v["rand50"]["sparsity"]["fraction_of_weights"] == pytest.approx(0.5, abs=1e-4)
    for layer, share in v["taylor50"]["sparsity"]["layers"].items():  # scope "layer"
        assert share == pytest.approx(0.5, abs=0.01), layer
    searched = v["taylor"]["sparsity"]["amount"]
    assert [s for k, s in results["sparsity_searches"].items() if k.startswith("toy_taylor")][0][
        "chosen"] == searched
    assert v["taylor50_pt6"]["weight_bits"] == 6 and v["taylor50_pt6"]["sparsity"]["amount"] == 0.5
    # The analysis: its own block and its own key.
    assert config["analysis"]["class_confidence"]["temperature"] == 2.0
    for name in ("pt6", "rand50", "taylor50"):
        cc = v[name]["class_confidence"]
        assert -1 <= cc["largest_drop"] <= cc["mean_change"] <= 1
        assert "disagreement" in v[name]["classes"]  # the registered analyses ran beside it
    # The MLP: the analyses that need a convolution skipped, and said so.
    assert set(results["skipped_analyses"]) == {"gradcam", "embeddings"}
    assert all("MLP has no convolutional module" in why
               for why in results["skipped_analyses"].values())
    assert {"classes", "calibration", "saliency", "hooker", "attacks"} <= set(v["pt6"])
    assert not {"gradcam", "embeddings"} & set(v["pt6"])
    summary = (workdir / "report" / "summary.md").read_text()
    assert "Per-class confidence in the true class" in summary and "gradcam" in summary


def test_random_and_gradient_criteria_differ_between_members_and_repeat_with_the_seed(
        extension_run):
    import compax
    from compax.models import MODELS
    from tests import test_extending  # noqa: F401  (the registrations, as the config file does)

    MODELS.setdefault("mlp", MLP)
    run = compax.load_run(extension_run[1])
    for name in ("rand50", "taylor50"):
        kept = np.asarray(run.variant(name).compressed.variables["params"]["fc1"]["kernel"]) != 0
        assert kept[0].mean() == pytest.approx(0.5, abs=0.01)
        assert (kept[0] != kept[1]).mean() > 0.05, name  # each member its own key / weights
    again = run.compress("again=toy_random(amount=0.5)").compressed.variables["params"]
    first = run.variant("rand50").compressed.variables["params"]
    np.testing.assert_array_equal(again["fc1"]["kernel"], first["fc1"]["kernel"])


def test_an_explicit_analysis_that_cannot_apply_is_refused_before_training(extension_run,
                                                                          tmp_path):
    config_file, _, env = extension_run
    workdir = tmp_path / "never"
    done = launch(f"--config={config_file}", f"--workdir={workdir}",
                  "--config.analysis.analyses=classes,gradcam", env=env, timeout=300)
    refused(done, "analysis gradcam does not apply to MLP", workdir)
    assert "no convolutional module" in done.stderr and "--config.analysis.analyses" in done.stderr
    assert not workdir.exists()
    done = launch(f"--config={config_file}", f"--workdir={workdir}",
                  "--config.analysis.class_confidence.temperature=0.0", env=env, timeout=300)
    refused(done, "temperature", workdir)


def test_recipes_are_checked_before_any_work():
    assert {"per_tensor_weights", "toy_random", "toy_taylor"} <= set(STEPS)
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
    assert v["ablated"]["recipe"].startswith("ablate(epochs=5")
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
    (["--config.analysis.calibration.bins=0"], "calibration.bins"),
    (["--config.compress.variants=('g=grad_magnitude(amount=0.5,batch=256)',)",
      "--config.compress.calibration_images=128"], "grad_magnitude(batch=256) takes more than the 128"),
])
def test_bad_names_are_refused_before_training(args, message, tmp_path):
    done = launch("--config=configs/quickstart.py", f"--workdir={tmp_path / 'run'}", *args,
                  timeout=300)
    refused(done, message, tmp_path / "run")
