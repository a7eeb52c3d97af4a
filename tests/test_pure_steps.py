"""Steps are pure: their config defaults are filled in once, when a recipe is parsed, and running a
step reads no setting from the run's config. Per-tensor weight quantization against NumPy."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from compax import registrations  # noqa: F401  (registers the steps)
from compax.compress import int8_apply, quantized_apply, registry
from compax.compress.ptq import QuantConfig, quantize_weights
from compax.config import base_config
from compax.errors import UserError
from compax.models import get_model
from compax.one_model import compress
from tests.test_prune import random_variables


@pytest.fixture(scope="module")
def lenet():
    model = get_model("lenet5", 10)
    return model, random_variables(model, 0)


@pytest.fixture(scope="module")
def calib():
    return jax.random.uniform(jax.random.key(2), (48, 32, 32, 3), minval=-1.0, maxval=1.0)


def minmax_config():
    config = base_config()
    config.compress.observer, config.compress.reduce_range = "minmax", False
    return config


def run(steps, model, variables, calib):
    """The one-member `Compressed` that `steps` make."""
    population = jax.tree.map(lambda a: jnp.asarray(a)[None], variables)
    ctx = registry.Context(calib_images=calib)
    return jax.tree.map(lambda a: a[0], registry.run_recipe(steps, model, population, ctx).compressed)


def test_parsing_fills_the_config_defaults_and_describe_records_them():
    (step,) = registry.parse_recipe("quantize(weight_bits=4)", "t", minmax_config())
    assert (step.observer, step.reduce_range) == ("minmax", False)
    assert registry.describe((step,)) == ("quantize(weight_bits=4,activation_bits=8,observer=minmax,"
                                          "reduce_range=False,granularity=per_channel)")
    # What the recipe sets wins; without a config the fields stay unset (the step's fallbacks).
    (given,) = registry.parse_recipe("quantize(observer=histogram)", "t", minmax_config())
    assert (given.observer, given.reduce_range) == ("histogram", False)
    (bare,) = registry.parse_recipe("quantize()", "t")
    assert (bare.observer, bare.reduce_range) == (None, None)
    assert (bare.quant_config().observer, bare.quant_config().reduce_range) == ("histogram", True)
    # A config without the key leaves the field unset; the same mechanism for every entry point.
    partial = ml_collections.ConfigDict({"compress": {"reduce_range": False}})
    assert registry.parse_recipe("quantize()", "t", partial)[0].observer is None
    assert registry.variant_recipes(["dynamic_int8"], minmax_config())["dynamic_int8"][0] \
        .reduce_range is False
    assert registry.variant_recipe("w8a8", minmax_config())[1][0].observer == "minmax"


def test_a_bad_config_default_is_a_user_error():
    config = base_config()
    config.compress.observer = "percentile"
    with pytest.raises(UserError, match="unknown observer 'percentile'"):
        registry.parse_recipe("quantize()", "t", config)


@pytest.mark.parametrize("recipe", ["quantize(weight_bits=8,activation_bits=8)",
                                    "dynamic_quantize(weight_bits=8)"])
def test_running_a_step_reads_no_setting_from_the_config(lenet, calib, recipe):
    """A step cannot see the config (the `Context` has none): the settings parsing filled in are
    the ones that take effect (histogram + reduce_range, the base defaults, differ from minmax)."""
    assert "config" not in {f.name for f in dataclasses.fields(registry.Context)}
    model, variables = lenet
    made = run(registry.parse_recipe(recipe, "t", minmax_config()), model, variables, calib)
    other = run(registry.parse_recipe(recipe, "t", base_config()), model, variables, calib)
    assert other.qstate.config.reduce_range and not made.qstate.config.reduce_range


def test_one_model_compress_takes_its_settings_as_the_steps_values(lenet, calib):
    model, variables = lenet
    made = compress("w8a8", model, variables, calib, observer="minmax", reduce_range=False)
    expected = run(registry.parse_recipe(registry.RECIPES["w8a8"], "t", minmax_config()), model,
                   variables, calib)
    assert (made.qstate.config.observer, made.qstate.config.reduce_range) == ("minmax", False)
    np.testing.assert_array_equal(made.qstate.activation_scale, expected.qstate.activation_scale)


def per_tensor_reference(w, bits: int) -> np.ndarray:
    """Symmetric per-tensor fake quantization in NumPy: s = max|w| / ((2^b - 1) / 2),
    w' = clip(round(w * (1 / s)), -2^(b-1), 2^(b-1) - 1) * s (round half to even, float32)."""
    w = np.asarray(w, np.float32)
    scale = np.float32(np.max(np.abs(w)) / np.float32((2 ** bits - 1) / 2))
    q = np.clip(np.round(w * (np.float32(1) / scale)), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return (q * scale).astype(np.float32), scale


@pytest.mark.parametrize("bits", [8, 6])
def test_per_tensor_weights_equal_a_numpy_reference(lenet, bits):
    model, variables = lenet
    config = QuantConfig(weight_bits=bits, weight_granularity="per_tensor")
    params, scales = quantize_weights(variables["params"], config)
    for layer in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        expected, scale = per_tensor_reference(variables["params"][layer]["kernel"], bits)
        assert scales[f"{layer}/kernel"].shape == () and float(scales[f"{layer}/kernel"]) == scale
        np.testing.assert_array_equal(params[layer]["kernel"], expected)
        np.testing.assert_array_equal(params[layer]["bias"], variables["params"][layer]["bias"])
    # one grid per kernel: at most 2^b values
    assert len(np.unique(params["conv2"]["kernel"])) <= 2 ** bits


def test_the_quantize_step_records_per_tensor_granularity(lenet, calib):
    model, variables = lenet
    steps = registry.parse_recipe("quantize(weight_bits=6,granularity=per_tensor)", "t", base_config())
    made = run(steps, model, variables, calib)
    assert made.granularity == "per_tensor" and made.qstate.config.weight_granularity == "per_tensor"
    np.testing.assert_array_equal(made.variables["params"]["conv1"]["kernel"],
                                  per_tensor_reference(variables["params"]["conv1"]["kernel"], 6)[0])
    # The abstract re-trace that restores saved variants gives the same static data.
    shapes = jax.eval_shape(lambda: variables)
    abstract = compress("p=quantize(weight_bits=6,granularity=per_tensor)", model, shapes, calib)
    assert abstract.granularity == "per_tensor"
    default = registry.parse_recipe("quantize()", "t")[0]
    assert default.granularity == default.quant_config().weight_granularity == "per_channel"
    with pytest.raises(UserError, match="unknown granularity 'per_layer'"):
        registry.parse_recipe("quantize(granularity=per_layer)", "t")


def test_per_tensor_int8_execution_matches_fake_quantization(lenet, calib):
    """The integer path takes a kernel's one scale as it takes per-channel ones."""
    model, variables = lenet
    made = compress("t=quantize(weight_bits=8,observer=minmax,granularity=per_tensor)", model,
                    variables, calib)
    x = jax.random.uniform(jax.random.key(3), (64, 32, 32, 3), minval=-1.0, maxval=1.0)
    fake = np.asarray(jax.jit(quantized_apply, static_argnums=0)(model, made.variables, made.qstate, x))
    real = np.asarray(jax.jit(int8_apply, static_argnums=0)(model, made.variables, made.qstate, x))
    # float and integer accumulation round apart by at most a code of the output point now and then
    assert np.max(np.abs(fake - real)) <= 2.0001 * float(made.qstate.activation_scale[-1])
