"""ONNX export (compax/export): every variant's graph passes onnx.checker, runs in onnxruntime and
computes what compax computes; the export stage's results; the errors are one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import flax.linen as nn  # noqa: E402

import compax  # noqa: E402
from compax import pipeline  # noqa: E402
from compax.compress.compressed import Compressed, apply_compressed  # noqa: E402
from compax.compress.registry import RECIPES  # noqa: E402
from compax.data import normalize  # noqa: E402
from compax.errors import UserError  # noqa: E402
from compax.export import runtime  # noqa: E402
from compax.export.graph import export_onnx  # noqa: E402
from compax.member_vmap import take_members  # noqa: E402
from compax.models import get_model, init_variables  # noqa: E402
from compax.one_model import compress  # noqa: E402
from tests.helpers import tiny_dataset  # noqa: E402

# Training-time recipes, with one epoch: they export as the forms their last step leaves.
TRAINED = {"gmp_90": "gmp(final=0.9,begin=0,end=1,every=0.5,epochs=1)",
           "pruned_ft": "l1_global(amount=0.5)+finetune(epochs=1)",
           "qat_w8a8": "quantize(weight_bits=8,activation_bits=8)+qat(epochs=1)",
           "qat_w4a8": "quantize(weight_bits=4,activation_bits=8)+qat(epochs=1)",
           "pruned_kd": "l1_global(amount=0.5)+distill(epochs=1)",
           "qat_w4a8_kd": "quantize(weight_bits=4,activation_bits=8)+distill(epochs=1)",
           "ablated": "ablate(epochs=1)"}
FLOAT_FORMS = ("float32", "pruned", "pruned_layer", "filters_pruned", "float16_storage", "gmp_90",
               "pruned_ft", "pruned_kd", "ablated", *(f"sparsity_{s}" for s in (10, 30, 50, 70, 90)))


@pytest.fixture(scope="module")
def finished(study_run):
    """The session's small study (2 trained LeNet-5 members on `tiny_dataset`), loaded."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "load_dataset", lambda *args, **kwargs: tiny_dataset())
        run = compax.load_run(study_run[0])
        run.dataset  # noqa: B018  (loaded while the patch holds)
        yield run


def _agreement(module, member, proto, images, mean, std):
    """(argmax agreement, max |logit difference|) of onnxruntime against compax on uint8 images."""
    logits = runtime.predict(runtime.session(proto.SerializeToString(), 1), images, len(images))
    reference = np.asarray(apply_compressed(module, member, normalize(images, mean, std)))
    return float(np.mean(logits.argmax(1) == reference.argmax(1))), float(
        np.max(np.abs(logits - reference)))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_registered_variant_of_lenet5_exports_and_agrees_with_compax(finished, name):
    recipe = TRAINED.get(name, RECIPES[name].replace("amount=searched", "amount=0.5"))
    variant = finished.compress(f"{name}={recipe}")
    data = finished.dataset
    member = take_members(variant.compressed, 0)
    proto = export_onnx(variant.model, member, data.test.images.shape[1:], data.mean, data.std)
    onnx.checker.check_model(proto, full_check=True)
    agreement, difference = _agreement(variant.model, member, proto, data.test.images, data.mean,
                                       data.std)
    if name in FLOAT_FORMS:
        assert agreement == 1.0 and difference < 1e-4
    else:  # half precision, integer grids: a rounding apart at most a few values
        assert agreement >= 0.95, (name, agreement, difference)


WIDE = {"pruned_w8a8": "p=l1_global(amount=0.5)+quantize(weight_bits=8,activation_bits=8)",
        "per_tensor_w8a8": "t=quantize(weight_bits=8,activation_bits=8,granularity=per_tensor)",
        "w4a4": "a4=quantize(weight_bits=4,activation_bits=4)",
        "w6a6": "a6=quantize(weight_bits=6,activation_bits=6)"}


@pytest.mark.parametrize("name", ["float32", "float16", "float16_storage", "bfloat16", "w8a8",
                                  "w4a8", "dynamic_int8", "weight_only_int8", *WIDE])
def test_a_wide_model_exports_every_form_and_agrees_where_compax_is_not_near_a_tie(name):
    model = get_model("vgg6", 10, 0.5)
    variables = init_variables(model, jax.random.key(1))
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 32, 32, 3)).astype(np.float32)
    images = rng.standard_normal((40, 32, 32, 3)).astype(np.float32)
    compressed = compress(WIDE.get(name, name), model, variables, calib)
    proto = export_onnx(model, compressed, (32, 32, 3))
    onnx.checker.check_model(proto, full_check=True)
    logits = runtime.predict(runtime.session(proto.SerializeToString(), 1), images, 40)
    reference = np.asarray(apply_compressed(model, compressed, jnp.asarray(images)))
    top2 = np.sort(reference, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05 * np.ptp(reference)  # random weights: near ties
    assert clear.sum() >= 10
    np.testing.assert_array_equal(logits.argmax(1)[clear], reference.argmax(1)[clear])
    assert np.max(np.abs(logits - reference)) <= 0.05 * np.ptp(reference)


def test_files_store_integers_in_their_bits_and_take_any_batch():
    model = get_model("vgg6", 10, 0.5)
    variables = init_variables(model, jax.random.key(0))
    calib = np.random.default_rng(0).standard_normal((32, 32, 32, 3)).astype(np.float32)
    sizes, protos = {}, {}
    for name in ("float32", "w8a8", "w4a8"):
        protos[name] = export_onnx(model, compress(name, model, variables, calib), (32, 32, 3))
        sizes[name] = len(protos[name].SerializeToString())
    types = {t.data_type for t in protos["w4a8"].graph.initializer}
    assert onnx.TensorProto.INT4 in types and onnx.TensorProto.INT8 not in types
    assert onnx.TensorProto.INT8 in {t.data_type for t in protos["w8a8"].graph.initializer}
    assert sizes["w8a8"] <= 0.3 * sizes["float32"] and sizes["w4a8"] <= 0.18 * sizes["float32"]
    sess = runtime.session(protos["w8a8"].SerializeToString(), 1)
    images = calib[:5]
    together = runtime.predict(sess, images, 5)
    one_by_one = runtime.predict(sess, images, 1)
    np.testing.assert_array_equal(together, one_by_one)


def test_the_graph_normalises_raw_images_as_compax_does():
    model = get_model("lenet5", 4, 0.5)
    variables = init_variables(model, jax.random.key(0))
    data = tiny_dataset()
    proto = export_onnx(model, Compressed(variables, None), (32, 32, 3), data.mean, data.std)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    agreement, difference = _agreement(model, Compressed(variables, None), proto, data.test.images,
                                       data.mean, data.std)
    assert agreement == 1.0 and difference < 1e-5


class _Cosine(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(8, name="hidden")(x.reshape(x.shape[0], -1))
        return nn.Dense(3, name="out")(jnp.cos(x))


def test_an_operator_without_translation_is_one_line_naming_it_and_the_layer():
    model = _Cosine()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(UserError) as error:
        export_onnx(model, Compressed(variables, None), (4, 4, 3))
    message = str(error.value)
    assert "\n" not in message and "'cos'" in message and "_Cosine" in message


def test_the_export_stage_measures_every_variant_in_onnxruntime(study_run):
    workdir, results = study_run
    for name in ("baseline", "pruned", "w8a8", "pruned_w8a8"):
        e = results["variants"][name]["export"]
        assert len(e["files"]) == 2 and all((workdir / f).is_file() for f in e["files"])
        assert min(e["ort_agreement"]) >= 0.99 and e["ort_images_per_second"] > 0
        assert e["onnx_bytes"] == (workdir / e["files"][0]).stat().st_size
    assert results["variants"]["w8a8"]["export"]["onnx_compression_ratio"] > 2
    assert (workdir / "export" / "compax_manifest.json").is_file()
    assert "ONNX export" in (workdir / "report" / "summary.md").read_text()


def test_without_onnxruntime_the_export_stage_is_refused_in_one_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(UserError, match="pip install onnx==.* onnxruntime==") as error:
        runtime.require_onnx()
    assert "\n" not in str(error.value)


def test_a_new_operator_is_one_registered_translation(monkeypatch):
    from compax.export import graph

    def cosine(w, eqn, args, aval):
        (x,) = args
        return w.result(w.node("Cos", [x.name])[0], aval, x.perm)

    monkeypatch.setitem(graph.TRANSLATIONS, "cos", cosine)
    model = _Cosine()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    proto = export_onnx(model, Compressed(variables, None), (4, 4, 3))
    images = np.random.default_rng(0).standard_normal((6, 4, 4, 3)).astype(np.float32)
    logits = runtime.predict(runtime.session(proto.SerializeToString(), 1), images, 6)
    np.testing.assert_allclose(logits, model.apply(variables, images), rtol=1e-5, atol=1e-6)


def test_a_float_bias_keeps_compaxs_function_where_the_int32_bias_rounds(finished):
    data = finished.dataset
    variant = finished.compress("w8a8")
    member = take_members(variant.compressed, 0)
    protos = {b: export_onnx(variant.model, member, data.test.images.shape[1:], data.mean,
                             data.std, integer_bias=b) for b in (True, False)}
    int32 = onnx.TensorProto.INT32
    assert any(t.data_type == int32 for t in protos[True].graph.initializer)
    assert not any(t.data_type == int32 for t in protos[False].graph.initializer)
    assert sum(n.op_type == "Add" for n in protos[False].graph.node) >= 5  # 2 convs, 3 dense
    agreement, difference = _agreement(variant.model, member, protos[False], data.test.images,
                                       data.mean, data.std)
    assert agreement == 1.0
