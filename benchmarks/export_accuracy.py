"""Accuracy of an exported model: PyTorch vs ONNX Runtime fp32 / fp16 / int8 on the demo set.

Trains the default RD4AD on the demo set (as ``fastuad demo`` does: 128 px, seed 0, 10 epochs),
exports it, quantizes it on normal training images only, and evaluates every format on the
demo test set with the same metrics code. Writes one JSON file (the figures the README quotes).

    python benchmarks/export_accuracy.py --out benchmarks/results/cpu-<date>-export-accuracy.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="rd4ad")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", type=int, default=64, help="normal training images for int8 calibration")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import fastuad
    from fastuad.data import make_demo_dataset
    from fastuad.deploy import load
    from fastuad.engine import TrainConfig, _build_dataset, evaluate, train
    from fastuad.export import calibration_images, quantize_int8, to_onnx

    work = Path(tempfile.mkdtemp(prefix="fastuad-export-acc-"))
    root = make_demo_dataset(work / "data", seed=args.seed, image_size=args.image_size)
    started = time.perf_counter()
    cfg = TrainConfig(model=args.model, dataset="mvtec", data_root=str(root), out=str(work / "ckpt"), epochs=args.epochs,
                      image_size=args.image_size, seed=args.seed, evaluate=False, progress=False, device="cpu")
    ckpt = train(cfg)["checkpoint"]
    train_s = time.perf_counter() - started
    test_set = _build_dataset("mvtec", str(root), "test", None, args.image_size)
    pt = load(ckpt)
    fp32 = to_onnx(pt.model, work / "fp32.onnx", batch=8)
    fp16 = to_onnx(pt.model, work / "fp16.onnx", batch=8, fp16=True)
    int8 = quantize_int8(fp32, work / "int8.onnx", calibration_images(root, args.image_size, limit=args.calib))
    rows = {}
    for name, predictor in (("pytorch", pt), ("onnx_fp32", load(fp32)), ("onnx_fp16", load(fp16)), ("onnx_int8", load(int8))):
        rows[name] = evaluate(predictor, test_set, "cpu", batch_size=8, progress=False)["mean"]
        print(name, {k: round(100 * v, 2) for k, v in rows[name].items()})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "what": f"{args.model} default preset on the demo set ({args.image_size} px, seed {args.seed}, {args.epochs} epochs); "
                f"int8 = ONNX Runtime static quantization calibrated on {args.calib} normal training images",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, 2-core CPU VM",
        "date": time.strftime("%Y-%m-%d"),
        "git_commit": commit,
        "versions": {"fastuad": fastuad.__version__, "torch": torch.__version__},
        "train_seconds": train_s,
        "mean_metrics": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
