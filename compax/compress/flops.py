"""Multiply-accumulates of one forward pass, counted from the traced program.

Every convolution and matrix product in the jaxpr of `fn(*args)` (sub-programs of jit, custom
gradients, scans and conditionals included) is counted:

    conv_general_dilated   MACs = |output| * (kernel height * kernel width * input channels / groups)
    dot_general            MACs = |output| * (product of the contracted dimensions)

so the count follows the shapes the model actually computes with (a structurally pruned model
counts its smaller layers; unstructured zeros are counted, since dense kernels multiply them).
FLOPs are commonly quoted as 2 x MACs.
"""

import math

import jax
import numpy as np
from jax.extend.core import jaxprs_in_params


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            numbers = eqn.params["dimension_numbers"]
            out = math.prod(eqn.outvars[0].aval.shape)
            window = math.prod(rhs[d] for d in numbers.rhs_spec[2:])
            total += out * window * rhs[numbers.rhs_spec[1]]
        elif name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
        for sub in jaxprs_in_params(eqn.params):
            total += _jaxpr_macs(sub)
    return total


def count_macs(fn, *args) -> int:
    """MACs of `fn(*args)` for the shapes of `args` (module doc)."""
    closed = jax.make_jaxpr(fn)(*args)
    return int(_jaxpr_macs(closed.jaxpr))


def model_macs(apply_fn, member, image_shape) -> int:
    """MACs of `apply_fn(member, x)` for one image of `image_shape` (H, W, C)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), np.float32)
    return count_macs(apply_fn, member, x)
