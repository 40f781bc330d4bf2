"""Tuning sweep for the cosine-distance-map kernels on a GPU (not a pytest benchmark).

Times the stage-1 channel reduction for each cosmap scale over block shapes and warps, and the
stage-2 resize/combine/blur over tile shapes, so the launch heuristics in
``fastuad/ops/cosdist.py`` (``pixel_blocks``) and ``cosmap.py``
(``_stage2_tiles``) can be chosen from measurements. Usage: ``python benchmarks/sweep_cosmap.py``.
"""

from __future__ import annotations

import itertools

import torch
import triton
from triton.testing import do_bench

from fastuad.ops._launch import acc_dtype
from fastuad.ops.cosdist import _cos_fwd_kernel, cosine_distance_reference, cosine_distance_triton_forward
from fastuad.ops.cosmap import (
    EPS,
    REDUCTIONS,
    _cosmap_gather_kernel,
    _cosmap_linear_kernel,
    _linear_plan,
    _scale_meta,
    cosine_distance_map,
    cosine_distance_map_reference,
    gaussian_weights,
)

SCALES = [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
B = 32


def sweep_stage1(dtype: torch.dtype) -> None:
    print(f"stage 1 ({dtype}): scale, BLOCK_P, BLOCK_C, warps -> us, GB/s")
    for c, h, w in SCALES:
        a = torch.randn(B, c, h, w, device="cuda", dtype=dtype)
        b = torch.randn(B, c, h, w, device="cuda", dtype=dtype)
        out = torch.empty(B, h, w, device="cuda")
        ref = cosine_distance_reference(a, b)
        nbytes = 2 * a.numel() * a.element_size()
        rows = []
        for bp, bc, nw in itertools.product((32, 64, 128), (16, 32), (4, 8)):
            if bp * bc > 4096:
                continue
            grid = (triton.cdiv(h * w, bp), B, 1)

            def run():
                _cos_fwd_kernel[grid](a, b, out, out, c, h, w, c, *a.stride(), *b.stride(), EPS,
                                      SPLIT=1, WRITE_COEF=False, ACC=acc_dtype(dtype), BLOCK_C=bc, BLOCK_P=bp, num_warps=nw)

            run()
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            ms = do_bench(run, warmup=10, rep=50)
            rows.append((ms, bp, bc, nw))
        rows.sort()
        for ms, bp, bc, nw in rows[:4]:
            print(f"  ({c},{h},{w}) P={bp:<4} C={bc:<3} w={nw}: {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s")
        for split in (None, 1, 2, 4, 8, 16):
            fn = lambda: cosine_distance_triton_forward(a, b, EPS, out=out, split=split)  # noqa: E731
            fn()
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            ms = do_bench(fn, warmup=10, rep=50)
            print(f"  ({c},{h},{w}) heuristic blocks, split={split}: {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s")


def sweep_stage2_linear() -> None:
    print("stage 2 linear (out 256x256, sigma 4, sum): TY, TX, KC, warps -> us")
    fa = [torch.randn(B, c, h, w, device="cuda") for c, h, w in SCALES]
    fb = [torch.randn(B, c, h, w, device="cuda") for c, h, w in SCALES]
    size = (256, 256)
    ref = cosine_distance_map_reference(fa, fb, size, "sum", 4.0)
    dist = torch.cat([(cosine_distance_reference(a, b)).reshape(-1) for a, b in zip(fa, fb)])
    out = torch.empty(B, 1, *size, device="cuda")
    shapes = tuple(tuple(a.shape) for a in fa)
    rows = []
    # KC 16 / 8 warps: the spill-free sm_90 configuration under Triton 3.8 (compile_check).
    for ty, tx, kc, nw, prec in itertools.product((32, 64), (64, 128), (16, 32), (4, 8), ("ieee", "tf32x3")):
        lv, lh, meta, band = _linear_plan(shapes, size, 4.0, False, ty, tx, fa[0].device)
        n_ty, n_tx = triton.cdiv(size[0], ty), triton.cdiv(size[1], tx)

        def run():
            _cosmap_linear_kernel[(n_tx, n_ty, B)](dist, meta, lv, lh, band, out, size[0], size[1], n_ty, n_tx,
                                                   NUM_SCALES=3, DOT_PRECISION=prec, TY=ty, TX=tx, KC=kc, num_warps=nw)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - some shapes exceed resources; report and go on
            print(f"  TY={ty} TX={tx} KC={kc} w={nw} {prec}: failed ({type(exc).__name__})")
            continue
        err = (out - ref).abs().max().item()
        rows.append((do_bench(run, warmup=10, rep=50), ty, tx, kc, nw, prec, err))
    rows.sort()
    for ms, ty, tx, kc, nw, prec, err in rows[:8]:
        print(f"  TY={ty:<3} TX={tx:<4} KC={kc:<3} w={nw} {prec:7s}: {ms * 1e3:8.1f} us  max err {err:.1e}")


def sweep_stage2() -> None:
    print("stage 2 gather (out 256x256, sigma 4, prod): TY, TX, CH, warps -> us")
    feats = [(torch.randn(B, c, h, w, device="cuda"), torch.randn(B, c, h, w, device="cuda")) for c, h, w in SCALES]
    fa, fb = [f[0] for f in feats], [f[1] for f in feats]
    size = (256, 256)
    ref = cosine_distance_map_reference(fa, fb, size, "prod", 4.0)
    meta_i, meta_f, offsets, total = _scale_meta(tuple(tuple(a.shape) for a in fa), size, fa[0].device)
    dist = torch.cat([(cosine_distance_reference(a, b)).reshape(-1) for a, b in zip(fa, fb)])
    g = gaussian_weights(4.0, fa[0].device)
    out = torch.empty(B, 1, *size, device="cuda")
    rows = []
    for ty, tx, ch, nw, prec in itertools.product((32, 64), (32, 64), (16, 32), (4, 8), ("ieee",)):
        grid = (triton.cdiv(size[1], tx), triton.cdiv(size[0], ty), B)

        def run():
            _cosmap_gather_kernel[grid](dist, meta_i, meta_f, g, out, size[0], size[1], 16,
                                        NUM_SCALES=3, REDUCTION=REDUCTIONS.index("prod"), BLUR=True,
                                        DOT_PRECISION=prec, TY=ty, TX=tx, CH=ch, num_warps=nw)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - some shapes exceed resources; report and go on
            print(f"  TY={ty} TX={tx} CH={ch} w={nw} {prec}: failed ({type(exc).__name__})")
            continue
        err = (out - ref).abs().max().item()
        rows.append((do_bench(run, warmup=10, rep=50), ty, tx, ch, nw, prec, err))
    rows.sort()
    for ms, ty, tx, ch, nw, prec, err in rows[:8]:
        print(f"  TY={ty:<3} TX={tx:<4} CH={ch:<3} w={nw} {prec:7s}: {ms * 1e3:8.1f} us  max err {err:.1e}")


def end_to_end() -> None:
    print("end to end, out 256, sigma 4, sum (and prod):")
    for dtype, red in ((torch.float16, "sum"), (torch.float32, "sum"), (torch.float16, "prod")):
        fa = [torch.randn(B, c, h, w, device="cuda", dtype=dtype) for c, h, w in SCALES]
        fb = [torch.randn(B, c, h, w, device="cuda", dtype=dtype) for c, h, w in SCALES]
        nbytes = sum(2 * a.numel() * a.element_size() for a in fa)
        for backend in ("torch", "triton", "cuda"):
            try:
                fn = lambda: cosine_distance_map(fa, fb, 256, red, 4.0, backend=backend)  # noqa: E731
                ms = do_bench(fn, warmup=10, rep=100)
            except Exception as exc:  # noqa: BLE001
                print(f"  {dtype} {backend}: {exc}")
                continue
            print(f"  {str(dtype):14s} {red:4s} {backend:6s} {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s")


if __name__ == "__main__":
    import sys

    parts = sys.argv[1:] or ["e2e", "stage1", "linear", "gather"]
    if "e2e" in parts:
        end_to_end()
    if "stage1" in parts:
        sweep_stage1(torch.float16)
        sweep_stage1(torch.float32)
    if "linear" in parts:
        sweep_stage2_linear()
    if "gather" in parts:
        sweep_stage2()
