"""Inference speed and file size of compax's ONNX exports in onnxruntime, against PyTorch float32
and int8, per model and width, in one run.

python experiments/bench_export.py [--models=lenet5,resnet18] [--widths=cpu,1.0] [--batch=64]
                                   [--steps=10] [--rounds=3] [--threads=0] [--classes=10]
                                   [--calib_images=64] [--quick]

For each model (default lenet5, squeezenet, resnet18, vgg6) at each width (`cpu`: its class's
`cpu_size` width, or a number), with random weights (`compax.models.init_variables`, key 0: speed
needs no training), the variants float32, w8a8, float16, w4a8 and dynamic_int8 are made by
`compax.one_model.compress` (calibrated on `--calib_images` random N(0, 1) images) and written by
`compax.export.graph.export_onnx` (opset 21; w8a8/w4a8 in QDQ form, which onnxruntime fuses into
QLinearConv / QGemm, w4a8 with INT4 weights, dynamic_int8 as DynamicQuantizeLinear + ConvInteger /
MatMulInteger, float16 native). Each becomes an onnxruntime session (CPUExecutionProvider,
ORT_ENABLE_ALL). The reference is the model's PyTorch twin (`torch_reference/models.py`), NCHW, eval
mode, under `torch.inference_mode`: LeNet-5 and SqueezeNet hold the same weights as the export
(`torch_twin`), ResNet-18 and VGG-6 (batch norm, which `port_params` does not copy) PyTorch's
initialisation (seed 0), the same architecture and cost. Its int8 version is PyTorch's static
post-training quantization with the x86 engine (`torch.backends.quantized.engine = "x86"`,
`get_default_qconfig("x86")`: HistogramObserver uint8 activations with reduce_range, per-channel
symmetric int8 weights), calibrated on the same random images:

    lenet5, squeezenet   eager mode: the twin's QuantStub / DeQuantStub and `fuse_groups`
                         (conv+relu, linear+relu; SqueezeNet's concatenations FloatFunctional)
    vgg6                 eager mode: the Sequential in a QuantWrapper, conv+bn+relu and
                         linear+relu fused
    resnet18             FX graph mode (`prepare_fx` / `convert_fx`, `get_default_qconfig_mapping
                         ("x86")`, which fuses conv+bn(+relu) itself): eager mode fails on the
                         residual blocks' `body(x) + shortcut(x)` (a plain add, no FloatFunctional,
                         has no quantized CPU kernel)

The mode is not hard-coded: eager mode is tried first and FX graph mode when eager fails (its
error printed and kept as `torch_int8_eager_error`); if both fail, the reason is printed and the
int8 speed is null.

All sessions and PyTorch modules are built and warmed up first; then each round times every runner
once in turn (`bench_train.interleaved_seconds_per_step`), `--steps` calls on one batch of `--batch`
random N(0, 1) 32x32x3 images, the fastest of `--rounds` rounds counting. `--threads` sets
onnxruntime's intra_op_num_threads and `torch.set_num_threads` (0: each library's default);
onnxruntime's idle threads sleep instead of spinning (`--ort_spinning` for its default), since in
interleaved rounds a spinning pool takes the 2 cores from the runner timed after it.
`--quick`: 1 round of 2 steps, proving the script runs (the timings are rough).

Printed per model: the ONNX bytes of each variant (`len(proto.SerializeToString())`) and their
ratio to float32's, images/s of each, and the ratios ORT int8 (w8a8) / ORT float32, ORT int8 /
PyTorch int8, ORT float32 / PyTorch float32. The CPU (model name and its avx2, avx512f,
avx512_vnni, avx_vnni, amx_int8, amx_tile flags from /proc/cpuinfo) is printed first. The last line
is one JSON object: {"cpu": {"model", "cores", "flags": {flag: bool}}, "batch", "steps", "rounds",
"quick", "threads", "onnxruntime", "torch", "models": [{"model", "width", "onnx_bytes": {variant:
n}, "bytes_ratio_vs_float32": {variant: r}, "ort_img_s": {variant: x}, "torch_img_s": {"float32",
"int8"}, "torch_weights": "compax" | "torch_init" | null, "torch_int8_mode": "eager" | "fx" | null,
"torch_int8_eager_error", "ratio_ort_int8_vs_ort_float32", "ratio_ort_int8_vs_torch_int8",
"ratio_ort_float32_vs_torch_float32"}, ...]}; a variant that fails to export or run is printed and
null.
"""

import copy
import json
import os
import pathlib
import sys
import traceback
import warnings

import numpy as np
from absl import app, flags

# experiments/ is the script's directory. bench_train defines --steps (used here, 10 by default),
# and --batch_size and --repeats, which are this script's --batch and --rounds: removed, so that
# they are refused rather than ignored.
from bench_train import _STEPS, interleaved_seconds_per_step, model_widths

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root
from torch_reference.models import TWINS, torch_model, torch_twin  # noqa: E402

for _unused in ("batch_size", "repeats"):
    delattr(flags.FLAGS, _unused)
flags.FLAGS.set_default("steps", 10)
flags.declare_key_flag("steps")  # listed in --help with this script's own
DEFAULT_MODELS = ["lenet5", "squeezenet", "resnet18", "vgg6"]
_MODELS = flags.DEFINE_list("models", DEFAULT_MODELS, "Models to time.")
_WIDTHS = flags.DEFINE_list("widths", ["cpu", "1.0"],
                            "Widths: 'cpu' (the model's cpu_size width) or multipliers.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per inference call.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds over all runners; the fastest counts.")
_THREADS = flags.DEFINE_integer("threads", 0, "onnxruntime's intra_op_num_threads and "
                                "torch.set_num_threads (0: the libraries' defaults).")
_CLASSES = flags.DEFINE_integer("classes", 10, "Output classes of every model.")
_CALIB = flags.DEFINE_integer("calib_images", 64, "Random images calibrating the int8 variants.")
_ORT_SPINNING = flags.DEFINE_bool(
    "ort_spinning", False, "Let onnxruntime's idle intra-op threads spin (its default). Off, they "
    "sleep after each call, so that they do not take the cores from the runner timed next.")
_QUICK = flags.DEFINE_bool("quick", False, "2 steps, 1 round: proves the script runs, times roughly.")

VARIANTS = ("float32", "w8a8", "float16", "w4a8", "dynamic_int8")
INT8 = "w8a8"  # the variant that "ORT int8" means in the ratios
IMAGE_SHAPE = (32, 32, 3)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
# PyTorch's deprecation notices of torch.ao.quantization (the reference here, on purpose), of
# reduce_range in its default x86 qconfig and of quantized tensors, each repeated per model.
TORCH_NOTICES = ("torch.ao.quantization is deprecated", "Please use quant_min and quant_max",
                 "quantized tensor creation functions")


def cpu_info() -> dict:
    """{"model", "cores", "flags": {flag: bool}} from /proc/cpuinfo (flags null where it is
    absent); avx512_vnni is also true for the spelling avx512vnni."""
    model, present = None, None
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and present is None:
            present = set(value.split())
    if model is None:
        import platform
        model = platform.processor() or platform.machine()
    flags_ = None if present is None else {
        name: name in present or (name == "avx512_vnni" and "avx512vnni" in present)
        for name in CPU_FLAGS}
    return {"model": model, "cores": os.cpu_count(), "flags": flags_}


def ort_sessions(model, variables, calib, images, threads: int) -> tuple[dict, dict]:
    """({variant: ONNX bytes}, {variant: run(n)}) of the exported variants, each session run once;
    a variant that fails is printed, its bytes None and no runner."""
    import onnxruntime as ort

    from compax.export.graph import INPUT, export_onnx
    from compax.one_model import compress

    sizes, runners = {}, {}
    for variant in VARIANTS:
        try:
            proto = export_onnx(model, compress(variant, model, variables, calib), IMAGE_SHAPE)
            data = proto.SerializeToString()
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if threads > 0:
                options.intra_op_num_threads = threads
            if not _ORT_SPINNING.value:  # idle workers sleep: the next runner gets the cores
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            feed = {INPUT: images}
            session.run(None, feed)
        except Exception as error:  # noqa: BLE001 (a benchmark reports and goes on)
            print(f"  {variant}: export or onnxruntime failed: {type(error).__name__}: {error}",
                  file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            sizes[variant] = None
            continue
        sizes[variant] = len(data)

        def run(n, session=session, feed=feed):
            for _ in range(n):
                session.run(None, feed)
        runners[variant] = run
    return sizes, runners


def sequential_fuse_groups(net) -> list[list[str]]:
    """The conv+bn(+relu), conv+relu and linear+relu runs of consecutive modules inside `net`'s
    Sequentials, as qualified names for `torch.ao.quantization.fuse_modules`."""
    from torch import nn

    groups = []
    for prefix, module in net.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        i = 0
        while i < len(children):
            kinds = [type(m) for _, m in children[i:i + 3]] + [None, None]
            n = 1
            if kinds[0] is nn.Conv2d:
                n += kinds[1] is nn.BatchNorm2d
                n += kinds[n] is nn.ReLU
            elif kinds[0] is nn.Linear and kinds[1] is nn.ReLU:
                n = 2
            if n > 1:
                groups.append([f"{prefix}.{name}" if prefix else name for name, _ in children[i:i + n]])
            i += n
    return groups


def _eager_int8(net, calib, example):
    import torch
    from torch.ao import quantization as tq

    net = copy.deepcopy(net).eval()
    tq.fuse_modules(net, getattr(net, "fuse_groups", None) or sequential_fuse_groups(net),
                    inplace=True)
    if not hasattr(net, "quant"):  # no QuantStub of its own: quantize the input, dequantize the output
        net = tq.QuantWrapper(net).eval()
    net.qconfig = tq.get_default_qconfig("x86")
    with torch.no_grad():
        prepared = tq.prepare(net)
        prepared(calib)
        quantized = tq.convert(prepared)
    with torch.inference_mode():
        quantized(example)  # a model whose ops have no quantized kernel fails here
    return quantized


def _fx_int8(net, calib, example):
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        prepared = prepare_fx(net, get_default_qconfig_mapping("x86"), (example,))
        prepared(calib)
        quantized = convert_fx(prepared)
    with torch.inference_mode():
        quantized(example)
    return quantized


def torch_int8(net, calib, example):
    """(int8 module, "eager" | "fx" | None, eager mode's error or None): x86 static quantization of
    float `net` calibrated on `calib` (NCHW), eager mode first, FX graph mode if eager fails."""
    with warnings.catch_warnings():
        for notice in TORCH_NOTICES:
            warnings.filterwarnings("ignore", message=f".*{notice}")
        return _torch_int8(net, calib, example)


def _torch_int8(net, calib, example):
    try:
        return _eager_int8(net, calib, example), "eager", None
    except Exception as error:  # noqa: BLE001
        eager_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    print(f"  PyTorch eager-mode quantization failed ({eager_error[:300]}); trying FX graph mode")
    try:
        return _fx_int8(net, calib, example), "fx", eager_error
    except Exception as error:  # noqa: BLE001
        print(f"  PyTorch cannot quantize this model: FX graph mode failed too: "
              f"{type(error).__name__}: {str(error)[:300]}")
        return None, None, eager_error


def torch_runners(name: str, model, variables, calib, images) -> tuple[dict, dict]:
    """({name: run(n)} of PyTorch float32 and int8 inference on `images` (NHWC, permuted to NCHW
    once), and {"torch_weights", "torch_int8_mode", "torch_int8_eager_error"}); no runners without
    torch or without a twin of the model."""
    info = {"torch_weights": None, "torch_int8_mode": None, "torch_int8_eager_error": None}
    try:
        import torch
    except ImportError:
        print("  no PyTorch: no reference")
        return {}, info
    if name not in TWINS:
        print(f"  no PyTorch twin of {name} in torch_reference/models.py: no reference")
        return {}, info
    import jax

    from compax.errors import UserError

    try:  # LeNet-5 and SqueezeNet: the export's own weights
        params = jax.tree.map(np.array, variables["params"])  # writable copies for torch.from_numpy
        net, info["torch_weights"] = torch_twin(model, params), "compax"
    except UserError:  # batch-norm models: PyTorch's initialisation, the same architecture
        torch.manual_seed(0)
        net, info["torch_weights"] = torch_model(name, model.width, model.num_classes).eval(), "torch_init"

    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    x, calib = nchw(images), nchw(calib)
    torch.backends.quantized.engine = "x86"
    quantized, info["torch_int8_mode"], info["torch_int8_eager_error"] = torch_int8(net, calib, x)
    runners = {}
    for key, module in (("float32", net), ("int8", quantized)):
        if module is None:
            continue

        def run(n, module=module):
            with torch.inference_mode():
                for _ in range(n):
                    module(x)
        run(1)
        runners[key] = run
    return runners, info


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _fmt(value, spec):
    return "   n/a" if value is None else format(value, spec)


def bench_model(name: str, width: float, classes: int, calib, images, steps: int, rounds: int,
                threads: int) -> dict:
    import jax

    from compax.models import get_model, init_variables

    print(f"{name} x{width:g}:", flush=True)
    model = get_model(name, classes, width)
    variables = init_variables(model, jax.random.key(0))
    sizes, ort_runs = ort_sessions(model, variables, calib, images, threads)
    torch_runs, info = torch_runners(name, model, variables, calib, images)
    runners = {("ort", k): run for k, run in ort_runs.items()}
    runners.update({("torch", k): run for k, run in torch_runs.items()})
    seconds = interleaved_seconds_per_step(runners, dict.fromkeys(runners, steps), rounds)
    batch = len(images)
    ort_img_s = {v: (batch / seconds["ort", v] if ("ort", v) in seconds else None) for v in VARIANTS}
    torch_img_s = {k: (batch / seconds["torch", k] if ("torch", k) in seconds else None)
                   for k in ("float32", "int8")}
    row = {
        "model": name, "width": width,
        "onnx_bytes": sizes,
        "bytes_ratio_vs_float32": {v: _ratio(n, sizes["float32"]) for v, n in sizes.items()},
        "ort_img_s": ort_img_s, "torch_img_s": torch_img_s, **info,
        "ratio_ort_int8_vs_ort_float32": _ratio(ort_img_s[INT8], ort_img_s["float32"]),
        "ratio_ort_int8_vs_torch_int8": _ratio(ort_img_s[INT8], torch_img_s["int8"]),
        "ratio_ort_float32_vs_torch_float32": _ratio(ort_img_s["float32"], torch_img_s["float32"]),
    }
    print("  ONNX bytes  " + "  ".join(
        f"{v} {_fmt(n, 'd')} ({_fmt(row['bytes_ratio_vs_float32'][v], '.2f')})"
        for v, n in sizes.items()))
    print("  ORT img/s   " + "  ".join(f"{v} {_fmt(x, '.0f')}" for v, x in ort_img_s.items()))
    print(f"  PyTorch img/s  float32 {_fmt(torch_img_s['float32'], '.0f')}"
          f"  int8 {_fmt(torch_img_s['int8'], '.0f')} ({info['torch_int8_mode']} mode,"
          f" weights {info['torch_weights']})")
    print(f"  ratios  ORT int8/ORT float32 {_fmt(row['ratio_ort_int8_vs_ort_float32'], '.2f')}"
          f"  ORT int8/PyTorch int8 {_fmt(row['ratio_ort_int8_vs_torch_int8'], '.2f')}"
          f"  ORT float32/PyTorch float32 {_fmt(row['ratio_ort_float32_vs_torch_float32'], '.2f')}",
          flush=True)
    return row


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def main(argv):
    del argv
    quick = _QUICK.value
    steps, rounds = (2, 1) if quick else (_STEPS.value, _ROUNDS.value)
    batch, threads, classes = _BATCH.value, _THREADS.value, _CLASSES.value
    if _version("onnxruntime") is None:
        raise app.UsageError("onnxruntime is not installed: pip install onnxruntime")
    if threads > 0 and _version("torch") is not None:
        import torch
        torch.set_num_threads(threads)
    cpu = cpu_info()
    flag_text = ("no /proc/cpuinfo flags" if cpu["flags"] is None else
                 ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items()))
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; {flag_text}")
    print(f"onnxruntime {_version('onnxruntime')}, PyTorch {_version('torch')} (x86 engine for int8);"
          f" batch {batch}, {steps} steps, best of {rounds} rounds, threads {threads or 'default'}",
          flush=True)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((_CALIB.value, *IMAGE_SHAPE), dtype=np.float32)
    images = rng.standard_normal((batch, *IMAGE_SHAPE), dtype=np.float32)
    rows = [bench_model(name, width, classes, calib, images, steps, rounds, threads)
            for name, width in model_widths(_MODELS.value, _WIDTHS.value)]
    print(json.dumps({"cpu": cpu, "batch": batch, "steps": steps, "rounds": rounds, "quick": quick,
                      "threads": threads or None, "onnxruntime": _version("onnxruntime"),
                      "torch": _version("torch"), "models": rows}))


if __name__ == "__main__":
    app.run(main)
