"""Knowledge distillation as a recipe step (compax/compress/methods/distill.py): the loss against a
NumPy reference, alpha = 0 as plain retraining, pruned zeros kept, quantized weights on the grid,
the recipes, and a whole run on `tiny_dataset`."""

import json

import jax
import numpy as np
import pytest

from compax import registrations  # noqa: F401  (registers the steps)
from compax.compress.methods.distill import distillation_loss
from compax.compress.paths import is_weight, path_str
from compax.compress.registry import RECIPES, parse_recipe, run_recipe
from compax.compress_population import recipe_context
from compax.errors import UserError
from compax.member_vmap import loss_and_accuracy, make_predict, model_apply
from compax.train.loop import fit
from tests.helpers import tiny_config, tiny_dataset


def reference_loss(student, teacher, labels, temperature, alpha):
    """Hinton et al.'s loss in float64 NumPy: alpha T^2 KL(p_t || p_s) + (1 - alpha) CE(y, z_s),
    p = softmax(z / T), batch means."""
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    log_t, log_s = log_softmax(teacher / temperature), log_softmax(student / temperature)
    kl = np.mean(np.sum(np.exp(log_t) * (log_t - log_s), -1))
    ce = -np.mean(log_softmax(student)[np.arange(len(labels)), labels])
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.9), (2.5, 0.0), (8.0, 1.0)])
def test_loss_matches_the_numpy_reference(temperature, alpha):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(0, 3, (2, 16, 10))
    labels = rng.integers(0, 10, 16)
    got = distillation_loss(student.astype(np.float32), teacher.astype(np.float32), labels,
                            temperature, alpha)
    np.testing.assert_allclose(float(got), reference_loss(student, teacher, labels, temperature, alpha),
                               rtol=1e-5, atol=1e-6)


def test_the_gradient_reaches_only_the_student_and_vanishes_at_the_teacher():
    rng = np.random.default_rng(1)
    teacher = rng.normal(0, 2, (8, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 8)
    # alpha = 1: the KL term alone, minimal (zero gradient) where the student equals the teacher.
    grad_s, grad_t = jax.grad(lambda s, t: distillation_loss(s, t, labels, 3.0, 1.0), (0, 1))(
        teacher, teacher)
    np.testing.assert_allclose(grad_s, 0, atol=1e-6)
    np.testing.assert_array_equal(grad_t, 0)


@pytest.fixture(scope="module")
def trained():
    """(config, dataset, model, variables) of a population of 2 trained 3 epochs on tiny_dataset."""
    import tempfile
    config = tiny_config(population=2)
    config.compress.calibration_images = 64
    dataset = tiny_dataset()
    result = fit(config, dataset, tempfile.mkdtemp(prefix="distill_"), progress=False)
    return config, dataset, result.model, result.variables


def _run(trained, recipe):
    config, dataset, model, variables = trained
    ctx = recipe_context(config, model, variables, dataset, 2)
    return run_recipe(parse_recipe(recipe, "t", config), model, variables, ctx)


def _kernels(params, member):
    return {path_str(p): np.asarray(leaf[member])
            for p, leaf in jax.tree_util.tree_leaves_with_path(params) if is_weight(p, leaf[0])}


def test_alpha_zero_is_finetune_exactly(trained):
    tuned = _run(trained, "l1_global(amount=0.6)+finetune(epochs=2)")
    distilled = _run(trained, "l1_global(amount=0.6)+distill(epochs=2,alpha=0)")
    for a, b in zip(jax.tree.leaves(tuned.compressed), jax.tree.leaves(distilled.compressed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tuned.info["training"]["finetune"]["val_loss"] == distilled.info["training"]["distill"]["val_loss"]


def test_distill_after_pruning_keeps_the_zeros_and_moves_towards_the_teacher(trained):
    config, dataset, model, variables = trained
    pruned = _run(trained, "l1_global(amount=0.6)")
    distilled = _run(trained, "l1_global(amount=0.6)+distill(epochs=3,alpha=1)")
    changed = False
    for member in range(2):
        before = _kernels(pruned.compressed.variables["params"], member)
        after = _kernels(distilled.compressed.variables["params"], member)
        for name in before:
            assert np.all(after[name][before[name] == 0] == 0), name
            changed |= not np.array_equal(after[name], before[name])
    assert changed
    assert distilled.info["sparsity"] == pruned.info["sparsity"]
    info = distilled.info["training"]["distill"]
    assert info["epochs"] == 3 and info["images_per_second"] > 0
    # Never worse than the pruned weights on validation cross-entropy (epoch 0 is a candidate).
    predict = make_predict(model_apply(model), dataset.mean, dataset.std, 64, 2)
    loss_before, loss_after = (loss_and_accuracy(predict(v.compressed.variables, dataset.val.images),
                                                 dataset.val.labels)[0] for v in (pruned, distilled))
    assert np.all(loss_after <= loss_before + 1e-6)


def test_distill_after_quantize_ends_on_the_integer_grid(trained):
    ptq = _run(trained, "quantize(weight_bits=4,activation_bits=8)")
    made = _run(trained, RECIPES["qat_w4a8_kd"])
    compressed, qstate = made.compressed, made.compressed.qstate
    assert (compressed.weight_bits, compressed.activation_bits) == (4, 8)
    np.testing.assert_array_equal(qstate.activation_scale, ptq.compressed.qstate.activation_scale)
    for path, leaf in jax.tree_util.tree_leaves_with_path(compressed.variables["params"]):
        if is_weight(path, leaf[0]):
            scale = np.asarray(qstate.weight_scale[path_str(path)])
            codes = np.asarray(leaf) / scale.reshape((leaf.shape[0],) + (1,) * (leaf.ndim - 2) + (-1,))
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
            assert codes.min() >= -8 - 1e-3 and codes.max() <= 7 + 1e-3
    assert made.info["training"]["distill"]["epochs"] == 3


def test_recipes_compose_and_bad_settings_are_one_line_errors(trained):
    config, dataset, model, variables = trained
    _, step = parse_recipe(RECIPES["pruned_kd"], "t", config)
    assert step.name == "distill" and step.epochs == 5 and step.learning_rate == config.learning_rate
    assert parse_recipe(RECIPES["qat_w4a8_kd"], "t", config)[1].epochs == 3
    steps = parse_recipe("l1_global(amount=0.7)+distill(epochs=2,temperature=2,alpha=0.5)", "t")
    assert (steps[1].temperature, steps[1].alpha, steps[1].learning_rate) == (2, 0.5, None)
    for bad, message in [("distill(alpha=1.5)", "alpha must be"),
                         ("distill(temperature=0)", "temperature must"),
                         ("distill(epochs=0)", "epochs must"),
                         ("distill(learning_rate=-1)", "learning_rate")]:
        with pytest.raises(UserError, match=message):
            parse_recipe(bad, "t")
    # A recipe parsed without the run's config has no learning rate to train with.
    with pytest.raises(UserError, match="no learning_rate"):
        run_recipe(parse_recipe("l1_global(amount=0.5)+distill(epochs=1)", "t"), model, variables,
                   recipe_context(config, model, variables, dataset, 2))
    # A dynamically quantized model is not a student it can train.
    with pytest.raises(UserError, match="statically quantized"):
        _run(trained, "dynamic_quantize(weight_bits=8)+distill(epochs=1)")


def test_a_whole_run_with_distilled_variants(tmp_path, monkeypatch):
    from compax import pipeline
    monkeypatch.setattr(pipeline, "load_dataset", lambda *a, **k: tiny_dataset())
    config = tiny_config(population=2, max_epochs=2, stages="train,compress,analyse")
    config.compress.calibration_images = 64
    config.compress.variants = ("p50=l1_global(amount=0.5)", "p50_kd=l1_global(amount=0.5)+distill(epochs=2)",
                                "qat_w4a8_kd")
    config.analysis.analyses = "classes,hooker"
    pipeline.run(config, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    variants = results["variants"]
    assert {"p50", "p50_kd", "qat_w4a8_kd"} <= set(variants)
    kd = variants["p50_kd"]
    assert "distill(epochs=2," in kd["recipe"] and kd["training"]["distill"]["epochs"] == 2
    assert kd["sparsity"]["fraction_of_weights"] == pytest.approx(
        variants["p50"]["sparsity"]["fraction_of_weights"])
    assert (tmp_path / "step_checkpoints" / "p50_kd" / "distill").is_dir()
