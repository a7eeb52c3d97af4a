"""compax's PTQ against PyTorch's on the same LeNet-5 or SqueezeNet weights (PyTorch is imported
inside the functions).

The reference is what Schwaiger et al. (2022) ran: `torch.ao.quantization` eager-mode static PTQ with
the fbgemm engine and `get_default_qconfig('fbgemm')` (HistogramObserver with reduce_range=True for
activations, PerChannelMinMaxObserver qint8 per_channel_symmetric for weights), conv+relu and
linear+relu fused, QuantStub / DeQuantStub around the network, calibrated on the same images in one
batch (so that its histograms are exact, as compax's are) or batch by batch (compax's
`histogram_batches` observer). Also `quantize_dynamic` (dynamic int8 Linear layers). The networks
are `torch_reference/models.py`'s twins of `compax.models.LeNet5` and `compax.models.SqueezeNet`, the
compax weights ported in by name.
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from compax.compress.observers import affine_qparams, histogram_range
from compax.compress.ptq import QuantConfig, ptq, quantized_apply
from torch_reference.models import torch_twin


@contextlib.contextmanager
def _engine(name: str):
    import torch

    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def torch_qconfig(weight_bits: int):
    """fbgemm's default qconfig; below 8 bits its per-channel symmetric weight observer is limited
    to [-2^(b-1), 2^(b-1) - 1], so the int8 kernels run on weights of a b-bit grid (scale
    max|w| / ((2^b - 1) / 2)), PyTorch's way to evaluate 4-bit weights without int4 kernels."""
    import torch
    from torch.ao import quantization as tq

    qconfig = tq.get_default_qconfig("fbgemm")
    if weight_bits == 8:
        return qconfig
    weight = tq.PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
        quant_min=-(2 ** (weight_bits - 1)), quant_max=2 ** (weight_bits - 1) - 1)
    return tq.QConfig(activation=qconfig.activation, weight=weight)


def _nchw(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def torch_dynamic(model, params, images):
    """(float logits, logits of `torch.ao.quantization.quantize_dynamic`) of `model` (LeNet-5)
    holding `params` on NHWC images,
    the fbgemm engine, every nn.Linear dynamically quantized with `per_channel_dynamic_qconfig`
    (qint8 per-channel symmetric weights; per call, the input's min/max over the whole tensor,
    quint8 with reduce_range), the convolutions in float; one call on all `images`."""
    import torch
    from torch import nn
    from torch.ao import quantization as tq

    net = torch_twin(model, params)
    with torch.no_grad(), _engine("fbgemm"):
        float_logits = net(_nchw(images)).numpy()
        dynamic = tq.quantize_dynamic(net, {nn.Linear: tq.per_channel_dynamic_qconfig},
                                      dtype=torch.qint8)
        logits = dynamic(_nchw(images)).numpy()
    if not isinstance(dynamic.fc1, torch.ao.nn.quantized.dynamic.Linear):
        raise AssertionError(f"quantize_dynamic left fc1 a {type(dynamic.fc1).__name__}")
    return float_logits, logits


def _batched(net, images, batch: int = 1000):
    import torch

    return torch.cat([net(_nchw(images[i:i + batch])) for i in range(0, len(images), batch)]).numpy()


def torch_ptq(model, params, calib_images, images, weight_bits: int = 8,
              calib_batch: int | None = None):
    """PyTorch's fbgemm PTQ of `model` (LeNet-5 or SqueezeNet, `torch_twin`) holding
    `params`, on NHWC float images (as compax takes them), calibrated on `calib_images` in one batch
    or, with `calib_batch`, in batches of that many (a DataLoader).

    Returns (float logits, int8 logits, {point: (scale, zero point)}, {point: (histogram, min,
    max)} of its observers after calibration), points in compax's order (input first).
    """
    import torch
    from torch.ao import quantization as tq

    net = torch_twin(model, params)
    with torch.no_grad(), _engine("fbgemm"):
        float_logits = _batched(net, images)
        net.qconfig = torch_qconfig(weight_bits)
        tq.fuse_modules(net, net.fuse_groups, inplace=True)
        prepared = tq.prepare(net)
        step = calib_batch or len(calib_images)
        for start in range(0, len(calib_images), step):
            prepared(_nchw(calib_images[start:start + step]))
        observed = {name: tuple(getattr(prepared.get_submodule(name).activation_post_process,
                                        a).numpy() for a in ("histogram", "min_val", "max_val"))
                    for name in net.points}
        quantized = tq.convert(prepared)
        int8_logits = _batched(quantized, images)
    qparams = {name: (float(quantized.get_submodule(name).scale),
                      int(quantized.get_submodule(name).zero_point)) for name in net.points}
    return float_logits, int8_logits, qparams, observed


def compare_with_torch_ptq(model, variables, calib_images, images, labels,
                           weight_bits: int = 8, calib_batch: int | None = None) -> dict:
    """Accuracy and agreement of compax's PTQ (w8a8, or w4a8 with weight_bits=4) and PyTorch's on
    the same LeNet-5 or SqueezeNet weights, PyTorch calibrated in one batch (compax: the exact `histogram`
    observer) or in batches of `calib_batch` (compax: `histogram_batches` with that batch).

    Returns accuracies (float model, compax, torch), the share of images both predict alike, the
    largest logit difference in units of the output scale, the largest relative difference of the
    activation scales, whether all activation zero points are equal, and whether compax's observer
    gives exactly PyTorch's (scale, zero point) from PyTorch's own calibration histograms (with
    `calib_batch`, also how far compax's exact one-pass histograms' scales are). End to
    end the scales can differ slightly: XLA's and PyTorch's float convolutions round differently, so
    the calibration histograms differ in a few counts and the L2 search can stop elsewhere.
    """
    labels = np.asarray(labels)
    config = QuantConfig(weight_bits=weight_bits, batch_size=len(calib_images),
                         observer="histogram_batches" if calib_batch else "histogram",
                         calibration_batch=calib_batch or 128)
    variables_q, qstate = ptq(model, variables, jnp.asarray(calib_images, jnp.float32), config)
    apply = jax.jit(quantized_apply, static_argnums=0)
    ours = np.concatenate([np.asarray(apply(model, variables_q, qstate, jnp.asarray(images[i:i + 1000])))
                           for i in range(0, len(images), 1000)])
    float_logits, theirs, qparams, observed = torch_ptq(model, variables["params"], calib_images,
                                                         images, weight_bits, calib_batch)
    scales = np.asarray(qstate.activation_scale, np.float64)
    torch_scales, torch_zero_points = map(np.asarray, zip(*qparams.values(), strict=True))
    from_their_histograms = [
        affine_qparams(*histogram_range(hist, lo, hi, 2 ** config.activation_bits),
                       *config.observer_range) for hist, lo, hi in observed.values()]
    exact = {}
    if calib_batch:  # how far compax's exact one-pass histograms would be from PyTorch's batches
        _, exact_state = ptq(model, variables, jnp.asarray(calib_images, jnp.float32),
                             dataclasses.replace(config, observer="histogram"))
        exact_scales = np.asarray(exact_state.activation_scale, np.float64)
        exact["exact_max_scale_rel_diff"] = float(np.max(np.abs(exact_scales - torch_scales)
                                                         / torch_scales))
    return {
        **exact,
        "float_accuracy": float(np.mean(float_logits.argmax(1) == labels)),
        "compax_accuracy": float(np.mean(ours.argmax(1) == labels)),
        "torch_accuracy": float(np.mean(theirs.argmax(1) == labels)),
        "same_prediction": float(np.mean(ours.argmax(1) == theirs.argmax(1))),
        "max_logit_diff_steps": float(np.max(np.abs(ours - theirs)) / scales[-1]),
        "max_scale_rel_diff": float(np.max(np.abs(scales - torch_scales) / torch_scales)),
        "same_zero_points": bool(np.all(np.asarray(qstate.activation_zero_point)
                                        == torch_zero_points)),
        "observer_exact": all(float(s) == want[0] and int(z) == want[1]
                              for (s, z), want in zip(from_their_histograms, qparams.values(),
                                                      strict=True)),
    }
