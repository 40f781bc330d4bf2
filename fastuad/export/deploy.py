"""One predictor for the three deployment formats: ``fastuad.deploy.load(path, device)``.

- ``.pt``: a fastuad checkpoint, run by PyTorch with the fused ops (``cuda_graphs=True`` on a
  GPU replays one captured CUDA graph per batch shape);
- ``.onnx``: a fastuad ONNX export, run by ONNX Runtime (the CUDA provider on a GPU where the
  installed onnxruntime has it, else the CPU provider);
- ``.engine``: a TensorRT engine built by ``fastuad export --format trt`` (with its ``.json``
  sidecar), where ``tensorrt`` imports.

Every predictor has ``predict(images) -> (anomaly_map [B,1,S,S], score [B])`` (float32 torch
tensors on CPU; ``images`` normalised ``[B,3,S,S]``, a torch tensor or NumPy array),
``predict_paths(paths)`` (reads, resizes and normalises image files first), ``image_size``,
``class_names``, ``model_name``, and is callable like a model (``predictor(x)``, ``config``,
``eval()``), so :func:`fastuad.engine.predict` writes heatmaps from any of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fastuad.errors import FastUADError
from fastuad.export.onnx_export import INPUT_NAME, ExportError, parse_metadata, read_metadata

__all__ = ["load", "Predictor", "TorchPredictor", "OnnxPredictor", "TensorRTPredictor", "DeployError", "FORMATS"]

FORMATS = (".pt", ".onnx", ".engine")


class DeployError(ExportError):
    """A file or input the predictor cannot take (wrong format, size, batch)."""


class Predictor:
    """Common part: input checks, batching of image files, the model-like interface."""

    backend = "?"

    def __init__(self, meta: dict, batch: int | str, device: torch.device) -> None:
        self.meta = meta
        self.model_name: str = meta["model"]
        self.image_size: int = int(meta["image_size"])
        self.class_names: list[str] = list(meta.get("class_names") or [])
        self.batch = batch  # int: the batch the file was exported with (any B runs in chunks); "dynamic": any
        self.device = device
        self.config = {**meta.get("config", {}), "name": self.model_name, "image_size": self.image_size}

    # -- model-like interface (fastuad.engine.predict) ------------------------------------------

    def eval(self) -> "Predictor":
        return self

    def __call__(self, images: torch.Tensor):
        return self.predict(images)

    # -- inputs ---------------------------------------------------------------------------------

    def _check(self, images) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):
            raise DeployError(f"images must be a [B, 3, {self.image_size}, {self.image_size}] tensor or array, got {type(images).__name__}")
        s = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (s, s):
            raise DeployError(
                f"images must be [B, 3, {s}, {s}] (this {self.backend} model was exported for {s} px), got {list(images.shape)}"
            )
        if not images.is_floating_point():
            raise DeployError(f"images must be float (normalised with the ImageNet mean/std), got {images.dtype}")
        if images.shape[0] == 0:
            raise DeployError("images must hold at least one image, got an empty batch")
        return images

    def predict(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """``(anomaly_map [B,1,S,S], score [B])`` float32 on CPU for normalised ``images``.

        A file exported with a fixed batch runs any ``B`` in chunks of that batch (the last one
        padded with copies of its last image).
        """
        images = self._check(images)
        if not isinstance(self.batch, int) or images.shape[0] == self.batch:
            amap, score = self._run(images)
            return amap.float().cpu(), score.float().cpu()
        maps, scores, step = [], [], self.batch
        for chunk in images.split(step):
            n = chunk.shape[0]
            if n < step:
                chunk = torch.cat([chunk, chunk[-1:].expand(step - n, -1, -1, -1)])
            amap, score = self._run(chunk)
            maps.append(amap[:n].float().cpu())
            scores.append(score[:n].float().cpu())
        return torch.cat(maps), torch.cat(scores)

    def _run(self, images: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_paths(self, paths: Sequence[str | os.PathLike], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """Read, resize and normalise image files as the datasets do, then :meth:`predict` them."""
        from fastuad.engine import load_image

        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise DeployError(f"image not found: {missing[0]}")
        step = max(1, int(batch_size))
        maps, scores = [], []
        for i in range(0, len(paths), step):
            amap, score = self.predict(torch.stack([load_image(p, self.image_size)[0] for p in paths[i : i + step]]))
            maps.append(amap)
            scores.append(score)
        if not maps:
            raise DeployError("no image paths given")
        return torch.cat(maps), torch.cat(scores)


class TorchPredictor(Predictor):
    """A checkpoint run by PyTorch with the fused ops; optional CUDA graphs on a GPU."""

    backend = "PyTorch"

    def __init__(self, path: Path, device: torch.device, cuda_graphs: bool = False) -> None:
        from fastuad.engine import EngineError, load_checkpoint

        try:
            model, ckpt = load_checkpoint(path, device)
        except EngineError as exc:
            raise DeployError(str(exc)) from exc
        meta = {"model": ckpt["config"]["name"], "image_size": int(ckpt["config"]["image_size"]), "config": dict(ckpt["config"]),
                "class_names": list(ckpt.get("classes") or [])}
        super().__init__(meta, "dynamic", device)
        self.model = model
        if cuda_graphs and device.type != "cuda":
            raise DeployError(f"cuda_graphs=True needs a CUDA device, got {device}")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, tuple] = {}

    @torch.no_grad()
    def _run(self, images: torch.Tensor):
        x = images.to(self.device, torch.float32)
        if not self.cuda_graphs:
            return self.model(x)
        key = tuple(x.shape)
        if key not in self._graphs:
            static_in = x.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: autotuning and lazy init happen outside the capture
                    self.model(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.model(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out[0].clone(), static_out[1].clone()


def onnx_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxPredictor(Predictor):
    """A fastuad ONNX export run by ONNX Runtime."""

    backend = "ONNX Runtime"

    def __init__(self, path: Path, device: torch.device, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise DeployError(f"running .onnx files needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu): {exc}") from exc
        meta = read_metadata(path)
        super().__init__(meta, meta["batch"], device)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.providers = onnx_providers(device)
        self.session = ort.InferenceSession(str(path), options, providers=self.providers)

    def _run(self, images: torch.Tensor):
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        amap, score = self.session.run(None, {INPUT_NAME: x})
        return torch.from_numpy(amap), torch.from_numpy(score)


class TensorRTPredictor(Predictor):
    """A TensorRT engine (with its ``.json`` sidecar) run on the GPU."""

    backend = "TensorRT"

    def __init__(self, path: Path, device: torch.device) -> None:
        from fastuad.export.tensorrt import TRTRunner, sidecar_path

        side = sidecar_path(path)
        if not side.is_file():
            raise DeployError(f"{path} has no {side.name} beside it: not an engine built by `fastuad export --format trt`")
        try:
            info = json.loads(side.read_text(encoding="utf-8"))
            meta = parse_metadata(info["metadata"], str(side))
            profile = [int(b) for b in info["profile"]]
        except (KeyError, ValueError, TypeError) as exc:
            raise DeployError(f"{side} is not a fastuad engine sidecar ({type(exc).__name__}: {exc})") from exc
        if device.type != "cuda":
            raise DeployError(f"TensorRT engines run on a CUDA device, got device={device}")
        super().__init__(meta, "dynamic", device)
        self.profile = profile
        self.runner = TRTRunner(path, profile, str(device))

    def _run(self, images: torch.Tensor):
        return self.runner(images)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, cuda_graphs: bool = False, threads: int | None = None) -> Predictor:
    """A predictor for a ``.pt`` checkpoint, an ``.onnx`` export or a TensorRT ``.engine``.

    ``device``: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) or ``"auto"``. ``cuda_graphs``: replay
    captured CUDA graphs for ``.pt`` on a GPU. ``threads``: ONNX Runtime intra-op threads.
    """
    from fastuad.engine import resolve_device

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DeployError(f"{path}: unknown format {suffix or '(no suffix)'!r}; fastuad.deploy.load takes {', '.join(FORMATS)}")
    if not path.is_file():
        raise DeployError(f"file not found: {path}")
    try:
        device = resolve_device(device)
    except FastUADError as exc:
        raise DeployError(str(exc)) from exc
    if suffix == ".pt":
        return TorchPredictor(path, device, cuda_graphs=cuda_graphs)
    if suffix == ".onnx":
        return OnnxPredictor(path, device, threads=threads)
    return TensorRTPredictor(path, device)
