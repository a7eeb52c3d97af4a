"""Image preprocessing in JAX: normalization and the study's flip + padded-crop augmentation."""

import jax
import jax.numpy as jnp

from compax.errors import UserError


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """uint8 images (..., H, W, 3) to float32 `(images / 255 - mean) / std`, per channel."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment_flip_crop(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """Random horizontal flip (p=0.5) then a random crop of the zero-padded image, per image.

    images: (B, H, W, C), uint8 or float; the result has the same shape and dtype. Each image is
    flipped left-right with probability 1/2, padded with `pad` zeros on every side and cropped back
    to (H, W) at a uniformly random offset, as PyTorch's `RandomHorizontalFlip()` followed by
    `RandomCrop(H, padding=pad)`. Deterministic from `key`; jit- and vmap-able (`pad` is static).
    """
    if images.ndim != 4:
        raise UserError(
            f"augment_flip_crop needs a batch (B, H, W, C), got shape {images.shape}: "
            "add a batch axis, e.g. images[None]"
        )
    if not isinstance(pad, int) or pad < 0:
        raise UserError(f"augment_flip_crop pad must be an int >= 0, got {pad!r}: pass e.g. pad=4")
    batch, height, width, channels = images.shape
    flip_key, crop_key = jax.random.split(key)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)
    flipped = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
    padded = jnp.pad(flipped, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)
