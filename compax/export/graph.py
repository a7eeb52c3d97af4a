"""ONNX graphs of compressed variants, written by compax's own jaxpr interpreter (`interpret.py`).

The variant's function (`apply_compressed`: the model with BatchNorm folded where a QuantState
folds it) is traced to a jaxpr and evaluated equation by equation with a backend that writes ONNX
nodes (opset 21) instead of computing, so the quantization points are exactly those that compax
calibrated and analysed. Equations on weights and constants only (BatchNorm's rsqrt, reshapes of
biases) are evaluated and stored as initializers; every equation on activations becomes ONNX
nodes. Per variant:

    float32, pruned, filters_pruned   float initializers and operators (a filter-pruned variant is
                                      its smaller dense model)
    float16_storage                   float initializers that float16 holds exactly stored in
                                      float16, each Cast to float32 (TFLite's float16 semantics)
    float16 (cast)                    float16 tensors and operators (onnxruntime's CPU provider
                                      computes in float32 the operators it has no float16 kernel
                                      for, rounding their outputs to float16)
    bfloat16 (cast)                   onnxruntime's CPU provider has no bfloat16 kernels: bfloat16
                                      initializers, computation in float32 with every bfloat16
                                      value rounded by Cast(bfloat16) -> Cast(float32)
    static quantization (w8a8, w4a8,  QDQ: QuantizeLinear -> DequantizeLinear at every quantization
    pruned_w8a8, QAT, per tensor)     point with its calibrated scale and uint8 zero point (uint8
                                      holds [0, 255], the range compax clips to, also with
                                      reduce_range, which only changes the calibrated scale;
                                      fewer bits: a Clip to their codes' range first, as
                                      onnxruntime's optimiser mishandles UINT4 activations);
                                      weights as int8 initializers (4-bit: ONNX INT4, two per byte)
                                      with DequantizeLinear per output channel (axis) or per
                                      tensor; biases int32 with scale s_x * s_w, so that
                                      onnxruntime fuses DQ -> Conv/Gemm -> Q into integer kernels
                                      (compax, as PyTorch's fbgemm, adds the bias in float: that
                                      rounding of the bias moves values at rounding boundaries
                                      by one code; `integer_bias=False` keeps the float bias as
                                      an Add, compax's function on float kernels)
    weight-only int8                  int8 initializers with DequantizeLinear, float activations
    dynamic_int8                      onnxruntime's dynamic quantization operators:
                                      DynamicQuantizeLinear on each layer input, ConvInteger /
                                      MatMulInteger on int8 weights, the int32 result times
                                      s_x * s_w. DynamicQuantizeLinear picks s_x = (max - min) / 255
                                      over [min(x, 0), max(x, 0)], the full uint8 range; compax's
                                      dynamic_int8 follows PyTorch's fbgemm (reduce_range: [0, 127]),
                                      so the two differ by about one step of the coarser grid

ONNX has QuantizeLinear compute round(x / s) where compax multiplies by the float32 reciprocal
of s (as PyTorch), which differs only at exact halves. Activations are NHWC in compax and NCHW
in ONNX's Conv: each value carries the permutation between its logical (jax) axes and its ONNX
tensor, so that transposes are written only where a layout-sensitive operator (a reshape) needs
the logical order. The batch dimension is symbolic: the jaxpr is traced for TRACE_BATCH images,
and reshapes keep the first axis as it is.

Each jax primitive on activations has a translation function (`TRANSLATIONS`, `register_translation`:
a new operator is one function); a primitive without one, or a form of it that is not supported, is
a UserError naming it and the flax module it comes from.
"""

import dataclasses
import itertools

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compax.compress import interpret
from compax.compress.ptq import DYNAMIC_LAYERS, folded_apply
from compax.errors import UserError

OPSET = 21
IR_VERSION = 10
TRACE_BATCH = 3
INPUT, OUTPUT = "images", "logits"

_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
           "pow": "Pow"}
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid",
          "sqrt": "Sqrt", "abs": "Abs", "erf": "Erf", "floor": "Floor", "ceil": "Ceil",
          "sign": "Sign"}
_REDUCE = {"reduce_max": "ReduceMax", "reduce_min": "ReduceMin", "reduce_sum": "ReduceSum"}
_SAME = ("copy", "copy_p")
_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(ml_dtypes.bfloat16): TensorProto.FLOAT, np.dtype(np.int32): TensorProto.INT32,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL}


@dataclasses.dataclass(eq=False)
class Sym:
    """An activation of the graph: ONNX tensor `name`, holding the jax value of logical `shape`
    and `dtype` transposed by `perm` (ONNX axis i is logical axis perm[i])."""

    name: str
    shape: tuple
    dtype: np.dtype
    perm: tuple

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _identity(n: int) -> tuple:
    return tuple(range(n))


def _minimal(c: np.ndarray) -> np.ndarray:
    """`c` with every axis along which it is constant reduced to length 1 (same broadcast)."""
    for axis in range(c.ndim):
        if c.shape[axis] > 1 and np.array_equal(c, np.broadcast_to(c.take([0], axis), c.shape)):
            c = c.take([0], axis)
    return c


class _Writer(interpret.Backend):
    """Writes the ONNX nodes of one evaluation of a compressed variant (see the module doc)."""

    def __init__(self, compressed, integer_bias: bool = True):
        qstate = compressed.qstate
        self.qstate = qstate
        self.integer_bias = integer_bias
        self.static = (qstate is not None and qstate.config.activation_bits is not None
                       and not qstate.config.dynamic)
        self.store_float16 = compressed.storage_dtype == "float16"
        self.nodes, self.initializers = [], []
        self.counter = itertools.count()
        self.transposed = {}  # (tensor, perm) -> tensor
        self.layers = {}  # output tensor of a Conv / Gemm without bias -> (node, bias scale, axis)
        self.used = set()  # tensors some node reads
        self.where = ""  # the flax module of the equation being written, for errors

    # -- graph building -------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self.counter)}"

    def node(self, op: str, inputs: list, outputs: int | list = 1, **attrs) -> list[str]:
        names = outputs if isinstance(outputs, list) else [self.fresh(op.lower())
                                                           for _ in range(outputs)]
        self.used.update(i for i in inputs if i)
        self.nodes.append(helper.make_node(op, inputs, names, name=self.fresh(op), **attrs))
        return names

    def initializer(self, array, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def const(self, value, hint: str = "const") -> str:
        """A constant as a graph tensor: float16-exact float32 values of a float16-storage variant
        stored in float16 and Cast; bfloat16 stored in bfloat16 and Cast to float32."""
        value = np.asarray(value)
        if value.dtype == ml_dtypes.bfloat16:
            return self.node("Cast", [self.initializer(value, hint)], to=TensorProto.FLOAT)[0]
        if (self.store_float16 and value.dtype == np.float32 and value.size > 1
                and np.array_equal(value.astype(np.float16).astype(np.float32), value)):
            return self.node("Cast", [self.initializer(value.astype(np.float16), hint)],
                             to=TensorProto.FLOAT)[0]
        return self.initializer(value, hint)

    def ints(self, values, hint: str = "shape") -> str:
        return self.initializer(np.asarray(values, np.int64), hint)

    def fail(self, what: str) -> UserError:
        return UserError(f"ONNX export: {what} in {self.where or 'the model'} has no translation;"
                         " add one to compax/export/graph.py or compute it differently")

    # -- layouts -----------------------------------------------------------------------------
    def in_layout(self, s: Sym, perm: tuple) -> str:
        """Tensor holding `s` with ONNX axes the logical axes `perm`."""
        if s.perm == tuple(perm):
            return s.name
        key = (s.name, tuple(perm))
        if key not in self.transposed:
            self.transposed[key] = self.node(
                "Transpose", [s.name], perm=[s.perm.index(p) for p in perm])[0]
        return self.transposed[key]

    def logical(self, s: Sym) -> str:
        return self.in_layout(s, _identity(s.ndim))

    def result(self, name: str, aval, perm=None) -> Sym:
        """The Sym of an equation output `aval` written to tensor `name`; bfloat16 values are
        rounded to bfloat16 (computed in float32)."""
        dtype = np.dtype(aval.dtype)
        if dtype == ml_dtypes.bfloat16:
            name = self.node("Cast", [self.node("Cast", [name], to=TensorProto.BFLOAT16)[0]],
                             to=TensorProto.FLOAT)[0]
        return Sym(name, tuple(aval.shape), dtype, tuple(perm) if perm else _identity(aval.ndim))

    # -- quantization points --------------------------------------------------------------
    def quantize(self, x, point):
        if not self.static:
            return x
        config = self.qstate.config
        bits = config.activation_bits
        scale = np.float32(self.qstate.activation_scale[point])
        zero = int(self.qstate.activation_zero_point[point])
        name = x.name
        if bits < 8:  # codes clipped to [0, 2^bits - 1] inside the uint8 container
            qmin, qmax = config.activation_range
            name = self.node("Clip", [name, self.const(np.float32((qmin - zero) * scale)),
                                      self.const(np.float32((qmax - zero) * scale))])[0]
        zero_point = np.array(zero, np.uint8)
        s, z = self.initializer(scale, "act_scale"), self.initializer(zero_point, "act_zero")
        q = self.node("QuantizeLinear", [name, s, z])[0]
        return dataclasses.replace(x, name=self.node("DequantizeLinear", [q, s, z])[0])

    requantize = quantize

    # -- layers -------------------------------------------------------------------------------
    def weight_codes(self, w, path: str, channel_axis: int):
        """(codes as int8 / int4, scale) of the quantized kernel `w` at `path` (ONNX layout, the
        output channels along `channel_axis`); None when the kernel is float."""
        if self.qstate is None or path not in self.qstate.weight_scale:
            return None
        scale = np.asarray(self.qstate.weight_scale[path], np.float32)
        shaped = scale if scale.ndim == 0 else scale.reshape(
            [-1 if a == channel_axis else 1 for a in range(w.ndim)])
        codes = np.rint(w * (np.float32(1) / shaped))
        if not np.array_equal((codes * shaped).astype(np.float32), w):
            raise UserError(f"ONNX export: kernel {path} is not on its quantization grid (codes"
                            " times scale); export the variant as its recipe made it")
        kind = ml_dtypes.int4 if self.qstate.config.weight_bits <= 4 else np.int8
        return codes.astype(kind), scale

    def kernel(self, w, path: str, channel_axis: int) -> str:
        """The kernel as a float tensor: a DequantizeLinear of its codes when quantized."""
        quantized = None if self._dynamic_layer_kernel(path) else self.weight_codes(
            w, path, channel_axis)
        if quantized is None:
            return self.const(w, "kernel")
        codes, scale = quantized
        zero = np.zeros(scale.shape, codes.dtype)
        attrs = {} if scale.ndim == 0 else {"axis": channel_axis}
        return self.node("DequantizeLinear", [self.initializer(codes, "kernel_q"),
                                              self.initializer(scale, "kernel_scale"),
                                              self.initializer(zero, "kernel_zero")], **attrs)[0]

    def _dynamic_layer_kernel(self, path: str) -> bool:
        return (self.qstate is not None and self.qstate.config.dynamic
                and path in self.qstate.weight_scale)

    def layer(self, eqn, args, tags):
        x, w = args
        if not isinstance(x, Sym) or isinstance(w, Sym):
            raise self.fail(f"{eqn.primitive.name} of two activations")
        path = (tags[1].path or "").removeprefix("params/")
        w = np.asarray(w)
        aval = eqn.outvars[0].aval
        if eqn.primitive.name == "conv_general_dilated":
            p = eqn.params
            numbers = p["dimension_numbers"]
            if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
                raise self.fail("a transposed or batch-grouped convolution")
            w_onnx, in_layout, out_layout, channel_axis = (
                np.transpose(w, numbers.rhs_spec), numbers.lhs_spec, numbers.out_spec, 0)
            pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
            attrs = dict(strides=list(p["window_strides"]), pads=pads,
                         dilations=list(p["rhs_dilation"]), group=p["feature_group_count"])
            op, integer_op = "Conv", "ConvInteger"
        else:
            (contract_x, contract_w), (batch_x, _) = eqn.params["dimension_numbers"]
            if batch_x or tuple(contract_x) != (x.ndim - 1,) or w.ndim != 2:
                raise self.fail(f"dot_general with dimension numbers "
                                f"{eqn.params['dimension_numbers']}")
            w_onnx = w if tuple(contract_w) == (0,) else w.T
            in_layout, out_layout, channel_axis = _identity(x.ndim), _identity(x.ndim), 1
            op, integer_op, attrs = "MatMul", "MatMulInteger", {}
        x_name = self.in_layout(x, in_layout)
        out_channel = list(out_layout).index(aval.ndim - 1)
        if self._dynamic_layer_kernel(path) and eqn.primitive.name in DYNAMIC_LAYERS[
                self.qstate.config.dynamic_layers]:
            codes, scale = self.weight_codes(w_onnx, path, channel_axis)
            q, s, z = self.node("DynamicQuantizeLinear", [x_name], 3)
            acc = self.node(integer_op, [q, self.initializer(codes, "kernel_q"), z], **attrs)[0]
            out = self.node("Mul", [self.node("Cast", [acc], to=TensorProto.FLOAT)[0], s])[0]
            per_channel = scale.reshape([-1] + [1] * (aval.ndim - 1 - out_channel))
            out = self.node("Mul", [out, self.initializer(per_channel, "kernel_scale")])[0]
            return self.result(out, aval, out_layout)
        if op == "MatMul" and x.ndim == 2:
            op, attrs = "Gemm", {}
        out = self.node(op, [x_name, self.kernel(w_onnx, path, channel_axis)], **attrs)[0]
        self.layers[out] = (self.nodes[-1], self._bias_scale(tags[0], path), out_channel)
        return self.result(out, aval, out_layout)

    def _bias_scale(self, x_tag, path):
        """s_x * s_w of a QDQ layer (its bias is stored in int32 on that grid), else None."""
        if not self.static or path not in self.qstate.weight_scale or x_tag.kind != interpret.GRID:
            return None
        return (np.float32(self.qstate.activation_scale[x_tag.point])
                * np.asarray(self.qstate.weight_scale[path], np.float32)).astype(np.float32)

    def fused_bias(self, s: Sym, c: np.ndarray) -> Sym | None:
        """`s` + `c` written as the bias of the Conv / Gemm that made `s`, when `s` is such a
        layer's output read by nothing else yet and `c` varies along its channels only."""
        if s.name not in self.layers or s.name in self.used:
            return None
        node, bias_scale, out_channel = self.layers.pop(s.name)
        if bias_scale is not None and not self.integer_bias:
            return None  # a float Add after the layer: compax's float bias, no integer kernel
        channel = s.perm[out_channel]
        c = _minimal(np.asarray(c))
        if c.ndim != s.ndim or any(n != 1 for a, n in enumerate(c.shape) if a != channel):
            return None
        bias = np.broadcast_to(c.reshape(-1), (s.shape[channel],))
        if bias_scale is None:
            name = self.const(bias, "bias")
        else:
            scale = np.broadcast_to(bias_scale, bias.shape).astype(np.float32)
            codes = np.rint(bias.astype(np.float32) / scale).astype(np.int32)
            name = self.node("DequantizeLinear", [
                self.initializer(codes, "bias_q"), self.initializer(scale, "bias_scale"),
                self.initializer(np.zeros(bias.shape, np.int32), "bias_zero")], axis=0)[0]
        node.input.append(name)
        self.nodes.remove(node)  # after the nodes that make its bias; nothing read it yet
        self.nodes.append(node)
        return s

    # -- every other equation -------------------------------------------------------------------
    def enters(self, eqn, tags):
        return not (eqn.primitive.name == "custom_vjp_call" and _max_pool_window(eqn))

    def primitive(self, eqn, args, tags):
        if not any(isinstance(a, Sym) for a in args):
            return interpret.bind(eqn, args)  # weights and constants: computed now
        name = eqn.primitive.name
        self.where = str(eqn.source_info.name_stack) or self.where
        translate = TRANSLATIONS.get(name)
        if translate is None:
            raise self.fail(f"jax primitive {name!r}")
        out = translate(self, eqn, args, eqn.outvars[0].aval)
        return out if isinstance(out, list) else [out]

    def binary(self, name: str, args, aval) -> Sym:
        syms = [a for a in args if isinstance(a, Sym)]
        perm = syms[0].perm
        if name == "add" and len(syms) == 1:
            x, c = (args[0], args[1]) if isinstance(args[0], Sym) else (args[1], args[0])
            if np.ndim(c) == x.ndim and (fused := self.fused_bias(x, np.asarray(c))) is not None:
                return self.result(fused.name, aval, fused.perm)
        if name == "max" and len(syms) == 1:
            c = args[1] if isinstance(args[0], Sym) else args[0]
            if not np.any(np.asarray(c)):  # max(x, 0)
                return self.result(self.node("Relu", [syms[0].name])[0], aval, perm)
        inputs = []
        for a in args:
            if isinstance(a, Sym):
                inputs.append(self.in_layout(a, perm))
            else:
                c = np.asarray(a)
                inputs.append(self.const(np.transpose(_minimal(c), perm) if c.ndim else c))
        return self.result(self.node(_BINARY[name], inputs)[0], aval, perm)

    def reshape(self, x: Sym, aval) -> Sym:
        shape = list(aval.shape)
        if not (x.shape[0] == shape[0] == TRACE_BATCH):
            raise self.fail("a reshape that moves the batch axis")
        out = self.node("Reshape", [self.logical(x), self.ints([0] + shape[1:])])[0]
        return self.result(out, aval)

    def reduce(self, op: str, x: Sym, axes, aval) -> Sym:
        axes = tuple(axes)
        onnx_axes = [x.perm.index(a) for a in axes]
        kept = [p for p in x.perm if p not in axes]
        out = self.node(op, [x.name, self.ints(onnx_axes, "axes")], keepdims=0)[0]
        order = sorted(kept)
        return self.result(out, aval, tuple(order.index(p) for p in kept))

    def max_pool(self, x: Sym, window: int, aval) -> Sym:
        layout = (0, 3, 1, 2)
        out = self.node("MaxPool", [self.in_layout(x, layout)], kernel_shape=[window, window],
                        strides=[window, window])[0]
        return self.result(out, aval, layout)

    def pool(self, name: str, x: Sym, params, aval) -> Sym:
        dims, strides = params["window_dimensions"], params["window_strides"]
        if x.ndim != 4 or dims[0] != 1 or dims[3] != 1 or strides[0] != 1 or strides[3] != 1 \
                or any(d != 1 for d in params["base_dilation"] + params["window_dilation"]):
            raise self.fail(f"{name} over other than the spatial axes of NHWC maps")
        layout = (0, 3, 1, 2)
        padding = params["padding"]
        attrs = dict(kernel_shape=list(dims[1:3]), strides=list(strides[1:3]),
                     pads=[padding[1][0], padding[2][0], padding[1][1], padding[2][1]])
        if name == "reduce_window_max":
            out = self.node("MaxPool", [self.in_layout(x, layout)], **attrs)[0]
        else:  # a sum: the average over the whole window, padding included, times its size
            out = self.node("AveragePool", [self.in_layout(x, layout)], count_include_pad=1,
                            **attrs)[0]
            out = self.node("Mul", [out, self.const(np.asarray(dims[1] * dims[2], x.dtype))])[0]
        return self.result(out, aval, layout)


# jax primitive -> fn(writer, eqn, args, aval) -> Sym (or a list of them): the ONNX nodes of an
# equation with an activation among its `args` (the others are arrays), `aval` its first output.
TRANSLATIONS = {}


def register_translation(*names: str):
    """Decorator: `fn(writer, eqn, args, aval)` translates the jax primitives `names` (a new
    operator is one function here, or in any module imported before exporting)."""
    def register(fn):
        for name in names:
            TRANSLATIONS[name] = fn
        return fn
    return register


@register_translation("custom_vjp_call")
def _max_pool_call(w: _Writer, eqn, args, aval):
    return w.max_pool(args[0], _max_pool_window(eqn), aval)


@register_translation(*_BINARY)
def _binary(w: _Writer, eqn, args, aval):
    return w.binary(eqn.primitive.name, args, aval)


@register_translation(*_UNARY, "rsqrt")
def _unary(w: _Writer, eqn, args, aval):
    (x,) = args
    name = eqn.primitive.name
    out = w.node(_UNARY.get(name, "Sqrt"), [x.name])[0]
    if name == "rsqrt":
        out = w.node("Reciprocal", [out])[0]
    return w.result(out, aval, x.perm)


@register_translation("integer_pow")
def _integer_pow(w: _Writer, eqn, args, aval):
    (x,) = args
    exponent = w.const(np.asarray(eqn.params["y"], np.dtype(x.dtype)))
    return w.result(w.node("Pow", [x.name, exponent])[0], aval, x.perm)


@register_translation(*_SAME)
def _same(w: _Writer, eqn, args, aval):
    return args[0]


@register_translation("convert_element_type")
def _convert(w: _Writer, eqn, args, aval):
    (x,) = args
    to = _ONNX_TYPES.get(np.dtype(eqn.params["new_dtype"]))
    if to is None:
        raise w.fail(f"a conversion to {eqn.params['new_dtype']}")
    return w.result(w.node("Cast", [x.name], to=to)[0], aval, x.perm)


@register_translation("transpose")
def _transpose(w: _Writer, eqn, args, aval):
    (x,) = args  # no node: the same tensor, its logical axes permuted
    inverse = tuple(np.argsort(eqn.params["permutation"]))
    return Sym(x.name, tuple(aval.shape), x.dtype, tuple(inverse[p] for p in x.perm))


@register_translation("reshape", "squeeze", "broadcast_in_dim")
def _reshape(w: _Writer, eqn, args, aval):
    if eqn.primitive.name == "broadcast_in_dim" and not _unsqueezes(args[0], eqn):
        raise w.fail("broadcast_in_dim of an activation to a larger shape")
    return w.reshape(args[0], aval)


@register_translation(*_REDUCE)
def _reduce(w: _Writer, eqn, args, aval):
    return w.reduce(_REDUCE[eqn.primitive.name], args[0], eqn.params["axes"], aval)


@register_translation("concatenate")
def _concatenate(w: _Writer, eqn, args, aval):
    perm = next(a for a in args if isinstance(a, Sym)).perm
    inputs = [w.in_layout(a, perm) if isinstance(a, Sym) else
              w.const(np.transpose(np.asarray(a), perm)) for a in args]
    axis = perm.index(eqn.params["dimension"])
    return w.result(w.node("Concat", inputs, axis=axis)[0], aval, perm)


@register_translation("pad")
def _pad(w: _Writer, eqn, args, aval):
    x, value = args
    config = eqn.params["padding_config"]
    if isinstance(value, Sym) or any(interior for _, _, interior in config):
        raise w.fail("padding with an activation or interior padding")
    pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
    out = w.node("Pad", [w.logical(x), w.ints(pads, "pads"), w.const(np.asarray(value, x.dtype))])[0]
    return w.result(out, aval)


@register_translation("reduce_window_max", "reduce_window_sum")
def _pool(w: _Writer, eqn, args, aval):
    return w.pool(eqn.primitive.name, args[0], eqn.params, aval)


def _unsqueezes(x, eqn) -> bool:
    """Whether broadcast_in_dim of activation `x` only inserts axes of length 1."""
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    return all(shape[d] == n for d, n in zip(dims, x.shape, strict=True)) and all(
        n == 1 for a, n in enumerate(shape) if a not in dims)


def _max_pool_window(eqn) -> int | None:
    """k when the call `eqn` is `layers.max_pool_2x2`'s form of k x k max pooling with stride k
    over NHWC maps (a reshape to (b, h/k, k, w/k, k, c), floored, and a max over axes 2 and 4)."""
    body = eqn.params.get("call_jaxpr")
    eqns = [e for e in getattr(body, "jaxpr", body).eqns if e.primitive.name != "slice"] \
        if body is not None else []
    if [e.primitive.name for e in eqns] != ["reshape", "reduce_max"]:
        return None
    sizes, axes = eqns[0].params["new_sizes"], tuple(eqns[1].params["axes"])
    if len(sizes) != 6 or axes != (2, 4) or sizes[2] != sizes[4]:
        return None
    return int(sizes[2])


def variant_function(model, compressed):
    """fn(variables, x) that the variant computes, as `apply_compressed` (float32 logits)."""
    if compressed.qstate is not None:
        return folded_apply(model, compressed.qstate.folds)
    dtype = jnp.dtype(compressed.dtype)

    def fn(variables, x):
        return model.apply(variables, x.astype(dtype), train=False).astype(jnp.float32)
    return fn


def export_onnx(model, compressed, image_shape, mean=None, std=None,
                integer_bias: bool = True) -> onnx.ModelProto:
    """The ONNX model of one member's `compressed` variant of `model` (flax module evaluating it)
    on NHWC images of `image_shape` (H, W, C), any batch; checked by onnx.checker.

    `integer_bias`: the bias of a static-int8 layer in int32 on the grid s_x * s_w, the form
    integer kernels take (onnxruntime fuses DQ -> Conv -> Q into QLinearConv); False keeps
    compax's (PyTorch fbgemm's) float bias as an Add after the layer, the same function as compax
    up to float rounding, computed by float kernels.

    Without `mean` and `std` it takes float32 images normalised as the model was trained on; with
    them, raw uint8 images, normalised in the graph as compax does, (x / 255 - mean) / std
    (`compax.data.augment.normalize`), per channel.
    """
    if (mean is None) != (std is None):
        raise UserError("ONNX export: give both mean and std (or neither)")
    writer = _Writer(compressed, integer_bias)
    name = INPUT
    if mean is not None:
        name = writer.node("Cast", [INPUT], to=TensorProto.FLOAT)[0]
        name = writer.node("Div", [name, writer.initializer(np.float32(255.0), "pixel_max")])[0]
        name = writer.node("Sub", [name, writer.initializer(np.asarray(mean, np.float32), "mean")])[0]
        name = writer.node("Div", [name, writer.initializer(np.asarray(std, np.float32), "std")])[0]
    images = Sym(name, (TRACE_BATCH, *image_shape), np.dtype(np.float32), _identity(4))
    logits, _ = interpret.run(variant_function(model, compressed), writer,
                              compressed.variables, images)
    if not isinstance(logits, Sym):
        raise UserError("ONNX export: the model's output does not depend on its input")
    writer.node("Identity", [writer.logical(logits)], [OUTPUT])
    input_type = TensorProto.FLOAT if mean is None else TensorProto.UINT8
    graph = helper.make_graph(
        writer.nodes, "compax", [helper.make_tensor_value_info(
            INPUT, input_type, ["batch", *image_shape])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", logits.shape[1]])],
        writer.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="compax")
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return proto
