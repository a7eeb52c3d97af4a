"""Saved variants packed (`compax/compress/packing.py`, `store.py`): bit-exact round trips of every
encoding, damaged files refused, and bytes on disk near the computed size of each variant."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from compax.compress import packing, store
from compax.compress.compressed import Compressed, size_bytes
from compax.compress.paths import path_str
from compax.compress.ptq import QuantConfig, QuantState
from compax.errors import UserError
from compax.models import get_model
from compax.one_model import compress
from compax.safe_files import MANIFEST, tree_checksums, write_json_atomic
from tests.test_prune import random_variables

# Bytes a LeNet-5 variant's folder holds beside 1.2 times its computed size: orbax's own files,
# packing.json, structure.pkl and the checksums (`store.py` module doc).
FIXED_OVERHEAD = 8 * 1024


def assert_identical(a, b):
    """Same dtype, shape and bytes (so -0.0 and 0.0 differ, and NaNs must match)."""
    a, b = np.asarray(a), np.asarray(b)
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
    assert a.tobytes() == b.tobytes()


def quantized(shape, bits, rng, per_tensor=False, members=()):
    """(float32 kernel on the grid of `bits` codes, codes, scale broadcastable along it), the
    kernel computed as `quant.dequantize` does: float32(codes) * scale, -0.0 where a negative
    weight rounded to code 0."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = rng.integers(qmin, qmax + 1, (*members, *shape)).astype(np.float32)
    scale_shape = (*members, *[1] * len(shape)) if per_tensor else (*members, *[1] * (len(shape) - 1),
                                                                   shape[-1])
    scale = rng.uniform(1e-3, 1e-1, scale_shape).astype(np.float32)
    negative = rng.random(codes.shape) < 0.5
    kernel = np.where((codes == 0) & negative, np.float32(-0.0), codes * scale)
    return kernel.astype(np.float32), codes, scale


def round_trip(x, scale=None, bits=None):
    """The parts of `x` packed and unpacked through one buffer, after checking the result."""
    leaves = [x] if scale is None else [x, scale.reshape(-1)]
    buffer, layout = packing.pack(leaves, None if scale is None else {0: (1, scale.shape, bits)})
    back = packing.unpack(buffer.copy(), layout)
    for a, b in zip(leaves, back, strict=True):
        assert_identical(a, b)
    return layout[0]["parts"]


def test_int8_codes_are_one_byte_each():
    rng = np.random.default_rng(0)
    x, _, scale = quantized((5, 5, 3, 6), 8, rng)
    assert np.signbit(x[x == 0]).any()  # negative zeros: their signs are kept
    parts = round_trip(x, scale, 8)
    assert set(parts) == {"codes", "zero_signs"} and parts["codes"][1] == x.size


def test_int4_codes_are_two_to_a_byte_with_an_odd_count():
    rng = np.random.default_rng(1)
    x, codes, scale = quantized((3, 5, 7), 4, rng)
    assert x.size % 2 == 1 and set(np.unique(codes)) == set(range(-8, 8))
    parts = round_trip(x, scale, 4)
    assert parts["codes"][1] == math.ceil(x.size / 2)


def test_per_tensor_scale():
    rng = np.random.default_rng(2)
    x, _, scale = quantized((4, 9), 8, rng, per_tensor=True)
    assert scale.size == 1
    assert "codes" in round_trip(x, scale, 8)


def test_pruned_floats_are_a_bitmask_and_their_non_zero_values():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 120)).astype(np.float32)
    x[rng.random(x.shape) < 0.7] = 0
    parts = round_trip(x)
    nnz = np.count_nonzero(x)
    assert set(parts) == {"mask", "values"}
    assert (parts["mask"][1], parts["values"][1]) == (math.ceil(x.size / 8), 4 * nnz)


def test_pruned_then_quantized_kernels_store_the_codes_of_their_non_zeros():
    rng = np.random.default_rng(4)
    for bits in (8, 4):
        x, _, scale = quantized((120, 84), bits, rng)
        x[rng.random(x.shape) < 0.8] = 0
        parts = round_trip(x, scale, bits)
        nnz = np.count_nonzero(x)
        assert set(parts) - {"zero_signs"} == {"mask", "codes"}
        assert parts["codes"][1] == (nnz if bits == 8 else math.ceil(nnz / 2))


def test_values_off_the_grid_and_other_dtypes_stay_as_they_are():
    rng = np.random.default_rng(5)
    x, _, scale = quantized((6, 8), 8, rng)
    x[0, 0] = np.nextafter(x[0, 0], np.float32(1))  # not codes * scale: raw
    x[1, 1] = np.nan
    assert set(round_trip(x, scale, 8)) == {"raw"}
    for dtype in (np.float16, jnp.bfloat16, np.int32, np.int8):
        y = (rng.normal(size=(8, 16)) * (rng.random((8, 16)) < 0.1)).astype(dtype)  # 90% zero
        assert set(round_trip(y)) == {"raw"}
    assert set(round_trip(np.zeros((0, 4), np.float32))) == {"raw"}


def lenet_compressed(bits, members=(2,), per_tensor=False, seed=6):
    """A LeNet-5-shaped `Compressed` with random kernels on their grid and a member axis."""
    rng = np.random.default_rng(seed)
    params, scales = {}, {}
    for name, shape in (("conv1", (5, 5, 3, 6)), ("fc1", (400, 120)), ("fc3", (84, 10))):
        kernel, _, scale = quantized(shape, bits, rng, per_tensor, members)
        params[name] = {"kernel": jnp.asarray(kernel),
                        "bias": jnp.asarray(rng.normal(size=(*members, shape[-1])), jnp.float32)}
        scales[f"{name}/kernel"] = jnp.asarray(scale.reshape(*members, -1)[..., 0] if per_tensor
                                               else scale.reshape(*members, shape[-1]))
    config = QuantConfig(weight_bits=bits, weight_granularity="per_tensor" if per_tensor
                         else "per_channel")
    qstate = QuantState(jnp.ones((*members, 4), jnp.float32), jnp.zeros((*members, 4), jnp.int32),
                        scales, config, ())
    return Compressed({"params": params}, qstate, weight_bits=bits, activation_bits=8,
                      granularity=config.weight_granularity)


@pytest.mark.parametrize("bits,members,per_tensor", [(8, (2,), False), (4, (2,), False),
                                                     (4, (2,), True), (8, (), False)])
def test_saved_quantized_kernels_are_packed_with_or_without_a_member_axis(tmp_path, bits, members,
                                                                          per_tensor):
    compressed = lenet_compressed(bits, members, per_tensor)
    store.save_compressed(tmp_path / "v", compressed)
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), compressed)
    back = store.restore_compressed(tmp_path / "v", like)
    assert jax.tree.structure(back) == jax.tree.structure(compressed)
    for a, b in zip(jax.tree.leaves(compressed), jax.tree.leaves(back), strict=True):
        assert_identical(a, b)
    layout = json.loads((tmp_path / "v" / store.PACKING).read_text())["leaves"]
    names = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(compressed)]
    codes = [name for name, how in zip(names, layout, strict=True) if "codes" in how["parts"]]
    assert codes == [f"variables/params/{k}/kernel" for k in ("conv1", "fc1", "fc3")]
    kernels = sum(math.prod(p["kernel"].shape) for p in compressed.variables["params"].values())
    stored = sum(f.stat().st_size for f in (tmp_path / "v").rglob("*") if f.is_file())
    assert stored < kernels * bits / 8 * 1.2 + FIXED_OVERHEAD


def test_a_flipped_byte_of_the_packed_buffer_is_refused_naming_the_file(tmp_path):
    store.save_compressed(tmp_path / "v", lenet_compressed(4))
    files = [p for p in (tmp_path / "v").rglob("*") if p.is_file()]
    for damaged in (max(files, key=lambda p: p.stat().st_size), tmp_path / "v" / store.PACKING):
        original = damaged.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        damaged.write_bytes(bytes(data))
        with pytest.raises(UserError) as refused:
            store.restore_compressed(tmp_path / "v", lenet_compressed(4))
        message = str(refused.value)
        assert "\n" not in message and f"file {damaged} fails its checksum" in message
        damaged.write_bytes(original)
    store.restore_compressed(tmp_path / "v", lenet_compressed(4))


def test_a_save_of_another_structure_is_refused(tmp_path):
    store.save_compressed(tmp_path / "v", lenet_compressed(8))
    with pytest.raises(UserError, match="holds other arrays than its variant has"):
        store.restore_compressed(tmp_path / "v", lenet_compressed(8, members=(3,)))


def test_a_save_of_compax_before_packing_is_restored(tmp_path):
    """One orbax array per non-empty leaf, named by its index, and no packing.json."""
    compressed = lenet_compressed(8)
    compressed = compressed.replace(qstate=compressed.qstate.replace(
        activation_scale=jnp.zeros((2, 0)), activation_zero_point=jnp.zeros((2, 0), jnp.int32)))
    leaves = jax.tree.leaves(compressed)
    path = (tmp_path / "old").absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, {str(i): x for i, x in enumerate(leaves) if x.size})
    write_json_atomic(path / MANIFEST, {"sha256": tree_checksums(path, skip=(MANIFEST,))})
    back = store.restore_compressed(path, compressed)
    for a, b in zip(leaves, jax.tree.leaves(back), strict=True):
        assert_identical(a, b)


@pytest.fixture(scope="module")
def lenet_variants():
    """{name: LeNet-5 population of 2 members} of each variant, made by `one_model.compress`."""
    model = get_model("lenet5", 10)
    members = [random_variables(model, seed) for seed in (0, 1)]
    calib = np.asarray(jax.random.uniform(jax.random.key(2), (8, 32, 32, 3), minval=-1.0,
                                          maxval=1.0))
    variants = {}
    for entry in ("w8a8", "w4a8", "pruned=l1_global(amount=0.7)",
                  "pruned_w8a8=l1_global(amount=0.7)+quantize(weight_bits=8,activation_bits=8)"):
        name = entry.split("=")[0]
        made = [compress(entry, model, v, calib) for v in members]
        variants[name] = jax.tree.map(lambda *a: jnp.stack(a), *made)
    return model, variants


@pytest.mark.parametrize("name", ["w8a8", "w4a8", "pruned", "pruned_w8a8"])
def test_bytes_on_disk_are_near_the_computed_size(lenet_variants, tmp_path, name):
    model, variants = lenet_variants
    population = variants[name]
    path = tmp_path / name
    store.save_compressed(path, population, module=model, info={}, record={"results": {}})
    _, back, _ = store.restore_saved(path)
    for a, b in zip(jax.tree.leaves(population), jax.tree.leaves(back), strict=True):
        assert_identical(a, b)
    computed = 2 * size_bytes(jax.tree.map(lambda a: a[0], population))
    on_disk = sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())
    assert on_disk <= 1.2 * computed + FIXED_OVERHEAD, (on_disk, computed)
