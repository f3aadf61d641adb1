"""Runnable reference implementations of the Ascend custom ops used in AMCT "deploy" ONNX models.

A deploy model (the file ATC compiles) wraps every quantized layer as::

    x (fp32) -> AscendQuant(scale=1/scale_d, offset=offset_d, dst_type) -> int8
             -> Conv / ConvTranspose / Gemm / MatMul  (int8 weight initializer, int32 bias initializer) -> int32
             -> AscendDequant(<layer>.dequant.param: uint64, dtype=0) -> fp32

It cannot run in ONNX Runtime. This module provides :class:`onnx.reference.op_run.OpRun` implementations
of the three ops so the deploy model can be executed with :class:`onnx.reference.ReferenceEvaluator`
(:func:`make_reference_evaluator`), which is how the converter in :mod:`amct_torch.export.deploy` is tested.

Design decisions (documented here once; see also the module docstring of ``deploy``):

* **Domain.** AMCT builds its nodes as bare ``NodeProto`` objects without setting ``domain``
  (``construct_quant_node`` / ``construct_dequant_node`` in AMCT's ``insert_quant_pass.py`` /
  ``insert_dequant_pass.py``), i.e. the *default* ONNX domain, and ATC's ONNX parser plugins register
  them under ``ai.onnx``. :data:`ASCEND_DOMAIN` is therefore ``""``. The price is that
  ``onnx.checker`` rejects a deploy model (it knows no ``AscendQuant`` in the default domain); that is
  the case for AMCT's own deploy files too.

* **AscendQuant**: ``y = clip(round(x * scale + offset), qmin, qmax)`` stored as int8, with
  ``[qmin, qmax] = [-128, 127]`` (``dst_type="INT8"``) or ``[-8, 7]`` (``"INT4"``, still one value per
  int8 element at graph level). ``round`` is ``round_mode`` (default ``"Round"`` = round half to even,
  the rint mode the Ascend Cast uses). ``sqrt_mode`` multiplies by ``scale**2``.

* **AscendDequant**: the low 32 bits of every uint64 in ``deq_param`` are the IEEE float32 bits of
  ``deq = scale_w * scale_d``; bits [47:40] would hold ``offset_w`` (always 0 for AMCT's symmetric
  weights): the reference refuses a parameter with any bit above 31 set rather than silently ignoring it. ``y = x * deq`` (float64 product, cast to float32 for ``dtype=0`` or float16
  for ``dtype=1``), squared ``deq`` if ``sqrt_mode``, ReLU if ``relu_flag``. A ``deq_param`` of length 1
  broadcasts; a per-channel one of length C is applied along the channel axis: the reference-only
  ``axis`` attribute when present (the reference lowering in :func:`lower_for_reference` sets it from
  the producing op: 1 after Conv/ConvTranspose, -1 after Gemm/MatMul), otherwise inferred from the
  shape: axis 1 when ``x.ndim >= 3`` and ``x.shape[1] == C`` (NC... conv output), else the last axis
  when ``x.shape[-1] == C`` (Gemm/MatMul output).

* **AscendAntiQuant**: AMCT writes the *same* ``scale``/``offset`` attributes it read from the record
  (``scale = scale_d``, ``offset = offset_d``; ``MultQuantOptimizerPass.generate_quant_antiquant_node``),
  and the ONNX parser plugin stores ``-offset`` into the GE op, whose formula is ``(x + offset) * scale``.
  At the ONNX level this is ``y = (x - offset) * scale``, so ``AscendAntiQuant(AscendQuant(x))`` is the
  usual fake-quantization of ``x``. Output is float32 (float16 with the optional ``dtype=1``).

* **Integer layers in the reference.** The deploy graph keeps AMCT's shape ``AscendQuant -> Conv(int8)
  -> AscendDequant`` with no offset correction; AMCT does not compensate ``-offset_d * sum(W)`` and ATC
  folds the AscendQuant offset into the convolution's ``offset_x`` (the cube unit subtracts it before
  the multiply-accumulate, so padded positions contribute real zero). Standard ONNX ``Conv`` has no
  int8 inputs or ``offset_x``, so :func:`lower_for_reference` rewrites an *evaluation copy* of the
  model: each integer layer becomes ``Cast(q, double) - offset -> Conv/Gemm/MatMul(double weights,
  double bias) -> Cast(int32)``. float64 is exact for these integer sums (< 2**53), so the int32
  accumulator equals the hardware's. INT4-packed weights are unpacked there (a layer whose input comes
  from an ``AscendQuant(dst_type="INT4")`` carries packed weights, see ``deploy.pack_int4``). The deploy
  model itself is never changed by this.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from ._onnx_util import name_allocator, taken_names, weight_in_axis

__all__ = [
    "ASCEND_DOMAIN", "AscendQuant", "AscendDequant", "AscendAntiQuant", "ASCEND_OPS", "QRANGE",
    "make_reference_evaluator", "lower_for_reference", "deq_from_param", "unpack_int4",
]

#: Domain of AscendQuant / AscendDequant / AscendAntiQuant nodes: the default ONNX domain, as AMCT writes them.
ASCEND_DOMAIN = ""

#: Integer range of each ``dst_type``.
QRANGE = {"INT8": (-128, 127), "INT4": (-8, 7)}

#: Op types executed on integers inside a deploy model (the quantizable layer types of AMCT's ONNX path).
INTEGER_LAYER_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _as_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _round(values: np.ndarray, mode: str) -> np.ndarray:
    mode = mode.lower()
    if mode in ("round", "rint"):
        return np.rint(values)
    if mode == "floor":
        return np.floor(values)
    if mode == "ceil":
        return np.ceil(values)
    if mode == "trunc":
        return np.trunc(values)
    raise ValueError(f"AscendQuant round_mode {mode!r}: allowed Round, Floor, Ceil, Trunc")


class AscendQuant(OpRun):
    """``y(int8) = clip(round(x * scale + offset), qmin(dst_type), qmax(dst_type))``."""

    op_domain = ASCEND_DOMAIN

    def _run(self, x, scale=None, offset=0.0, dst_type="INT8", sqrt_mode=0, round_mode="Round", **_):
        if scale is None:
            raise ValueError("AscendQuant needs the 'scale' attribute")
        dst = _as_str(dst_type).upper()
        if dst not in QRANGE:
            raise ValueError(f"AscendQuant dst_type {dst!r}: allowed INT8, INT4")
        qmin, qmax = QRANGE[dst]
        s = np.float32(scale)
        if sqrt_mode:
            s = np.float32(s * s)
        v = x.astype(np.float32) * s + np.float32(offset)
        q = np.clip(_round(v, _as_str(round_mode)), qmin, qmax)
        return (q.astype(np.int8),)


def deq_from_param(param: np.ndarray) -> np.ndarray:
    """float32 dequant scales from AscendDequant's uint64 ``deq_param`` (IEEE bits in bits [31:0])."""
    p = np.asarray(param)
    if p.dtype != np.uint64:
        raise TypeError(f"deq_param must be uint64, got {p.dtype}")
    if np.any(p >> np.uint64(32)):
        raise ValueError("deq_param has bits above [31:0] set (offset_w / shift_n); the reference "
                                  "supports AMCT's symmetric weights (offset_w = 0) only")
    return (p & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)


def _channel_axis(x: np.ndarray, channels: int, axis) -> int:
    if axis is not None:
        return int(axis) % x.ndim
    if x.ndim >= 3 and x.shape[1] == channels:
        return 1
    if x.shape[-1] == channels:
        return x.ndim - 1
    raise ValueError(f"AscendDequant: deq_param of length {channels} matches no channel axis of input {x.shape}")


class AscendDequant(OpRun):
    """``y = x(int32) * deq`` with ``deq`` the float32 in the low 32 bits of each uint64 of ``deq_param``."""

    op_domain = ASCEND_DOMAIN

    def _run(self, x, deq_param, dtype=0, sqrt_mode=0, relu_flag=0, axis=None, **_):
        deq = deq_from_param(deq_param).astype(np.float64).reshape(-1)
        if sqrt_mode:
            deq = deq * deq
        xf = x.astype(np.float64)
        if deq.size == 1:
            y = xf * deq[0]
        else:
            ax = _channel_axis(x, deq.size, axis)
            if x.shape[ax] != deq.size:
                raise ValueError(f"AscendDequant: {deq.size} scales for axis {ax} of size {x.shape[ax]}")
            shape = [1] * x.ndim
            shape[ax] = deq.size
            y = xf * deq.reshape(shape)
        if relu_flag:
            y = np.maximum(y, 0.0)
        out = np.float16 if int(dtype) == 1 else np.float32
        return (y.astype(out),)


class AscendAntiQuant(OpRun):
    """``y = (x - offset) * scale``: the ONNX-level attributes are AMCT's ``scale_d`` / ``offset_d``
    (the ONNX parser negates ``offset`` into the GE op, whose formula is ``(x + offset) * scale``)."""

    op_domain = ASCEND_DOMAIN

    def _run(self, x, scale=None, offset=0.0, dst_type="INT8", sqrt_mode=0, dtype=0, **_):
        if scale is None:
            raise ValueError("AscendAntiQuant needs the 'scale' attribute")
        s = np.float32(scale)
        if sqrt_mode:
            s = np.float32(s * s)
        y = (x.astype(np.float32) - np.float32(offset)) * s
        out = np.float16 if int(dtype) == 1 else np.float32
        return (y.astype(out),)


#: The reference ops, in the order :func:`make_reference_evaluator` registers them.
ASCEND_OPS = (AscendQuant, AscendDequant, AscendAntiQuant)


def unpack_int4(packed: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of ``deploy.pack_int4``: two signed nibbles per byte along ``axis`` (low nibble = even index)."""
    p = np.moveaxis(np.asarray(packed).astype(np.int8).view(np.uint8), axis, -1)
    low = (p & 0x0F).astype(np.int16)
    high = (p >> 4).astype(np.int16)
    low = np.where(low > 7, low - 16, low)
    high = np.where(high > 7, high - 16, high)
    out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), dtype=np.int8)
    out[..., 0::2] = low
    out[..., 1::2] = high
    return np.moveaxis(out, -1, axis)


def lower_for_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """An evaluation copy of a deploy model in which integer layers run on exact float64 arithmetic.

    Every Conv / ConvTranspose / Gemm / MatMul whose weight is an integer initializer becomes
    ``Cast(x, double) [- offset] -> op(double weight, double bias) -> Cast(int32)``, where ``offset`` is the
    ``offset`` attribute of the AscendQuant producing ``x`` (0 when ``x`` comes from elsewhere), INT4-packed
    weights are unpacked, and each AscendDequant gets the reference-only ``axis`` attribute of its
    producer's channel axis. The deploy model passed in is not modified.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    fresh = name_allocator(taken_names(g))

    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    layer_axis: dict[str, int] = {}  # int32 output tensor of an integer layer -> channel axis of its output
    for node in g.node:
        if (node.domain not in ("", "ai.onnx") or node.op_type not in INTEGER_LAYER_TYPES or len(node.input) < 2
                or node.input[1] not in inits):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if not np.issubdtype(w.dtype, np.integer):
            new_nodes.append(node)
            continue
        tag = node.name or node.output[0]
        quant = producers.get(node.input[0])
        offset, dst = 0.0, "INT8"
        if quant is not None and quant.op_type == "AscendQuant":
            qattrs = {a.name: helper.get_attribute_value(a) for a in quant.attribute}
            offset = float(qattrs.get("offset", 0.0))
            dst = _as_str(qattrs.get("dst_type", "INT8")).upper()
        w = w.astype(np.int8)
        if dst == "INT4":
            w = unpack_int4(w, weight_in_axis(node, w.ndim))
        x_d = fresh(f"{tag}.ref.x_double")
        new_nodes.append(helper.make_node("Cast", [node.input[0]], [x_d], to=onnx.TensorProto.DOUBLE,
                                          name=fresh(f"{tag}.ref.cast_in")))
        if offset != 0.0:
            off = fresh(f"{tag}.ref.offset")
            new_inits.append(numpy_helper.from_array(np.array(offset, dtype=np.float64), off))
            x_c = fresh(f"{tag}.ref.x_centered")
            new_nodes.append(helper.make_node("Sub", [x_d, off], [x_c], name=fresh(f"{tag}.ref.sub_offset")))
            x_d = x_c
        w_name = fresh(f"{tag}.ref.weight")
        new_inits.append(numpy_helper.from_array(w.astype(np.float64), w_name))
        inputs = [x_d, w_name]
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in inits:
                raise ValueError(f"integer layer {tag!r}: bias {node.input[2]!r} is not an initializer")
            b_name = fresh(f"{tag}.ref.bias")
            b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            new_inits.append(numpy_helper.from_array(b, b_name))
            inputs.append(b_name)
        acc = fresh(f"{tag}.ref.acc_double")
        op = helper.make_node(node.op_type, inputs, [acc], name=node.name)
        op.attribute.extend(node.attribute)
        new_nodes.append(op)
        new_nodes.append(helper.make_node("Cast", [acc], [node.output[0]], to=onnx.TensorProto.INT32,
                                          name=fresh(f"{tag}.ref.cast_out")))
        layer_axis[node.output[0]] = 1 if node.op_type in ("Conv", "ConvTranspose") else -1

    # AscendDequant: pin the channel axis from the producing layer (through a bias Add after MatMul).
    by_output = {o: n for n in new_nodes for o in n.output}
    for node in new_nodes:
        if node.op_type != "AscendDequant" or node.domain not in ("", "ai.onnx"):
            continue
        if any(a.name == "axis" for a in node.attribute):
            continue
        src = node.input[0]
        if src not in layer_axis:
            prod = by_output.get(src)
            if prod is not None and prod.op_type == "Add":
                src = next((i for i in prod.input if i in layer_axis), src)
        if src in layer_axis:
            node.attribute.append(helper.make_attribute("axis", layer_axis[src]))

    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    # Shapes/types recorded for the rewritten tensors no longer hold in the copy.
    keep = [vi for vi in g.value_info if vi.name not in layer_axis]
    del g.value_info[:]
    g.value_info.extend(keep)
    return m


def _per_axis(param: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    p = np.asarray(param)
    if p.size == 1:
        return p.reshape(())
    axis %= len(shape)
    if block_size:
        p = np.repeat(p, block_size, axis=axis)
        p = np.take(p, np.arange(shape[axis]), axis=axis)
        return p
    new = [1] * len(shape)
    new[axis] = p.size
    return p.reshape(new)


class DequantizeLinear(OpRun):
    """Integer DequantizeLinear for every opset (10 onwards): ``(x - zero_point) * scale``.

    Registered by :func:`make_reference_evaluator` only for models whose default opset is below 19, for which
    ``onnx.reference`` ships no DequantizeLinear; the float simulation Q/DQ pairs a deploy model keeps need it.
    """

    op_domain = ""

    def _run(self, x, x_scale, x_zero_point=None, axis=1, block_size=0, output_dtype=None, **_):
        dx = x.astype(np.float32)
        if x_zero_point is not None:
            dx = dx - _per_axis(x_zero_point, x.shape, axis, block_size).astype(np.float32)
        y = dx * _per_axis(x_scale, x.shape, axis, block_size)
        out = helper.tensor_dtype_to_np_dtype(output_dtype) if output_dtype else x_scale.dtype
        return (y.astype(out),)


def make_reference_evaluator(model: onnx.ModelProto, *, lower: bool = True,
                             extra_ops: Iterable[type[OpRun]] = ()) -> ReferenceEvaluator:
    """A :class:`onnx.reference.ReferenceEvaluator` that runs an AMCT deploy model on the CPU.

    ``lower=True`` (default) evaluates :func:`lower_for_reference` of the model, so integer layers take the
    AscendQuant offset into account and accumulate exactly; ``lower=False`` evaluates the model as is
    (the standard reference ops then see int8 inputs, which only works for models without integer layers).
    """
    target = lower_for_reference(model) if lower else model
    ops: list[type[OpRun]] = [*extra_ops, *ASCEND_OPS]
    opset = next((o.version for o in target.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 19:
        ops.append(DequantizeLinear)
    return ReferenceEvaluator(target, new_ops=ops)
