"""Export any registered model to ONNX: ``images [B,3,S,S] -> anomaly_map [B,1,S,S], score [B]``.

The model is traced with the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``:
no onnxscript needed, same behaviour on torch 2.4-2.14). While it traces,
:func:`fastuad.ops.exporting` is on, so every fused op runs its pure-PyTorch reference and
lowers to standard ONNX operators (Conv, MatMul, Resize, Softmax, TopK, Gather ...); masks and
blur indices become constants, a memory bank becomes an initializer. Nothing here knows any
particular model: it needs only the model contract (``model.config`` with ``name`` and
``image_size``; ``model(images) -> (anomaly_map, score)`` in eval mode).

The file carries what a deployment needs in ``metadata_props`` (all strings, JSON where not
plain): ``fastuad.format``, ``fastuad.version``, ``fastuad.model``, ``fastuad.config``,
``fastuad.image_size``, ``fastuad.mean``/``fastuad.std`` (the ImageNet normalisation the
images must already have), ``fastuad.class_names``, ``fastuad.precision`` and
``fastuad.batch`` (an int, or ``"dynamic"``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fastuad._version import __version__
from fastuad.errors import FastUADError
from fastuad.ops._dispatch import exporting

__all__ = [
    "ExportError",
    "FORMAT_VERSION",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "to_onnx",
    "read_metadata",
    "EXTERNAL_DATA_THRESHOLD",
]

FORMAT_VERSION = "fastuad-onnx-v1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
MIN_OPSET, MAX_OPSET = 17, 20  # 17: LayerNormalization; 20: the newest TensorRT 10's parser reads
# A protobuf cannot exceed 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


class ExportError(FastUADError, ValueError):
    """A model, checkpoint or file that cannot be exported or is not a fastuad export."""


class _Deployed(nn.Module):
    """The exported graph: float32 images in, float32 ``(anomaly_map, score)`` out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap, score = self.model(images)
        return amap.float(), score.float()


def _adaptive_avg_pool1d_matmul(x: torch.Tensor, output_size) -> torch.Tensor:
    """``F.adaptive_avg_pool1d`` as a product with a constant ``[L, out]`` averaging matrix.

    Same bins as PyTorch (``floor(i·L/out)`` to ``ceil((i+1)·L/out)``); the TorchScript
    exporter's own symbolic needs the pooled length as a static size, which a reshape with a
    dynamic batch hides (PatchCore pools its channels this way).
    """
    out = int(output_size[0] if isinstance(output_size, (tuple, list)) else output_size)
    length = int(x.shape[-1])
    pool = np.zeros((length, out), dtype=np.float32)
    for i in range(out):
        lo, hi = (i * length) // out, -((-(i + 1) * length) // out)
        pool[lo:hi, i] = 1.0 / (hi - lo)
    return x @ torch.as_tensor(pool, dtype=x.dtype, device=x.device)


# torch functions whose TorchScript symbolic cannot take what fastuad models give them, and the
# standard-operator lowering used while exporting instead.
_EXPORT_LOWERINGS = {"adaptive_avg_pool1d": _adaptive_avg_pool1d_matmul}


@contextlib.contextmanager
def _lowered_functions():
    import torch.nn.functional as F

    saved = {name: getattr(F, name) for name in _EXPORT_LOWERINGS}
    try:
        for name, fn in _EXPORT_LOWERINGS.items():
            setattr(F, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)


def _to_fp16(proto):
    """The float32 graph converted to float16 inside, float32 at its input and outputs.

    Converting the ONNX graph rather than tracing ``model.half()`` works for every model as
    it is: models that compute parts in float32 on purpose (``.float()`` on features, float32
    banks) need no half-precision variant. ONNX Runtime's converter keeps the ops it knows are
    unsafe in half (TopK, Range, CumSum, Min/Max ...) in float32 behind casts.
    """
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise ExportError(f"fp16 export converts the graph with onnxruntime's converter: pip install onnxruntime ({exc})") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = convert_float_to_float16(proto, keep_io_types=True)
    _topological_sort(proto.graph)  # the converter appends its input casts after their users
    return proto


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node follows the producers of its inputs (Kahn's order,
    stable: nodes keep their relative order where the data flow allows)."""
    produced_by = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    nodes = list(graph.node)
    deps = [{produced_by[x] for x in n.input if x in produced_by and produced_by[x] != i} for i, n in enumerate(nodes)]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    import heapq

    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ExportError("the fp16 graph has a cycle; export without --fp16")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ExportError(f"{name} must be an int {span}, got {value!r}")
    return value


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "name" not in config or "image_size" not in config:
        raise ExportError(
            "to_onnx needs a fastuad model (built by fastuad.create_model or loaded from a checkpoint): "
            f"{type(model).__name__} has no model.config with 'name' and 'image_size'"
        )
    return str(config["name"])


def resized_model(model: nn.Module, image_size: int) -> nn.Module:
    """The same model rebuilt for ``image_size`` px inputs with the same weights.

    Works for models whose state does not depend on the input size (convolutional ones); any
    other raises :class:`ExportError` naming the trained size.
    """
    from fastuad.backbones import RANDOM_WEIGHTS
    from fastuad.models import ModelError, create_model

    config = dict(model.config)
    name, trained = config.pop("name"), config.get("image_size")
    config["image_size"] = image_size
    try:
        other = create_model(name, weights=RANDOM_WEIGHTS, **config)
        other.load_state_dict(model.state_dict(), strict=True)
    except (ModelError, RuntimeError, ValueError) as exc:
        raise ExportError(
            f"model {name!r} cannot be exported at image_size={image_size}: it was built for {trained} px "
            f"and its weights do not carry over ({str(exc).splitlines()[0]}); export at {trained} or retrain"
        ) from exc
    return other.to(next(model.parameters()).device).eval()


def _metadata(model: nn.Module, image_size: int, class_names: Sequence[str] | None, precision: str, batch) -> dict[str, str]:
    from fastuad.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    config = {k: v for k, v in model.config.items()}
    config["image_size"] = image_size
    return {
        "fastuad.format": FORMAT_VERSION,
        "fastuad.version": __version__,
        "fastuad.model": str(model.config["name"]),
        "fastuad.config": json.dumps(config, sort_keys=True, default=str),
        "fastuad.image_size": str(image_size),
        "fastuad.mean": json.dumps(list(IMAGENET_MEAN)),
        "fastuad.std": json.dumps(list(IMAGENET_STD)),
        "fastuad.class_names": json.dumps(list(class_names or [])),
        "fastuad.precision": precision,
        "fastuad.batch": str(batch),
    }


@contextlib.contextmanager
def _quiet_trace():
    """The tracer warns about every Python-side shape check it freezes; those checks are the
    ops' input validation, constant for the exported shapes, so the warnings are noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(ONNX|onnx).*")
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    batch: int | None = None,
    dynamic_batch: bool = False,
    fp16: bool = False,
    image_size: int | None = None,
    opset: int = 17,
    *,
    class_names: Sequence[str] | None = None,
    external_data: bool | None = None,
    check_outputs: bool = True,
) -> Path:
    """Write ``model`` as an ONNX file at ``path`` and return the path.

    Args:
        model: a fastuad model (``model.config`` names it; eval-mode forward gives
            ``(anomaly_map [B,1,S,S], score [B])``). Exported on its current device.
        batch: the fixed batch size of the graph (default 1); not with ``dynamic_batch``.
        dynamic_batch: a symbolic batch dimension named ``batch`` instead.
        fp16: convert the graph to float16 inside (inputs and outputs stay float32).
        image_size: the input size ``S`` (default: the model's own); another size rebuilds the
            model for it when its weights do not depend on the size.
        opset: ONNX opset, 17-20.
        class_names: the classes the model was trained on, stored in the metadata.
        external_data: store the weights beside the file (``<name>.data``); default: only when
            the model is too big for one protobuf (about 2 GB, e.g. a large memory bank).
        check_outputs: run the model once first and check it follows the output contract.
    """
    name = _model_name(model)
    opset = _check_int("opset", opset, MIN_OPSET, MAX_OPSET)
    if batch is not None and dynamic_batch:
        raise ExportError("give either batch=N (a fixed batch) or dynamic_batch=True, not both")
    batch = 1 if batch is None else _check_int("batch", batch, 1)
    size = int(model.config["image_size"]) if image_size is None else _check_int("image_size", image_size, 32)
    if not isinstance(fp16, bool) or not isinstance(dynamic_batch, bool):
        raise ExportError(f"fp16 and dynamic_batch must be bools, got {fp16!r} and {dynamic_batch!r}")
    model = model.eval()
    if size != int(model.config["image_size"]):
        model = resized_model(model, size)
    device = next(iter(model.parameters()), torch.zeros(())).device
    proto = _trace(_Deployed(model).eval(), name, device, size, batch, dynamic_batch, opset, check_outputs)
    if fp16:
        proto = _to_fp16(proto)
    meta = _metadata(model, size, class_names, "fp16" if fp16 else "fp32", "dynamic" if dynamic_batch else batch)
    set_metadata(proto, meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, path, external_data)
    return path


def _trace(wrapped: nn.Module, name: str, device, size: int, batch: int, dynamic_batch: bool, opset: int, check_outputs: bool):
    """Trace ``wrapped`` into an in-memory ONNX ModelProto."""
    import onnx

    example = torch.randn(2 if dynamic_batch else batch, 3, size, size, device=device)
    if check_outputs:
        with torch.no_grad(), exporting():
            amap, score = wrapped(example)
        b = example.shape[0]
        if tuple(amap.shape) != (b, 1, size, size) or tuple(score.shape) != (b,):
            raise ExportError(
                f"model {name!r} breaks the output contract: expected anomaly_map {(b, 1, size, size)} and score {(b,)}, "
                f"got {tuple(amap.shape)} and {tuple(score.shape)}"
            )
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}} if dynamic_batch else None
    with tempfile.TemporaryDirectory(prefix="fastuad-export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), exporting(), _quiet_trace(), _lowered_functions():
            torch.onnx.export(
                wrapped,
                (example,),
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        return onnx.load(str(raw))  # loads external data the exporter may have written


def set_metadata(proto, meta: dict[str, str]) -> None:
    """Replace ``proto``'s metadata_props by ``meta``."""
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def save_model(proto, path: Path, external_data: bool | None = None) -> None:
    """Save ``proto`` at ``path``, with its tensors in ``<name>.data`` when large (or asked)."""
    import onnx

    if external_data is None:
        external_data = proto.ByteSize() > EXTERNAL_DATA_THRESHOLD if _fits_protobuf(proto) else True
    location = path.name + ".data"
    if external_data:
        (path.parent / location).unlink(missing_ok=True)
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path))


def _fits_protobuf(proto) -> bool:
    try:
        return proto.ByteSize() < 2**31
    except Exception:  # noqa: BLE001 - protobuf refuses to size messages over 2 GiB
        return False


def read_metadata(path: str | os.PathLike) -> dict:
    """The fastuad metadata of an ONNX file, parsed; :class:`ExportError` if it is not one of ours."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not an ONNX file"
        raise ExportError(f"{path} is not an ONNX file ({type(exc).__name__})") from exc
    return parse_metadata({p.key: p.value for p in proto.metadata_props}, str(path))


def parse_metadata(props: dict[str, str], where: str) -> dict:
    """Check and decode the ``fastuad.*`` properties (shared by ONNX files and engine sidecars)."""
    fmt = props.get("fastuad.format")
    if fmt is None:
        raise ExportError(f"{where} is not a fastuad export: it has no fastuad.format metadata (export it with `fastuad export`)")
    if fmt != FORMAT_VERSION:
        raise ExportError(f"{where} is a fastuad export of format {fmt!r}; this fastuad {__version__} reads {FORMAT_VERSION!r}: re-export it")
    try:
        batch = props["fastuad.batch"]
        return {
            "format": fmt,
            "version": props["fastuad.version"],
            "model": props["fastuad.model"],
            "config": json.loads(props["fastuad.config"]),
            "image_size": int(props["fastuad.image_size"]),
            "mean": json.loads(props["fastuad.mean"]),
            "std": json.loads(props["fastuad.std"]),
            "class_names": json.loads(props["fastuad.class_names"]),
            "precision": props["fastuad.precision"],
            "batch": batch if batch == "dynamic" else int(batch),
        }
    except (KeyError, ValueError) as exc:
        raise ExportError(f"{where} has damaged fastuad metadata ({type(exc).__name__}: {exc})") from exc
