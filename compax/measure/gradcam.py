"""Grad-CAM class activation maps of any compressed variant (Selvaraju et al. 2017; Zee et al.).

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization" (ICCV 2017): with A^k the k-th channel of the last convolutional feature map and y_t
the logit of the target class,

    alpha_k = (1 / Z) sum_ij d y_t / d A^k_ij          (spatial mean of the gradient)
    L       = ReLU(sum_k alpha_k A^k)

upsampled bilinearly to the input size and, here, normalised per image to [0, 1], so that maps
compare like saliency maps (`compax.measure.saliency.compare_saliency`). Zee et al. compare such
class activation maps of VGG-6 before and after pruning and quantization.

A and its gradient come from `compax.measure.taps`: A = ReLU(last_conv tap) and the gradient is
taken at the tap, i.e. before the ReLU for LeNet-5 and VGG-6 (whose tapped module is the conv /
BatchNorm the ReLU follows) and of the block's rectified output for ResNet-18 and SqueezeNet. Where
A^k_ij > 0 both gradients agree; where A^k_ij = 0 the pre-ReLU gradient is 0, so alpha_k averages
the gradient over the active positions (with zeros elsewhere). Quantized variants differentiate
through the straight-through estimator of fake quantization.
"""

import jax
import jax.numpy as jnp

from compax.compress import Compressed
from compax.measure.saliency import normalized_per_image
from compax.measure.taps import (
    apply_with_taps,
    cpu_convolutions_for,
    images_and_targets,
    map_batches,
    tap_points,
)


def cam_from_activations(activations, gradients, size: tuple[int, int]):
    """ReLU(sum_k alpha_k A^k), alpha_k = spatial mean of the gradients, resized bilinearly
    (`jax.image.resize`, half-pixel centres) to `size` = (H, W) and normalised per image to [0, 1].

    `activations` A and `gradients` dy_t/dA are (N, h, w, K); returns (N, H, W).
    """
    alpha = jnp.mean(gradients, axis=(1, 2))
    cam = jax.nn.relu(jnp.einsum("nhwk,nk->nhw", activations, alpha))
    cam = jax.image.resize(cam, (cam.shape[0], *size), method="bilinear")
    return normalized_per_image(cam)


def grad_cam(model, compressed: Compressed, x, targets, batch_size: int = 256):
    """Grad-CAM maps (N, H, W) in [0, 1] of the variant for normalised images `x` (N, H, W, C) and
    integer `targets` (N,) (see the module doc). Runs `batch_size` images at a time (`lax.map`);
    jit- and vmap-compatible over `compressed`. On a CPU, variants without activation quantization
    run their small convolutions on the kernels of `compax.kernels` (`taps.cpu_convolutions_for`)."""
    x, targets = images_and_targets(x, targets)

    def batch_cams(images, labels):
        def target_logits(offsets):
            with cpu_convolutions_for(compressed):
                logits, taps = apply_with_taps(model, compressed, images, offsets)
            return jnp.take_along_axis(logits, labels[:, None], axis=1).sum(), taps["last_conv"]

        offsets = jnp.zeros(tap_points(model, compressed, images).last_conv_shape, jnp.float32)
        gradients, tapped = jax.grad(target_logits, has_aux=True)(offsets)
        return cam_from_activations(jax.nn.relu(tapped), gradients, images.shape[1:3])

    return map_batches(batch_cams, batch_size, x, targets)
