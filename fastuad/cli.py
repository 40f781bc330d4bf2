"""The ``fastuad`` command.

``fastuad demo`` will build a small demo data set, train the default model, evaluate and write
heatmaps once the training engine lands; until then it says what it will do and checks that the
ops run on this machine. ``fastuad info`` reports versions and which op backends can run here.
"""

from __future__ import annotations

import argparse
import sys
import time

DEMO_PLAN = """\
fastuad demo - plan (the data, engine and model land with the next release):
  1. build a small MVTec-layout demo data set from real photographs, with drawn defects
  2. train RD4AD (EfficientNet-Lite0 ImageNet encoder) on all its classes at once
  3. evaluate image/pixel AUROC, AP, F1-max and AUPRO exactly
  4. write heatmap overlays and print the metric table
"""


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastuad: error: --device cuda was asked for, but no CUDA GPU is visible")
    return torch.device(name)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from fastuad.nn import CosineDistanceMap

    print(DEMO_PLAN)
    device = _device(args.device)
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    teacher = [torch.randn(2, c, h, w, generator=g).to(device) for c, h, w in shapes]
    student = [t + 0.1 * torch.randn(t.shape, generator=g).to(device) for t in teacher]
    head = CosineDistanceMap(out_size=128, reduction="sum", blur_sigma=4.0).to(device)
    start = time.perf_counter()
    with torch.inference_mode():
        amap = head(teacher, student)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - start)
    print(f"ops check on {device}: anomaly map {tuple(amap.shape)}, max score {amap.amax().item():.4f} ({ms:.1f} ms)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import fastuad
    from fastuad.ops._cuda_ext import IMPORT_ERROR
    from fastuad.ops._dispatch import HAS_TRITON, TRITON_INTERPRET

    print(f"fastuad {fastuad.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    if HAS_TRITON:
        import triton

        print(f"triton {triton.__version__}{' (interpreter)' if TRITON_INTERPRET else ''}")
    else:
        print("triton: not installed")
    print(f"CUDA extension fastuad._C: {'built' if IMPORT_ERROR is None else 'not built'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import fastuad

    parser = argparse.ArgumentParser(prog="fastuad", description="Fast multi-class unsupervised anomaly detection.")
    parser.add_argument("--version", action="version", version=f"fastuad {fastuad.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train and evaluate on a built-in demo data set")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="versions and available backends")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
