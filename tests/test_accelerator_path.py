"""The accelerator path without an accelerator: nothing in compax may assume the CPU.

On a GPU or TPU backend, and on a CPU with several devices (where the population is sharded),
the CPU kernels step aside and every convolution is XLA's; the memory check reads the devices'
own free memory. The backend is faked (`jax.default_backend`, `jax.local_devices`), so these run
on the CPU; `tests/test_distributed.py` runs the sharded programs themselves on 4 forced host
devices.
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from compax.errors import UserError
from compax.kernels import conv_cpu, conv_onednn, cpu_convolutions
from compax.models import get_model, init_variables
from compax.train import memory

# (input, kernel) shapes: one for the direct kernels (<= 16 channels, stride 1), one for oneDNN.
SHAPES = [((2, 12, 12, 3), (5, 5, 3, 6)), ((4, 8, 8, 32), (3, 3, 32, 64))]


def _conv_program(x, w) -> str:
    """The jaxpr of compax's convolution of x and w, traced afresh (a new function each time:
    `make_jaxpr` caches traces by function, and the backend is not part of the key)."""
    return str(jax.make_jaxpr(lambda x, w: _conv(x, w))(x, w))


def _conv(x, w):
    return conv_cpu.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _abstract_variables(model):
    """The model's variables as shapes only (eager initialisation would compile every op)."""
    return jax.eval_shape(lambda key: init_variables(model, key), jax.random.key(0))


def _train_jaxpr(model, variables, images) -> str:
    def loss(params, others):
        with cpu_convolutions():
            logits, _ = model.apply({**others, "params": params}, images, train=True,
                                    mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
        return logits.sum()
    others = {k: v for k, v in variables.items() if k != "params"}
    return str(jax.make_jaxpr(jax.grad(loss))(variables["params"], others))


@pytest.mark.parametrize("backend, devices", [("gpu", 1), ("tpu", 1), ("cpu", 4)])
@pytest.mark.parametrize("shapes", SHAPES, ids=["direct", "onednn"])
def test_convolutions_are_xlas_on_accelerators_and_on_several_devices(monkeypatch, backend,
                                                                      devices, shapes):
    x, w = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes))
    reference = lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "device_count", lambda backend=None: devices)
    program = _conv_program(x, w)
    assert "ffi_call" not in program and "conv_general_dilated" in program
    # XLA's own convolution, bit for bit.
    np.testing.assert_array_equal(jax.jit(lambda x, w: _conv(x, w))(x, w), reference)


@pytest.mark.parametrize("shapes", SHAPES, ids=["direct", "onednn"])
def test_the_same_convolutions_take_the_kernels_on_one_cpu_device(shapes):
    """The other side of the test above, so that it cannot pass by never using a kernel."""
    loaded = conv_cpu.load() if shapes[1][-1] <= conv_cpu.MAX_CHANNELS else conv_onednn.enabled()
    if not loaded:
        pytest.skip("the kernels could not be built here (no compiler or no oneDNN wheel)")
    x, w = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes))
    assert "ffi_call" in _conv_program(x, w)


@pytest.mark.parametrize("name", ["resnet18", "squeezenet"])
def test_a_whole_training_gradient_has_no_cpu_kernel_on_a_gpu(monkeypatch, name):
    model = get_model(name, 10, 0.125)
    variables = _abstract_variables(model)
    images = jnp.zeros((2, 32, 32, 3))
    on_cpu = _train_jaxpr(model, variables, images)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    on_gpu = _train_jaxpr(model, variables, images)
    assert "ffi_call" not in on_gpu
    assert on_gpu.count("conv_general_dilated") >= on_cpu.count("conv_general_dilated") + 1


def _fake_devices(limits_in_use):
    return [types.SimpleNamespace(memory_stats=lambda s=s: s) for s in limits_in_use]


def test_free_memory_on_accelerators_is_the_devices_own(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "local_devices", lambda: _fake_devices(
        [{"bytes_limit": 80 * gib, "bytes_in_use": 10 * gib},
         {"bytes_limit": 80 * gib, "bytes_in_use": 30 * gib}]))
    # The population is sharded over the devices: the fullest device bounds each one's share.
    assert memory.available_bytes() == 2 * 50 * gib
    monkeypatch.setattr(jax, "local_devices", lambda: _fake_devices([{"bytes_in_use": 1}, None]))
    assert memory.available_bytes() is None  # unknown: no check rather than a wrong one


def test_member_state_bytes_counts_params_adam_and_best_copy():
    model = get_model("resnet18", 43, 0.125)
    variables = _abstract_variables(model)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
    stats = sum(math.prod(x.shape) for x in jax.tree.leaves(variables["batch_stats"]))
    assert memory.member_state_bytes(model) == 4 * (4 * params + 2 * stats)


def test_a_population_too_large_for_the_devices_stops_before_any_work(monkeypatch):
    model = get_model("resnet18", 10, 1.0)
    per_member = memory.member_state_bytes(model)
    memory.check_population_fits(model, 8, free=8 * per_member)
    with pytest.raises(UserError, match=r"a population of 9 needs .*at most 8 fit"):
        memory.check_population_fits(model, 9, free=8 * per_member + per_member // 2)
