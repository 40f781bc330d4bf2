"""Regenerate ``trt_onnx_ops.json`` from onnx-tensorrt's ``docs/operators.md``.

    python -m fastuad.export._pin_trt_ops operators.md --tensorrt 10.1 --commit <sha> --branch 10.1-GA

The table rows ``| Op | Y/N | types | restrictions |`` become ``{"supported", "types",
"restrictions"}``; the machine-checked rules derived from the restrictions live in
:mod:`fastuad.export.trt_ops`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def parse(text: str) -> dict:
    ops = {}
    header = next((ln for ln in text.splitlines() if "supports operators in the inclusive range" in ln), "")
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|--") or line.startswith("| Operator"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[1] not in ("Y", "N"):
            continue
        types = [t.strip() for t in cells[2].split(",") if t.strip()] if len(cells) > 2 else []
        restriction = re.sub(r"\s+", " ", cells[3]).strip() if len(cells) > 3 else ""
        ops[cells[0]] = {"supported": cells[1] == "Y", "types": types, "restrictions": restriction.replace("<br />", " ")}
    opsets = re.search(r"opset (\d+) to opset (\d+)", header)
    return {"opset_range": [int(opsets.group(1)), int(opsets.group(2))] if opsets else None, "header": header.strip(), "operators": ops}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("operators_md")
    ap.add_argument("--tensorrt", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--branch", required=True)
    ap.add_argument("--out", default=str(Path(__file__).with_name("trt_onnx_ops.json")))
    args = ap.parse_args()
    doc = parse(Path(args.operators_md).read_text(encoding="utf-8"))
    pinned = {
        "tensorrt": args.tensorrt,
        "source": f"https://github.com/onnx/onnx-tensorrt/blob/{args.commit}/docs/operators.md",
        "source_branch": args.branch,
        "source_commit": args.commit,
        "note": "Parsed verbatim from the table of docs/operators.md; the restrictions that matter for fastuad "
        "graphs are enforced by fastuad/export/trt_ops.py.",
        **doc,
    }
    Path(args.out).write_text(json.dumps(pinned, indent=1, sort_keys=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
