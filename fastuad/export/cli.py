"""``fastuad export``: a checkpoint to ONNX (fp32, fp16, int8) or a TensorRT engine.

Kept here so :mod:`fastuad.cli` only registers the subcommand.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    ex = sub.add_parser("export", help="export a checkpoint to ONNX or a TensorRT engine")
    ex.add_argument("--checkpoint", required=True, help="a fastuad .pt checkpoint")
    ex.add_argument("--format", required=True, choices=("onnx", "trt"), help="onnx (ONNX Runtime, any runtime) or trt (a TensorRT engine)")
    ex.add_argument("--out", required=True, help="the .onnx or .engine file to write")
    ex.add_argument("--fp16", action="store_true", help="half precision (onnx: inside the graph; trt: the FP16 builder flag)")
    ex.add_argument("--int8", action="store_true", help="INT8 calibrated on normal training images (onnx: ONNX Runtime static quantization)")
    group = ex.add_mutually_exclusive_group()
    group.add_argument("--batch", type=int, default=None, help="a fixed batch size (default 1 for onnx)")
    group.add_argument("--dynamic-batch", action="store_true", help="a symbolic batch dimension (trt: the default)")
    ex.add_argument("--image-size", type=int, default=None, help="input size S (default: the checkpoint's)")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset, 17-20 (default 17)")
    ex.add_argument("--min-batch", type=int, default=1, help="trt: smallest batch of the optimisation profile")
    ex.add_argument("--opt-batch", type=int, default=None, help="trt: the batch TensorRT tunes for (default 8)")
    ex.add_argument("--max-batch", type=int, default=None, help="trt: largest batch of the profile (default 32)")
    ex.add_argument("--workspace", type=float, default=4.0, help="trt: builder workspace limit in GiB (default 4)")
    ex.add_argument("--timing-cache", default=None, help="trt: timing cache file (default <out>.timing)")
    ex.add_argument("--calib-data", default=None, help="int8: data root of normal training images (default: the checkpoint's training set)")
    ex.add_argument("--calib-dataset", default=None, help="int8: mvtec, visa, btad or folder (default: the checkpoint's)")
    ex.add_argument("--calib-images", type=int, default=64, help="int8: number of normal images to calibrate on (default 64)")
    ex.add_argument("--device", default="cpu", help="device to trace on (default cpu)")
    ex.set_defaults(func=run)
    return ex


def _calibration(args, ckpt: dict, size: int):
    from fastuad.export import calibration_images
    from fastuad.export.onnx_export import ExportError

    train = ckpt.get("train") or {}
    root = args.calib_data or train.get("data_root")
    dataset = args.calib_dataset or train.get("dataset") or "mvtec"
    if not root:
        raise ExportError("--int8 needs normal images to calibrate on: give --calib-data ROOT (the checkpoint names no training set)")
    if not Path(root).is_dir():
        raise ExportError(f"--int8: calibration data root not found: {root} (give --calib-data ROOT)")
    classes = train.get("classes") if not args.calib_data else None
    return calibration_images(root, size, limit=args.calib_images, dataset=dataset, classes=classes)


def run(args: argparse.Namespace) -> int:
    from fastuad.engine import load_checkpoint, resolve_device
    from fastuad.export import build_engine, quantize_int8, to_onnx, trt_violations
    from fastuad.export.onnx_export import ExportError
    from fastuad.export.tensorrt import import_tensorrt

    start = time.perf_counter()
    out = Path(args.out)
    if args.format == "trt":
        import_tensorrt()  # fail first, before any work, with what to install
    elif args.int8 and args.fp16:
        raise ExportError("--int8 and --fp16 are exclusive for --format onnx (int8 starts from the fp32 graph)")
    model, ckpt = load_checkpoint(args.checkpoint, resolve_device(args.device))
    classes = list(ckpt.get("classes") or [])
    dynamic = args.dynamic_batch or (args.format == "trt" and args.batch is None)
    with tempfile.TemporaryDirectory(prefix="fastuad-export-") as tmp:
        fp32_onnx = Path(tmp) / "model.onnx" if (args.format == "trt" or args.int8) else out
        onnx_fp16 = args.fp16 and args.format == "onnx"
        to_onnx(model, fp32_onnx, batch=args.batch, dynamic_batch=dynamic, fp16=onnx_fp16, image_size=args.image_size,
                opset=args.opset, class_names=classes)
        size = args.image_size or int(ckpt["config"]["image_size"])
        calib = _calibration(args, ckpt, size) if args.int8 else None
        if args.format == "onnx" and args.int8:
            quantize_int8(fp32_onnx, out, calib)
        if args.format == "trt":
            problems = trt_violations(fp32_onnx)
            if problems:
                raise ExportError(f"the ONNX graph has {len(problems)} node(s) TensorRT cannot parse: {problems[0]}")
            build_engine(fp32_onnx, out, fp16=args.fp16, int8=args.int8, calibration=calib, min_batch=args.min_batch,
                         opt_batch=args.opt_batch, max_batch=args.max_batch, workspace_gib=args.workspace,
                         timing_cache=args.timing_cache)
    if args.format == "onnx":
        problems = trt_violations(out)
        note = "TensorRT-parsable" if not problems else f"{len(problems)} node(s) TensorRT would refuse, first: {problems[0]}"
    else:
        note = "TensorRT engine"
    print(f"wrote {out} ({ckpt['config']['name']}, {'int8' if args.int8 else 'fp16' if args.fp16 else 'fp32'}, "
          f"{'dynamic batch' if dynamic else f'batch {args.batch or 1}'}; {note}) in {time.perf_counter() - start:.1f} s")
    return 0
