"""Storage size accounting, against sizes computed by hand for a small pytree and LeNet-5."""

import numpy as np
import pytest

from compax import registrations  # noqa: F401  (registers the steps)
from compax.compress.compressed import size_bytes
from compax.compress.fold import BatchNormFold
from compax.compress.size import kernel_bytes, storage_bytes
from compax.models import get_model
from compax.one_model import compress
from tests.test_prune import random_variables


@pytest.fixture
def variables():
    conv = np.zeros((3, 3, 2, 4), np.float32)
    conv.reshape(-1)[::6] = 1.0  # 12 of 72 entries non-zero
    return {
        "params": {"conv": {"kernel": conv, "bias": np.ones(4, np.float32)},
                   "bn": {"scale": np.ones(4, np.float32), "bias": np.ones(4, np.float32)},
                   "dense": {"kernel": np.ones((4, 3), np.float32),
                             "bias": np.ones(3, np.float32)}},
        "batch_stats": {"bn": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}},
    }


def test_kernel_bytes_take_the_smallest_encoding(variables):
    conv = variables["params"]["conv"]["kernel"]
    # dense 72 * bits / 8; bitmask 9 + 12 * bits / 8; CSR 12 * bits / 8 + 4 * 12 + 4 * (4 + 1)
    assert kernel_bytes(conv, 32) == min(288, 9 + 48, 48 + 48 + 20) == 57
    assert kernel_bytes(conv, 8) == min(72, 9 + 12, 12 + 48 + 20) == 21
    assert kernel_bytes(conv, 4) == min(36, 9 + 6, 6 + 48 + 20) == 15  # two int4 per byte
    dense = variables["params"]["dense"]["kernel"]
    assert (kernel_bytes(dense, 32), kernel_bytes(dense, 8), kernel_bytes(dense, 4)) == (48, 12, 6)
    assert kernel_bytes(np.ones((5, 3)), 4) == 8  # ceil(15 / 2)


def test_storage_bytes_of_each_variant(variables):
    # float32: conv kernel 57 (bitmask), every other value 4 bytes: 4 + 8 + 12 + 3 + 8 = 35 values.
    assert storage_bytes(variables) == 57 + 4 * 35
    # float16: conv kernel min(144, 9 + 24) = 33, dense kernel 24, 23 other values at 2 bytes.
    assert storage_bytes(variables, weight_bits=16, float_bits=16) == 33 + 24 + 2 * 23
    folds = (BatchNormFold("conv", "bn", 1e-5),)
    # int8, BatchNorm folded: kernels 21 + 12 plus (scale, zero point) = 8 bytes per channel;
    # the folded bias (4 floats) and the dense bias (3 floats); 3 activation points at 8 bytes.
    int8 = (21 + 4 * 8) + (12 + 3 * 8) + 4 * 4 + 3 * 4 + 3 * 8
    assert storage_bytes(variables, weight_bits=8, folds=folds, activation_points=3) == int8
    int4 = (15 + 4 * 8) + (6 + 3 * 8) + 4 * 4 + 3 * 4 + 3 * 8
    assert storage_bytes(variables, weight_bits=4, folds=folds, activation_points=3) == int4


def test_per_tensor_kernels_store_one_qparam_each(variables):
    folds = (BatchNormFold("conv", "bn", 1e-5),)
    # as int8 above, but one (scale, zero point) per kernel instead of per output channel
    int8 = (21 + 8) + (12 + 8) + 4 * 4 + 3 * 4 + 3 * 8
    assert storage_bytes(variables, weight_bits=8, folds=folds, activation_points=3,
                         granularity="per_tensor") == int8
    # float kernels have no qparams, whatever the granularity
    assert storage_bytes(variables, granularity="per_tensor") == storage_bytes(variables)


@pytest.fixture(scope="module")
def lenet():
    model = get_model("lenet5", 10)
    return model, random_variables(model, 0)


def test_lenet5_per_tensor_charges_40_bytes_of_weight_qparams(lenet):
    """LeNet-5's 5 kernels (conv1 5x5x3x6, conv2 5x5x6x16, fc1 400x120, fc2 120x84, fc3 84x10):
    per channel 6 + 16 + 120 + 84 + 10 = 236 scales and zero points, 1,888 B; per tensor 5, 40 B."""
    model, variables = lenet
    calib = np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32)
    per_tensor = compress("t=quantize(weight_bits=8,observer=minmax,granularity=per_tensor)", model,
                          variables, calib)
    per_channel = compress("c=quantize(weight_bits=8,observer=minmax)", model, variables, calib)
    params = variables["params"]
    kernels = sum(int(np.size(params[k]["kernel"])) for k in params)  # dense int8, 1 B each
    biases = sum(int(np.size(params[k]["bias"])) for k in params)
    points = per_tensor.qstate.activation_scale.shape[0]
    assert size_bytes(per_tensor) == kernels + 5 * 8 + 4 * biases + 8 * points
    assert size_bytes(per_channel) - size_bytes(per_tensor) == 1888 - 40
    # per-channel sizes are those of storage_bytes' default (unchanged)
    assert size_bytes(per_channel) == storage_bytes(per_channel.variables, weight_bits=8,
                                                    activation_points=points)
