"""The ``fastuad`` command: ``train``, ``eval``, ``predict``, ``export``, ``demo`` and ``info``.

User mistakes (a missing data root, an unknown model or backbone, a checkpoint of another
model, ``--device cuda`` without a GPU, an output folder that holds another run, a full disk)
raise :class:`~fastuad.errors.FastUADError` subclasses; exactly those end with one
``fastuad: error: ...`` line and exit code 2 (``--traceback`` shows the full trace instead).
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from fastuad.errors import FastUADError

DEMO_CLASSES_NOTE = "brick, chelsea, coffee, grass, gravel (scikit-image photographs; scratch, blob and spot defects)"


class _UserError(FastUADError, ValueError):
    """Raised inside the CLI for a user mistake; printed as one ``fastuad: error:`` line."""


def _device(name: str):
    from fastuad.engine import resolve_device

    return resolve_device(name)


def _set_threads(threads: int | None, device) -> None:
    """CPU threads for torch: ``--threads`` or, by default, the cores not already busy.

    On a shared machine two OpenMP threads fighting other processes for two cores run many
    times slower than one, so the default leaves busy cores alone.
    """
    import torch

    if device.type != "cpu":
        return
    if threads is None:
        cores = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
        threads = max(1, min(cores, int(cores - busy + 0.5)))
    torch.set_num_threads(max(1, threads))


def _classes(text: str | None) -> list[str] | None:
    if not text:
        return None
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if not classes:
        raise _UserError(f"--classes must list class names separated by commas, got {text!r}")
    return classes


def _write_json(result: dict, path: str | None) -> None:
    if path:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps({"per_class": result["per_class"], "mean": result["mean"]}, indent=2))
        except OSError as exc:
            raise _UserError(f"cannot write --json file {path}: {exc.strerror or exc}") from exc
        print(f"metrics written to {path}")


def cmd_train(args: argparse.Namespace) -> int:
    from fastuad.engine import TrainConfig, format_table, train

    device = _device(args.device)
    _set_threads(args.threads, device)
    cfg = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data_root=args.data_root,
        out=args.out,
        classes=_classes(args.classes),
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        backbone=args.backbone,
        preset=args.preset,
        weights=args.weights,
        device=str(device),
        resume=args.resume,
        overwrite=args.overwrite,
        lr=args.lr,
        seed=args.seed,
        workers=args.workers,
        keep=args.keep,
        evaluate=not args.no_eval,
        progress=not args.no_progress,
        model_args=_model_args(args),
    )
    result = train(cfg)
    if result.get("rank", 0) != 0:  # torchrun: rank 0 reports for all
        return 0
    print(_trained_line(result))
    if "metrics" in result:
        print(format_table(result["metrics"]))
        _write_json(result["metrics"], args.json)
    return 0


def _model_args(args: argparse.Namespace) -> dict:
    """Model overrides: ``--model-arg KEY=VALUE`` options and the flags of their own (only those set)."""
    extra = {}
    for item in args.model_arg:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise _UserError(f"--model-arg must be KEY=VALUE with KEY a model option name, got {item!r}")
        if key in extra:
            raise _UserError(f"--model-arg {key} is given twice")
        extra[key] = _option_value(text.strip())
    if args.coreset_ratio is not None:
        if not 0 < args.coreset_ratio <= 1:
            raise _UserError(f"--coreset-ratio must lie in (0, 1], got {args.coreset_ratio}")
        if "coreset_ratio" in extra:
            raise _UserError("coreset_ratio is given both as --coreset-ratio and as --model-arg")
        extra["coreset_ratio"] = args.coreset_ratio
    return extra


def _option_value(text: str):
    """A ``--model-arg`` value read as JSON (numbers, true/false, null, lists); anything else stays a string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return tuple(value) if isinstance(value, list) else value


def _trained_line(result: dict) -> str:
    """What this run trained: after ``--resume`` only the epochs it ran, and from where."""
    n = result["epochs_run"]
    done = f"trained {n} epoch{'s' if n != 1 else ''} in {result['train_seconds']:.1f} s"
    if result.get("start_epoch"):
        done += f" (resumed after epoch {result['start_epoch']}; {result['start_epoch'] + n} of {result['epochs']} done)"
    return f"{done}; checkpoint {result['checkpoint']}"


def cmd_eval(args: argparse.Namespace) -> int:
    from fastuad.engine import _build_dataset, evaluate, format_table, load_checkpoint

    device = _device(args.device)
    _set_threads(args.threads, device)
    model, ckpt = load_checkpoint(args.checkpoint, device)
    size = int(ckpt["config"]["image_size"])
    dataset = _build_dataset(args.dataset, args.data_root, "test", _classes(args.classes), size)
    result = evaluate(model, dataset, device, args.batch_size, progress=not args.no_progress)
    print(format_table(result))
    _write_json(result, args.json)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fastuad.deploy import load
    from fastuad.engine import predict

    device = _device(args.device)
    _set_threads(args.threads, device)
    model = load(args.checkpoint, device)  # .pt, .onnx or .engine
    rows = predict(model, args.images, args.out, device, args.batch_size, progress=not args.no_progress)
    for path, score, _heatmap in rows:
        print(f"{score:10.5f}  {path}")
    print(f"{len(rows)} heatmaps and scores.csv written to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fastuad.data.demo import DEMO_DEFECTS, make_demo_dataset
    from fastuad.engine import TrainConfig, format_table, load_checkpoint, predict, train

    device = _device(args.device)
    _set_threads(args.threads, device)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fastuad-demo-"))
    start = time.perf_counter()
    print(f"fastuad demo: {DEMO_CLASSES_NOTE}; working in {work}")
    try:
        root = make_demo_dataset(work / "data", seed=args.seed, image_size=args.image_size)
    except OSError as exc:  # an --out the user cannot write to
        raise _UserError(f"cannot write the demo data set under {work}: {exc.strerror or exc}") from exc
    print(f"1/4 demo data set written to {root} ({time.perf_counter() - start:.0f} s)")
    epochs = "the recipe's" if args.epochs is None else args.epochs
    print(f"2/4 training {args.model} (efficientnet_lite0, ImageNet weights) on all classes at once, {epochs} epochs on {device}")
    cfg = TrainConfig(
        model=args.model, dataset="mvtec", data_root=str(root), out=str(work / "checkpoints"), epochs=args.epochs,
        batch_size=args.batch_size, image_size=args.image_size, device=str(device), seed=args.seed,
        progress=not args.no_progress, overwrite=True,  # the demo's own folder: a rerun replaces it
    )
    result = train(cfg)
    print(f"3/4 evaluated ({time.perf_counter() - start:.0f} s so far):")
    print(format_table(result["metrics"]))
    _write_json(result["metrics"], str(work / "metrics.json"))
    model, _ = load_checkpoint(result["checkpoint"], device)
    samples = sorted(p for cls in sorted(os.listdir(root)) if (root / cls).is_dir()
                     for kind in ("good", *DEMO_DEFECTS) for p in sorted((root / cls / "test" / kind).glob("*.png"))[:1])
    predict(model, samples, work / "heatmaps", device, progress=False)
    print(f"4/4 heatmaps of {len(samples)} test images in {work / 'heatmaps'}; total {time.perf_counter() - start:.0f} s")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import fastuad
    from fastuad.models import list_models
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
    print(f"models: {', '.join(list_models())}")
    return 0


def _common(p: argparse.ArgumentParser, batch_size: int | None = 16) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when visible)")
    help_ = "images per batch" if batch_size is not None else "images per batch, over all torchrun processes (default: the model's recipe)"
    p.add_argument("--batch-size", type=int, default=batch_size, help=help_)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores not already busy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    import fastuad
    from fastuad.backbones import DEFAULT_BACKBONE

    parser = argparse.ArgumentParser(prog="fastuad", description="Fast multi-class unsupervised anomaly detection.")
    parser.add_argument("--version", action="version", version=f"fastuad {fastuad.__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full trace of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    datasets = ("mvtec", "visa", "btad", "folder")

    train = sub.add_parser("train", help="train one model on all classes of a data set")
    train.add_argument("--model", required=True, help="a registered model (fastuad info lists them)")
    train.add_argument("--dataset", required=True, choices=datasets)
    train.add_argument("--data-root", required=True)
    train.add_argument("--classes", default=None, help="comma-separated classes (default: all under the root)")
    train.add_argument("--epochs", type=int, default=None, help="default: the model's recipe (10 for the default presets)")
    train.add_argument("--image-size", type=int, default=None, help="default: the preset's (256 for the default presets)")
    train.add_argument("--backbone", default=None, help=f"any timm name (default: the preset's, {DEFAULT_BACKBONE} for the default presets)")
    train.add_argument("--preset", default="default", help="default (EfficientNet-Lite0, sized for a CPU) or paper (the authors' set-up)")
    train.add_argument("--weights", default=None, help="local state dict for the backbone")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    train.add_argument("--overwrite", action="store_true", help="replace the checkpoints of a run already in OUT")
    train.add_argument("--out", required=True, help="directory for the checkpoints")
    train.add_argument("--lr", type=float, default=None, help="default: the model's recipe")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU)")
    train.add_argument("--keep", type=int, default=1, help="epoch_NNN.pt files kept besides last.pt")
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    train.add_argument("--json", default=None, help="write the final metrics to this JSON file")
    train.add_argument("--coreset-ratio", type=float, default=None, help="patchcore: fraction of the patch features its memory bank keeps (default 0.1)")
    train.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="a model option, e.g. hard_quantile=0.8 (rd4ad) or dd_weight=1 (mddnet); repeatable; VALUE is read "
                            "as JSON (numbers, true/false, null, lists), anything else as a string; recorded in the checkpoint")
    _common(train, batch_size=None)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a test set")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--dataset", required=True, choices=datasets)
    ev.add_argument("--data-root", required=True)
    ev.add_argument("--classes", default=None)
    ev.add_argument("--json", default=None, help="write the per-class and mean metrics to this JSON file")
    _common(ev)
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="heatmap overlays and image scores for image files")
    pr.add_argument("--checkpoint", required=True, help="a .pt checkpoint, an .onnx export or a TensorRT .engine")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--out", required=True)
    _common(pr)
    pr.set_defaults(func=cmd_predict)

    demo = sub.add_parser("demo", help="build the demo data set, train, evaluate and write heatmaps")
    demo.add_argument("--out", default=None, help="working directory (default: a new temporary one)")
    demo.add_argument("--model", default="rd4ad", help="a registered model (default: rd4ad)")
    demo.add_argument("--epochs", type=int, default=None, help="default: the model's recipe (10 for the default presets)")
    demo.add_argument("--image-size", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    _common(demo, batch_size=None)  # the model recipe's batch size unless --batch-size is given
    demo.set_defaults(func=cmd_demo)

    from fastuad.export.cli import add_parser as add_export_parser

    add_export_parser(sub)

    info = sub.add_parser("info", help="versions, backends and registered models")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastUADError as exc:
        if args.traceback:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"fastuad: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
