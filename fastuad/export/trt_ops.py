"""Check an ONNX graph against TensorRT's ONNX parser before anyone builds an engine.

``trt_onnx_ops.json`` pins the parser's operator table (TensorRT version, source URL and
commit inside; regenerate with :mod:`fastuad.export._pin_trt_ops`). :func:`trt_violations`
walks every node and reports, in words, each thing the parser would refuse:

- an operator the table marks unsupported or does not list, or one outside the ONNX domain;
- a data input (the node's first input) of an element type the table does not list for the op;
  DOUBLE anywhere, UINT8 inside the graph, INT8 outside Q/DQ (the table's notes);
- the restrictions the table states for the ops a fastuad graph can contain: Resize modes,
  antialias and aspect-ratio policy; TopK ``sorted=1`` and a constant ``K < 3840``; constant
  ``axes`` of Reduce*/Slice/Squeeze/Unsqueeze/Pad and ``axis`` of CumSum; pooling dilations and
  MaxPool's Indices output; LayerNormalization's extra outputs; ScatterND's ``reduction``;
  Q/DQ zero points equal to 0; Dropout's ``training_mode``; OneHot's constant ``depth``;
- an opset outside the range the parser reads.

"Constant" means an initializer, a Constant node's output, or the output of a node whose
inputs are all constant (TensorRT folds those at build time).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

__all__ = ["trt_operator_table", "trt_violations", "TRT_OPS_FILE"]

TRT_OPS_FILE = Path(__file__).with_name("trt_onnx_ops.json")

_TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE", 16: "BF16"}
_RESIZE_COORD = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
_TOPK_MAX = 3840
# Inputs that the table says must be initializers / build-time constants: op -> input index.
_CONST_INPUTS = {
    **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "Squeeze": 1,
    "Unsqueeze": 1,
    "Slice": 3,
    "Pad": 3,
    "CumSum": 1,
    "OneHot": 1,
    "TopK": 1,
    "Dropout": 2,
}
_RANDOM = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"}


@functools.lru_cache(maxsize=1)
def trt_operator_table() -> dict:
    """The pinned table: ``{"tensorrt", "source", "opset_range", "operators": {op: {...}}}``."""
    return json.loads(TRT_OPS_FILE.read_text(encoding="utf-8"))


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _constants(graph) -> tuple[set[str], dict[str, object]]:
    """Names of build-time constant tensors and the values of those we can read cheaply."""
    import onnx.numpy_helper as nh

    const: set[str] = {i.name for i in graph.initializer}
    values: dict[str, object] = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            const.update(node.output)
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = a.t
        elif node.op_type not in _RANDOM and node.input and all(i == "" or i in const for i in node.input):
            const.update(o for o in node.output if o)
    return const, {k: nh.to_array(v) for k, v in values.items()}


def _elem_types(proto) -> dict[str, int]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a help, not a requirement
        inferred = proto
    g = inferred.graph
    types = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def trt_violations(model) -> list[str]:
    """Every reason TensorRT's ONNX parser (pinned version) would refuse ``model`` (a path or ModelProto).

    An empty list means every node is in the table, with supported types and attributes.
    """
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    table = trt_operator_table()
    ops = table["operators"]
    lo, hi = table["opset_range"]
    problems: list[str] = []
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
            problems.append(f"opset {imp.version} is outside TensorRT {table['tensorrt']}'s range {lo}-{hi}")
    graph = proto.graph
    const, values = _constants(graph)
    types = _elem_types(proto)
    io_names = {v.name for v in list(graph.input) + list(graph.output)}
    for name, t in types.items():
        tname = _TYPE_NAMES.get(t, str(t))
        if tname == "DOUBLE":
            problems.append(f"tensor {name!r} is DOUBLE (TensorRT has limited DOUBLE support)")
        elif tname == "UINT8" and name not in io_names:
            problems.append(f"tensor {name!r} is UINT8 inside the graph (TensorRT takes UINT8 only as network input/output)")
    for node in graph.node:
        where = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: domain {node.domain!r} is not standard ONNX")
            continue
        spec = ops.get(node.op_type)
        if spec is None or not spec["supported"]:
            problems.append(f"{where}: {'unsupported' if spec else 'not listed'} in TensorRT {table['tensorrt']}'s ONNX parser")
            continue
        # The table's types are the op's data types: the first input's, or for ConstantOfShape
        # (whose input is a shape) the output's. "INF64" is a typo in the table for INT64.
        allowed = {"INT64" if t == "INF64" else t for t in spec["types"]}
        data = node.output[0] if node.op_type == "ConstantOfShape" else (node.input[0] if node.input else "")
        if data and data in types and allowed:
            tname = _TYPE_NAMES.get(types[data], str(types[data]))
            if tname not in allowed and not (tname == "INT8" and node.op_type == "DequantizeLinear"):
                problems.append(f"{where}: data type {tname} not among {', '.join(sorted(allowed))}")
        problems.extend(f"{where}: {p}" for p in _restrictions(node, _attrs(node), const, values))
    return problems


def _restrictions(node, attrs: dict, const: set[str], values: dict) -> list[str]:
    op, out = node.op_type, []
    idx = _CONST_INPUTS.get(op)
    if idx is not None and len(node.input) > idx and node.input[idx] and node.input[idx] not in const:
        out.append(f"input {idx} ({node.input[idx]!r}) must be a build-time constant (initializer)")
    if op == "Resize":
        coord = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
        mode = _text(attrs.get("mode", "nearest"))
        nearest = _text(attrs.get("nearest_mode", "round_prefer_floor"))
        if coord not in _RESIZE_COORD:
            out.append(f"coordinate_transformation_mode {coord!r} not in {sorted(_RESIZE_COORD)}")
        if mode not in _RESIZE_MODES:
            out.append(f"mode {mode!r} not in {sorted(_RESIZE_MODES)}")
        if mode == "nearest" and nearest not in _RESIZE_NEAREST:
            out.append(f"nearest_mode {nearest!r} not in {sorted(_RESIZE_NEAREST)}")
        if int(attrs.get("antialias", 0)):
            out.append("antialias is not supported")
        if _text(attrs.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
            out.append("keep_aspect_ratio_policy must be 'stretch'")
    elif op == "TopK":
        if int(attrs.get("sorted", 1)) != 1:
            out.append("sorted must be 1")
        k = values.get(node.input[1]) if len(node.input) > 1 else None
        if k is not None and int(k.reshape(-1)[0]) >= _TOPK_MAX:
            out.append(f"K={int(k.reshape(-1)[0])} must be less than {_TOPK_MAX}")
    elif op in ("MaxPool", "AveragePool", "LpPool"):
        if any(d != 1 for d in attrs.get("dilations", [])):
            out.append(f"dilations must be empty or all ones, got {list(attrs['dilations'])}")
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            out.append("the Indices output is unsupported")
    elif op == "LayerNormalization":
        if any(o for o in node.output[1:]):
            out.append("only the first output Y is supported")
    elif op == "ScatterND":
        if _text(attrs.get("reduction", "none")) != "none":
            out.append("reduction is not supported")
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        if len(node.input) > 2 and node.input[2]:
            zp = values.get(node.input[2])
            if zp is None:
                out.append("the zero point must be a constant")
            elif zp.any():
                out.append("the zero point must be 0 (symmetric quantization)")
    elif op == "Dropout":
        flag = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if flag is not None and bool(flag.reshape(-1)[0]):
            out.append("training_mode must be False")
    return out
