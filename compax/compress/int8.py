"""True-integer execution of a `ptq` model, to check that fake quantization simulates int8 arithmetic.

Every conv / dense layer runs on int8 operands with int32 accumulation
(`lax.conv_general_dilated` / `lax.dot_general` with preferred_element_type=int32), as fbgemm does:

    x_q = round(x / s_x) + z_x in [0, 255]           activation codes of the layer's input point
    w_q = round(w / s_w) in [-128, 127]               per output channel, zero point 0
    acc = sum (x_q - z_x) w_q                         computed as  conv(x_q - c, w_q) - (z_x - c) conv(1, w_q)
    y   = acc * (s_x * s_w) (+ bias, ReLU, ... in float) then requantized at the next point

with c = 128 for 8-bit activations so that x_q - c fits int8 (c = 0 when codes fit already), and
conv(1, w_q) the same convolution of ones, which accounts for zero padding standing for real 0 =
code z_x. Requantization uses the same scales and rounding as `quantized_apply`, so the two agree up
to float rounding in the accumulation. Between layers activations are carried as their float values
on the grid, from which the codes are recovered exactly. A dynamically quantized model
(`QuantConfig(dynamic=True)`) takes s_x, z_x of each layer input from that input's own range, as
`quantized_apply` does, and runs the layers it leaves in float in float.
"""

import jax.numpy as jnp

from compax.compress import interpret
from compax.compress.ptq import FakeQuant, QuantState, run_quantized
from compax.compress.quant import broadcast_along, quantize
from compax.errors import UserError


class _Integer(FakeQuant):
    """Fake-quantizes activations like `quantized_apply`, and runs the layers in integers."""

    def layer(self, eqn, args, tags):
        name = eqn.primitive.name
        if self.qstate.config.dynamic and not self.quantizes_input(eqn):
            return interpret.bind(eqn, args)[0]
        weight_path = tags[1].path and tags[1].path.removeprefix("params/")
        if tags[0].kind != interpret.GRID or weight_path not in self.qstate.weight_scale:
            raise UserError(f"int8 execution needs {name}(activation, kernel) with the kernel a "
                            "parameter used as is; this model computes its kernel or swaps operands")
        x, w = args
        if name == "conv_general_dilated":
            numbers = eqn.params["dimension_numbers"]
            kernel_out, out_axis = numbers.rhs_spec[0], numbers.out_spec[1]
        else:  # x (..., in) . kernel (in, out) -> (..., out)
            (_, contracting), (_, batch) = eqn.params["dimension_numbers"]
            kernel_out = None if batch or w.ndim - 1 in contracting else w.ndim - 1
            out_axis = -1
        if kernel_out != w.ndim - 1:
            raise UserError(f"int8 execution needs the kernel's last axis as output channels in "
                            f"{name}; got dimension numbers {eqn.params['dimension_numbers']}")
        point = tags[0].point
        qmin, qmax = self.qstate.config.activation_range
        wmin, wmax = self.qstate.config.weight_range
        s_x, z_x = self.input_qparams(x, point)
        s_w = self.qstate.weight_scale[weight_path]
        shift = 128 if qmax > 127 else 0
        x_q = (quantize(x, s_x, z_x, qmin, qmax) - shift).astype(jnp.int8)
        w_q = quantize(w, s_w, 0, wmin, wmax, axis=w.ndim - 1).astype(jnp.int8)
        params = {**eqn.params, "preferred_element_type": jnp.int32}
        acc = (eqn.primitive.bind(x_q, w_q, **params)
               - (z_x - shift) * eqn.primitive.bind(jnp.ones_like(x_q), w_q, **params))
        return acc.astype(jnp.float32) * broadcast_along(s_x * s_w, acc.ndim, out_axis)


def int8_apply(model, variables_q, qstate: QuantState, x):
    """Logits of the `ptq` model computed with int8 layers (see the module doc)."""
    if qstate.config.activation_bits is None or qstate.config.activation_bits > 8:
        raise UserError("int8 execution needs quantized activations of at most 8 bits: use a "
                        "QuantConfig with activation_bits <= 8")
    return run_quantized(model, variables_q, qstate, x, _Integer(qstate))
