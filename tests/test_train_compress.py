"""Training-time compression steps (compax/compress/methods/training.py): gmp's schedule against a reference,
exact final counts, recovery fine-tuning, quantization-aware training and the int8 path, the
recipes through `run_recipe` on `tiny_dataset`, and their abstract structure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compax import registrations  # noqa: F401  (registers the steps)
from compax.compress import int8_apply, num_to_prune, quantized_apply
from compax.compress.methods.training import gmp_sparsity, gmp_update_step, kernel_zero_counts, masked
from compax.compress.paths import is_weight, path_str
from compax.compress.prune import global_l1_masks
from compax.compress.registry import RECIPES, STEPS, parse_recipe, run_recipe
from compax.compress_population import recipe_context
from compax.data import normalize
from compax.errors import UserError
from compax.member_vmap import loss_and_accuracy, make_predict, model_apply, take_members
from compax.models import get_model
from compax.train.loop import fit
from tests.helpers import tiny_config, tiny_dataset


def reference_sparsity(step, initial, final, begin, end, frequency):
    """TF-MOT's `PolynomialDecay(power=3)` written out in numpy (jaxpruner and TF-MOT are not
    installable here): (pruning turn, sparsity) at `step`, from Zhu & Gupta's formula
    s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3, plus the last turn at `end` compax adds (and
    begin == end, which TF-MOT divides by zero on, as one pruning to s_f at `end`)."""
    p = 1.0 if step >= end else 0.0 if step <= begin else (step - begin) / (end - begin)
    turn = begin <= step <= end and ((step - begin) % frequency == 0 or step == end)
    return turn, final + (initial - final) * (1.0 - p) ** 3


def test_gmp_schedule_matches_the_reference_formula():
    steps = np.arange(0, 130)
    for initial, final, begin, end, every in [(0.0, 0.9, 10, 100, 10), (0.2, 0.75, 0, 97, 7),
                                              (0.0, 0.5, 3, 3, 1)]:
        ours = np.asarray(gmp_sparsity(jnp.asarray(steps), initial, final, begin, end))
        turns = np.asarray(gmp_update_step(jnp.asarray(steps), begin, end, every))
        ref = [reference_sparsity(t, initial, final, begin, end, every)
               for t in steps]
        np.testing.assert_allclose(ours, [s for _, s in ref], rtol=0, atol=2e-7)
        np.testing.assert_array_equal(turns, [t for t, _ in ref])
        assert ours[steps >= end].tolist() == [np.float32(final)] * int((steps >= end).sum())
    # Traced: one program for several final sparsities.
    finals = jnp.array([0.5, 0.8, 0.95])
    np.testing.assert_allclose(jax.vmap(lambda f: gmp_sparsity(50, 0.0, f, 0, 100))(finals),
                               finals * (1 - 0.5 ** 3), rtol=1e-6)


def test_masked_optimizer_keeps_masked_weights_at_exactly_zero():
    import optax
    params = {"d": {"kernel": jnp.arange(1.0, 13.0).reshape(3, 4), "bias": jnp.ones(4)}}
    tx = masked(optax.adam(0.1), lambda p: global_l1_masks(p, 5),
                (lambda t: t == 2, lambda p, t, f: global_l1_masks(p, 8)))
    state = tx.init(params)
    for _ in range(4):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    kernel = np.asarray(params["d"]["kernel"])
    assert np.count_nonzero(kernel == 0) == 8 and np.all(kernel.ravel()[:8] == 0)
    assert np.all(np.asarray(params["d"]["bias"]) != 1)  # biases train


@pytest.fixture(scope="module")
def trained():
    """(config, dataset, model, variables) of a population of 2 trained 3 epochs on tiny_dataset."""
    config = tiny_config(population=2)
    config.compress.sparsity_step = 0.1
    config.compress.calibration_images = 64
    dataset = tiny_dataset()
    result = fit(config, dataset, _tmp(), progress=False)
    return config, dataset, result.model, result.variables


def _tmp():
    import tempfile
    return tempfile.mkdtemp(prefix="train_compress_")


def _ctx(trained, abstract=False, checkpoint_dir=None):
    config, dataset, model, variables = trained
    return recipe_context(config, model, variables, dataset, 2, abstract=abstract,
                          checkpoint_dir=checkpoint_dir)


def _val_loss(model, variables, dataset):
    predict = make_predict(model_apply(model), dataset.mean, dataset.std, 64, 2)
    return loss_and_accuracy(predict(variables, dataset.val.images), dataset.val.labels)[0]


def _kernels(params, member):
    return {path_str(p): np.asarray(leaf[member])
            for p, leaf in jax.tree_util.tree_leaves_with_path(params) if is_weight(p, leaf[0])}


def test_gmp_trains_every_member_to_its_exact_final_count(trained):
    config, dataset, model, variables = trained
    step = parse_recipe("gmp(final=0.9,begin=0.5,end=2,every=0.5,epochs=3)", "test", config)[0]
    ctx = _ctx(trained)
    # Two final sparsities in one program: the sparsity is data in the optimizer state.
    made, masks, info = step.train(model, variables, ctx, jnp.array([0.6, 0.9]))
    total = sum(v.size for v in _kernels(made["params"], 0).values())
    pruned = [int(sum(np.count_nonzero(~np.asarray(m[i])) for m in jax.tree.leaves(masks)))
              for i in range(2)]
    assert pruned == [num_to_prune(0.6, total), num_to_prune(0.9, total)]
    assert kernel_zero_counts(made["params"]) == pruned  # the weights are zero where masked
    assert info["steps"] == 3 * (len(dataset.train) // config.batch_size) and info["epochs"] == 3
    assert info["seconds"] > 0 and info["images_per_second"] > 0
    assert min(info["best_epoch"]) >= 2  # only epochs at the final sparsity are candidates
    # Through the recipe: from the baseline's initialisation, reported in info.
    out = run_recipe(parse_recipe("gmp(final=0.9,begin=0,end=6,every=2,unit=steps,epochs=2,"
                                  "scope=layer)", "t", config), model, variables, ctx)
    for member in range(2):
        for name, w in _kernels(out.compressed.variables["params"], member).items():
            assert np.count_nonzero(w == 0) == num_to_prune(0.9, w.size), name
    assert out.info["training"]["gmp"]["epochs"] == 2
    assert out.info["sparsity"]["fraction_of_weights"] == pytest.approx(0.9, abs=2e-3)


def test_pruned_ft_keeps_the_zeros_and_lowers_validation_loss(trained):
    config, dataset, model, variables = trained
    ctx = _ctx(trained)
    pruned = run_recipe(parse_recipe("l1_global(amount=searched)", "t", config), model, variables, ctx)
    tuned = run_recipe(parse_recipe(RECIPES["pruned_ft"], "t", config), model, variables, ctx)
    for member in range(2):
        before = _kernels(pruned.compressed.variables["params"], member)
        after = _kernels(tuned.compressed.variables["params"], member)
        for name in before:
            assert np.all(after[name][before[name] == 0] == 0), name
    loss_before = _val_loss(model, pruned.compressed.variables, dataset)
    loss_after = _val_loss(model, tuned.compressed.variables, dataset)
    assert np.all(loss_after <= loss_before + 1e-6)
    assert tuned.info["training"]["finetune"]["epochs"] == 5
    assert tuned.info["sparsity"] == pruned.info["sparsity"]


@pytest.mark.parametrize("recipe", ["qat_w8a8", pytest.param("qat_w4a8", marks=pytest.mark.slow)])
def test_qat_weights_on_the_grid_and_int8_agrees(trained, recipe):
    config, dataset, model, variables = trained
    ctx = _ctx(trained)
    ptq_variant = run_recipe(parse_recipe(RECIPES[recipe].split("+")[0], "t", config), model, variables, ctx)
    made = run_recipe(parse_recipe(RECIPES[recipe], "t", config), model, variables, ctx)
    compressed = made.compressed
    qstate = compressed.qstate
    bits = compressed.weight_bits
    assert (bits, compressed.activation_bits) == (ptq_variant.compressed.weight_bits, 8)
    # Activations keep the calibrated parameters; weights lie on their new per-channel grid.
    np.testing.assert_array_equal(qstate.activation_scale, ptq_variant.compressed.qstate.activation_scale)
    params = compressed.variables["params"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if is_weight(path, leaf[0]):
            codes = np.asarray(leaf) / np.asarray(qstate.weight_scale[path_str(path)])[:, None, ...].reshape(
                (leaf.shape[0],) + (1,) * (leaf.ndim - 2) + (-1,))
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
            assert codes.min() >= -(2 ** (bits - 1)) - 1e-3 and codes.max() <= 2 ** (bits - 1) - 1 + 1e-3
    changed = any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(params), jax.tree.leaves(ptq_variant.compressed.variables["params"]), strict=True))
    assert changed
    # Evaluated like PTQ; the true-int8 path agrees.
    x = normalize(dataset.test.images, dataset.mean, dataset.std)
    for member in range(2):
        c = take_members(compressed, member)
        fake = np.asarray(jax.jit(quantized_apply, static_argnums=0)(model, c.variables, c.qstate, x))
        real = np.asarray(jax.jit(int8_apply, static_argnums=0)(model, c.variables, c.qstate, x))
        assert np.mean(fake.argmax(1) == real.argmax(1)) >= 0.97
        assert np.max(np.abs(fake - real)) <= 2.0001 * float(c.qstate.activation_scale[-1])
    # Validation loss of the quantized model: never worse than PTQ's (epoch 0 is a candidate).
    def qloss(c):
        predict = make_predict(lambda m, xb: quantized_apply(model, m.variables, m.qstate, xb),
                               dataset.mean, dataset.std, 64, 2)
        return loss_and_accuracy(predict(c, dataset.val.images), dataset.val.labels)[0]
    before, after = qloss(ptq_variant.compressed), qloss(compressed)
    print(recipe, "val loss ptq", before, "qat", after, made.info["training"])
    assert np.all(after <= before + 1e-5)
    info = made.info["training"]["qat"]
    assert info["epochs"] == 3 and info["images_per_second"] > 0


def test_float_variables_of_quantize_round_to_the_ptq_weights(trained):
    from compax.compress.ptq import quantize_weights
    config, dataset, model, variables = trained
    made = run_recipe(parse_recipe(RECIPES["qat_w8a8"].split("+")[0], "t", config), model, variables,
                      _ctx(trained))
    config_q = made.compressed.qstate.config
    again = jax.vmap(lambda p: quantize_weights(p, config_q)[0])(made.float_variables["params"])
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(made.compressed.variables["params"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_training_steps_run_abstractly(trained):
    config, dataset, model, variables = trained
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
    for name in ("gmp_90", "pruned_ft", "qat_w8a8", "qat_w4a8"):
        made = run_recipe(parse_recipe(RECIPES[name], name, config), model, like,
                          _ctx(trained, abstract=True))
        shapes = jax.tree.map(lambda a: (a.shape, a.dtype), made.compressed)
        assert jax.tree.leaves(shapes), name
        assert "training" not in made.info
    assert {"gmp", "finetune", "qat"} <= set(STEPS)
    assert get_model(config.model, dataset.num_classes, config.model_width) == model


class Killed(BaseException):
    """Stands for a SIGKILL in process: nothing after the raise runs."""


def _assert_same_trees(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


RESUMABLE = ["gmp(final=0.9,begin=0.5,end=2,every=0.5,epochs=3)",
             "l1_global(amount=0.5)+finetune(epochs=3)",
             "quantize(weight_bits=8,activation_bits=8)+qat(epochs=3)",
             "ablate(epochs=3)"]


@pytest.mark.parametrize("recipe", RESUMABLE)
def test_a_killed_training_step_resumes_to_the_same_weights_and_a_finished_one_is_restored(
        trained, tmp_path, monkeypatch, recipe):
    """Killed right after the checkpoint of epoch 2 (the masks, gmp's schedule count and Adam's
    moments are in it), the step resumes at epoch 3 and ends as the uninterrupted run; run again,
    it is restored from its last checkpoint without one training step."""
    from compax.train import checkpoint, retrain
    config, dataset, model, variables = trained
    steps = parse_recipe(recipe, "t", config)
    name = steps[-1].name
    whole = run_recipe(steps, model, variables, _ctx(trained, checkpoint_dir=tmp_path / "a"), "v")
    original = checkpoint.PopulationCheckpoints.save
    epochs_trained = []

    def save(self, state, *args):
        original(self, state, *args)
        epochs_trained.append(int(state.epoch))
        if int(state.epoch) == 2:
            raise Killed
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.PopulationCheckpoints, "save", save)
        with pytest.raises(Killed):
            run_recipe(steps, model, variables, _ctx(trained, checkpoint_dir=tmp_path / "b"), "v")
        resumed = run_recipe(steps, model, variables, _ctx(trained, checkpoint_dir=tmp_path / "b"), "v")
    assert epochs_trained == [1, 2, 3]  # epoch 3 only, after the resume
    _assert_same_trees(resumed.compressed, whole.compressed)
    for key in ("epochs", "steps", "best_epoch", "val_loss"):
        assert resumed.info["training"][name][key] == whole.info["training"][name][key], key
    assert (tmp_path / "b" / "v" / name).is_dir()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished step trained again")
    with monkeypatch.context() as patch:
        patch.setattr(retrain, "epoch_order", no_training)
        again = run_recipe(steps, model, variables, _ctx(trained, checkpoint_dir=tmp_path / "a"), "v")
    _assert_same_trees(again.compressed, whole.compressed)


def test_step_checkpoints_of_other_settings_are_discarded_and_damaged_ones_refused(trained, tmp_path):
    from compax.errors import UserError
    config, dataset, model, variables = trained
    ctx = _ctx(trained, checkpoint_dir=tmp_path)
    run_recipe(parse_recipe("l1_global(amount=0.5)+finetune(epochs=2)", "t", config), model, variables,
               ctx, "v")
    # Other settings under the same variant and step name: trained from the start, not resumed.
    longer = run_recipe(parse_recipe("l1_global(amount=0.5)+finetune(epochs=3)", "t", config), model,
                        variables, ctx, "v")
    assert len(longer.info["training"]["finetune"]["val_loss"]) == 3
    # Other inputs (another pruning level) likewise.
    other = run_recipe(parse_recipe("l1_global(amount=0.7)+finetune(epochs=3)", "t", config), model,
                       variables, ctx, "v")
    assert other.info["training"]["finetune"]["val_loss"] != longer.info["training"]["finetune"]["val_loss"]
    # A flipped byte in the newest checkpoint: one UserError naming the folder and the way back.
    folder = tmp_path / "v" / "finetune" / "3"
    largest = max((p for p in folder.rglob("*") if p.is_file() and p.name != "compax_manifest.json"),
                  key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"delete the folder {folder}"):
        run_recipe(parse_recipe("l1_global(amount=0.7)+finetune(epochs=3)", "t", config), model, variables,
                   ctx, "v")


def test_finetune_selecting_by_accuracy_keeps_each_members_most_accurate_epoch(trained):
    config, dataset, model, variables = trained
    ctx = _ctx(trained)
    pruned = run_recipe(parse_recipe("l1_global(amount=0.6)", "t", config), model, variables, ctx)
    tuned = run_recipe(parse_recipe("l1_global(amount=0.6)+finetune(epochs=3,select=accuracy)", "t", config),
                       model, variables, ctx)
    info = tuned.info["training"]["finetune"]
    predict = make_predict(model_apply(model), dataset.mean, dataset.std, 64, 2)
    start = loss_and_accuracy(predict(pruned.compressed.variables, dataset.val.images),
                              dataset.val.labels)[1]
    kept = loss_and_accuracy(predict(tuned.compressed.variables, dataset.val.images),
                             dataset.val.labels)[1]
    for member in range(2):
        # Epoch 0 (the pruned weights) and epochs 1-3: the first with the highest accuracy is kept.
        accuracies = [float(start[member])] + [epoch[member] for epoch in info["val_accuracy"]]
        best = int(np.argmax(accuracies))
        assert info["best_epoch"][member] == best
        assert float(kept[member]) == pytest.approx(accuracies[best], abs=1e-6)
    assert info["select"] == "accuracy"
    with pytest.raises(UserError, match="select must be one of loss, accuracy"):
        parse_recipe("finetune(select=f1)", "t", config)
