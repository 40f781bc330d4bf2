"""Per-pixel cosine distance between two feature maps: ``1 - cos(a[b,:,y,x], b[b,:,y,x])``.

This is the training loss of the reverse-distillation family (RD4AD, MDD-Net, DM-GRD): the
student's features are pulled towards the frozen teacher's, pixel by pixel. One module holds
the whole op: the pure-PyTorch reference, the Triton forward and backward kernels, the autograd
function, and the dispatcher behind :func:`cosine_distance`.

Kernel layout. Features are ``[B, C, H, W]`` (any strides); for NCHW the pixels of one channel
are contiguous, so a program owns a block of ``BLOCK_P`` pixels of one image and walks the
channels in chunks of ``BLOCK_C``, accumulating ``a·b``, ``|a|²`` and ``|b|²`` in float32
(float64 for float64 inputs). Every feature element is read once. The forward can also write
three per-pixel coefficients so that the backward is a single pass that reads ``a``, ``b`` once
and writes both gradients, with no second reduction.

Semantics follow ``torch.nn.functional.cosine_similarity``: norms are clamped below at ``eps``.
Where a norm is clamped the backward treats it as the constant ``eps``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastuad.ops._compile import CompileTarget, launch_target
from fastuad.ops._dispatch import HAS_TRITON, select_backend, standard_backends
from fastuad.ops._launch import acc_dtype, cdiv, gpu_tiles, interpreter_tiles, next_power_of_2, num_sms
from fastuad.ops._validate import FLOAT_DTYPES, check_positive_float, check_same, check_tensor, out_dtype

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["cosine_distance", "cosine_distance_reference", "COSINE_DISTANCE_BACKENDS"]


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def cosine_distance_reference(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 - F.cosine_similarity(a, b, dim=1, eps=eps)`` computed in float32 (float64 stays)."""
    dt = out_dtype(a.dtype)
    return 1.0 - F.cosine_similarity(a.to(dt), b.to(dt), dim=1, eps=eps)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _cos_epilogue(dot, aa, bb, eps, d_ptr, coef_ptr, out, n, pmask, WRITE_COEF: tl.constexpr, ACC: tl.constexpr):
        """From the three channel sums of a pixel block: ``1 - cos`` and the backward coefficients."""
        if ACC == tl.float64:
            na_raw = tl.sqrt(aa)
            nb_raw = tl.sqrt(bb)
        else:  # correctly rounded: plain tl.sqrt is approximate on the GPU
            na_raw = tl.sqrt_rn(aa)
            nb_raw = tl.sqrt_rn(bb)
        na = tl.maximum(na_raw, eps)
        nb = tl.maximum(nb_raw, eps)
        inv_ab = 1.0 / (na * nb)
        cos = dot * inv_ab
        tl.store(d_ptr + out, 1.0 - cos, mask=pmask)
        if WRITE_COEF:
            # d(1-cos)/da = -(b * inv_ab - cos/na² * a); the second term vanishes where na is clamped.
            coef_a = tl.where(na_raw > eps, cos / (na * na), 0.0)
            coef_b = tl.where(nb_raw > eps, cos / (nb * nb), 0.0)
            tl.store(coef_ptr + out, inv_ab, mask=pmask)
            tl.store(coef_ptr + n + out, coef_a, mask=pmask)
            tl.store(coef_ptr + 2 * n + out, coef_b, mask=pmask)

    @triton.jit
    def _cos_fwd_kernel(
        a_ptr, b_ptr, d_ptr, coef_ptr,
        C, H, W, C_PER_SPLIT,
        sa_b, sa_c, sa_h, sa_w,
        sb_b, sb_c, sb_h, sb_w,
        eps,
        SPLIT: tl.constexpr,
        WRITE_COEF: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """Channel sums for a block of pixels of one image, over one channel split.

        With ``SPLIT == 1`` it finishes the pixels (``1 - cos`` and, optionally, the backward
        coefficients). With ``SPLIT > 1`` (too few pixel blocks to fill the GPU) program
        ``(p, b, s)`` writes its three partial sums to ``d_ptr[s, 3, B*H*W]`` for
        :func:`_cos_finalize_kernel`.
        """
        pid_p = tl.program_id(0)
        bi = tl.program_id(1).to(tl.int64)
        HW = H * W
        n = tl.num_programs(1).to(tl.int64) * HW
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < HW
        h = p // W
        w = p % W
        a_pix = a_ptr + bi * sa_b + h * sa_h + w * sa_w
        b_pix = b_ptr + bi * sb_b + h * sb_h + w * sb_w
        acc_ab = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
        acc_aa = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
        acc_bb = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
        c_start = tl.program_id(2) * C_PER_SPLIT
        c_end = tl.minimum(c_start + C_PER_SPLIT, C)
        for c0 in range(c_start, c_end, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = (c < c_end)[:, None] & pmask[None, :]
            x = tl.load(a_pix[None, :] + c[:, None] * sa_c, mask=m, other=0.0).to(ACC)
            y = tl.load(b_pix[None, :] + c[:, None] * sb_c, mask=m, other=0.0).to(ACC)
            acc_ab += x * y
            acc_aa += x * x
            acc_bb += y * y
        dot = tl.sum(acc_ab, axis=0)
        aa = tl.sum(acc_aa, axis=0)
        bb = tl.sum(acc_bb, axis=0)
        out = bi * HW + p
        if SPLIT == 1:
            _cos_epilogue(dot, aa, bb, eps, d_ptr, coef_ptr, out, n, pmask, WRITE_COEF, ACC)
        else:
            part = d_ptr + tl.program_id(2).to(tl.int64) * 3 * n + out
            tl.store(part, dot, mask=pmask)
            tl.store(part + n, aa, mask=pmask)
            tl.store(part + 2 * n, bb, mask=pmask)

    @triton.jit
    def _cos_finalize_kernel(
        part_ptr, d_ptr, coef_ptr, N, eps,
        SPLIT: tl.constexpr,
        WRITE_COEF: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Sums the ``SPLIT`` partial channel sums per pixel (fixed order: deterministic), then finishes."""
        out = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        pmask = out < N
        dot = tl.zeros([BLOCK], ACC)
        aa = tl.zeros([BLOCK], ACC)
        bb = tl.zeros([BLOCK], ACC)
        for s in tl.static_range(SPLIT):
            part = part_ptr + s * 3 * N + out
            dot += tl.load(part, mask=pmask, other=0.0)
            aa += tl.load(part + N, mask=pmask, other=0.0)
            bb += tl.load(part + 2 * N, mask=pmask, other=0.0)
        _cos_epilogue(dot, aa, bb, eps, d_ptr, coef_ptr, out, N, pmask, WRITE_COEF, ACC)

    @triton.jit
    def _cos_bwd_kernel(
        a_ptr, b_ptr, g_ptr, coef_ptr, ga_ptr, gb_ptr,
        C, H, W,
        sa_b, sa_c, sa_h, sa_w,
        sb_b, sb_c, sb_h, sb_w,
        NEED_GA: tl.constexpr,
        NEED_GB: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """One pass over the channels: reads a, b once, writes contiguous grad_a, grad_b."""
        pid_p = tl.program_id(0)
        bi = tl.program_id(1).to(tl.int64)
        HW = H * W
        n = tl.num_programs(1).to(tl.int64) * HW
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < HW
        h = p // W
        w = p % W
        pix = bi * HW + p
        g = tl.load(g_ptr + pix, mask=pmask, other=0.0).to(ACC)
        inv_ab = tl.load(coef_ptr + pix, mask=pmask, other=0.0)
        coef_a = tl.load(coef_ptr + n + pix, mask=pmask, other=0.0)
        coef_b = tl.load(coef_ptr + 2 * n + pix, mask=pmask, other=0.0)
        a_pix = a_ptr + bi * sa_b + h * sa_h + w * sa_w
        b_pix = b_ptr + bi * sb_b + h * sb_h + w * sb_w
        out_pix = bi * C * HW + p
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = (c < C)[:, None] & pmask[None, :]
            x = tl.load(a_pix[None, :] + c[:, None] * sa_c, mask=m, other=0.0).to(ACC)
            y = tl.load(b_pix[None, :] + c[:, None] * sb_c, mask=m, other=0.0).to(ACC)
            o = out_pix[None, :] + c[:, None] * HW
            if NEED_GA:
                ga = -g[None, :] * (y * inv_ab[None, :] - coef_a[None, :] * x)
                tl.store(ga_ptr + o, ga.to(ga_ptr.dtype.element_ty), mask=m)
            if NEED_GB:
                gb = -g[None, :] * (x * inv_ab[None, :] - coef_b[None, :] * y)
                tl.store(gb_ptr + o, gb.to(gb_ptr.dtype.element_ty), mask=m)



def pixel_blocks(num_images: int, hw: int, channels: int, device: torch.device, sms: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for a per-pixel channel reduction.

    Chosen from an H100 sweep (``benchmarks/sweep_cosmap.py``) over the cosmap scales: 32-pixel
    rows win at every size; grids of many programs want short channel chunks and 4 warps,
    grids of a few programs per multiprocessor want 32-channel chunks, and 8 warps when the
    grid has fewer than four programs per multiprocessor. The interpreter wants few, large blocks
    (unless :func:`fastuad.ops._launch.gpu_tiles` is active). ``sms`` overrides the device's
    multiprocessor count (the compile check plans for a GPU it does not have).
    """
    if interpreter_tiles():
        return 64, 16, 4
    block_p = min(32, next_power_of_2(hw))
    programs = num_images * cdiv(hw, block_p)
    sms = num_sms(device) if sms is None else sms
    block_c, warps = (16, 4) if programs >= 16 * sms else (32, 4) if programs >= 4 * sms else (32, 8)
    return block_p, min(block_c, next_power_of_2(channels)), warps


def channel_splits(programs: int, channels: int, block_c: int, device: torch.device, sms: int | None = None) -> int:
    """How many programs share one pixel block's channels, for grids far too small for the GPU.

    On the H100 sweep splitting never paid for grids of two or more programs per multiprocessor
    (the extra partial-sum traffic and launch cost more than the parallelism gains), so it is
    kept for grids under half a program per multiprocessor (one image, a small map). Each split
    keeps at least four channel chunks; at most 16 splits. Under the interpreter the split path
    is taken whenever there are enough channels, so the CPU tests cover it.
    """
    if interpreter_tiles():
        return 2 if channels >= 8 * block_c else 1
    sms = num_sms(device) if sms is None else sms
    if 2 * programs >= sms:
        return 1
    return max(1, min(16, cdiv(sms, programs), channels // (4 * block_c)))


def finalize_block() -> int:
    """Pixels per program of :func:`_cos_finalize_kernel`."""
    return 256 if interpreter_tiles() else 1024


def _forward_plan(B: int, C: int, H: int, W: int, device: torch.device, split: int | None, sms: int | None = None):
    """(BLOCK_P, BLOCK_C, warps, pixel blocks, channels per split, splits) of one forward launch."""
    block_p, block_c, warps = pixel_blocks(B, H * W, C, device, sms)
    n_pblocks = cdiv(H * W, block_p)
    if split is None:
        split = channel_splits(n_pblocks * B, C, block_c, device, sms)
    c_per_split = cdiv(cdiv(C, split), block_c) * block_c
    return block_p, block_c, warps, n_pblocks, c_per_split, cdiv(C, c_per_split)


def cosine_distance_triton_forward(
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    with_coef: bool = False,
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel(s). ``out`` (a ``[B, H, W]`` view) lets callers write into a slice.

    ``split`` forces the number of channel splits (default: :func:`channel_splits`).
    """
    B, C, H, W = a.shape
    dt = out_dtype(a.dtype)
    if out is None:
        out = torch.empty((B, H, W), device=a.device, dtype=dt)
    coef = torch.empty((3, B, H, W), device=a.device, dtype=dt) if with_coef else out
    block_p, block_c, warps, n_pblocks, c_per_split, split = _forward_plan(B, C, H, W, a.device, split)
    acc = acc_dtype(a.dtype)
    part = out if split == 1 else torch.empty((split, 3, B * H * W), device=a.device, dtype=dt)
    _cos_fwd_kernel[(n_pblocks, B, split)](
        a, b, part, coef, C, H, W, c_per_split, *a.stride(), *b.stride(), eps,
        SPLIT=split, WRITE_COEF=with_coef, ACC=acc, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps,
    )
    if split > 1:
        n = B * H * W
        block = finalize_block()
        _cos_finalize_kernel[(cdiv(n, block),)](
            part, out, coef, n, eps, SPLIT=split, WRITE_COEF=with_coef, ACC=acc, BLOCK=block, num_warps=4
        )
    return out, (coef if with_coef else None)


def cosine_distance_triton_backward(
    a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor, coef: torch.Tensor, need_a: bool, need_b: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    B, C, H, W = a.shape
    grad = grad.contiguous()
    ga = torch.empty((B, C, H, W), device=a.device, dtype=a.dtype) if need_a else None
    gb = torch.empty((B, C, H, W), device=b.device, dtype=b.dtype) if need_b else None
    block_p, block_c, warps = pixel_blocks(B, H * W, C, a.device)
    grid = (cdiv(H * W, block_p), B)
    _cos_bwd_kernel[grid](
        a, b, grad, coef, ga if need_a else grad, gb if need_b else grad, C, H, W, *a.stride(), *b.stride(),
        NEED_GA=need_a, NEED_GB=need_b, ACC=acc_dtype(a.dtype), BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps,
    )
    return ga, gb


class _CosineDistanceTriton(torch.autograd.Function):
    """Autograd wrapper: the forward saves three per-pixel coefficients for a one-pass backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        d, coef = cosine_distance_triton_forward(a, b, eps, with_coef=need_grad)
        if need_grad:
            ctx.save_for_backward(a, b, coef)
        return d

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b, coef = ctx.saved_tensors
        ga, gb = cosine_distance_triton_backward(a, b, grad, coef, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return ga, gb, None


# --------------------------------------------------------------------------------------------
# Launch configurations for the ahead-of-time compile check (fastuad.ops.compile_check)
# --------------------------------------------------------------------------------------------

# Multiprocessor counts the grid-size rules are planned for: H100 SXM and A100.
PLANNED_SMS = (132, 108)
# DESIGN.md's cosdist benchmark (fwd+bwd), B=32.
COSDIST_WORKLOAD = (32, ((1024, 16, 16), (256, 64, 64)))
# RD4AD's default model: EfficientNet-Lite0 levels at 256 px (training batches of 8 and 32).
RD4AD_LEVELS = ((24, 64, 64), (40, 32, 32), (112, 16, 16))
TARGET_DTYPES = (torch.float16, torch.float32)
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _strides(B: int, C: int, H: int, W: int) -> dict[str, int]:
    return dict(zip(("b", "c", "h", "w"), (C * H * W, H * W, W, 1)))


def forward_targets(
    B: int, C: int, H: int, W: int, dtype: torch.dtype, *, with_coef: bool, workload: str, hot: bool, sms: int
) -> list[CompileTarget]:
    """The kernel launches of :func:`cosine_distance_triton_forward` on contiguous NCHW inputs."""
    with gpu_tiles():
        block_p, block_c, warps, _, c_per_split, split = _forward_plan(B, C, H, W, torch.device("cuda"), None, sms)
        fin_block = finalize_block()
    st = _strides(B, C, H, W)
    args = dict(
        a_ptr=_PTR[dtype], b_ptr=_PTR[dtype], d_ptr="*fp32", coef_ptr="*fp32", C=C, H=H, W=W, C_PER_SPLIT=c_per_split,
        **{f"sa_{k}": v for k, v in st.items()}, **{f"sb_{k}": v for k, v in st.items()}, eps=1e-8,
    )
    acc = acc_dtype(dtype)
    name = _dtype_name(dtype)
    cfg = f"{name} P{block_p} C{block_c} split{split}{' coef' if with_coef else ''} w{warps}"
    targets = [
        launch_target(
            _cos_fwd_kernel, args,
            dict(SPLIT=split, WRITE_COEF=with_coef, ACC=acc, BLOCK_C=block_c, BLOCK_P=block_p),
            num_warps=warps, config=cfg, workload=workload, hot=hot,
        )
    ]
    if split > 1:
        targets.append(
            launch_target(
                _cos_finalize_kernel, dict(part_ptr="*fp32", d_ptr="*fp32", coef_ptr="*fp32", N=B * H * W, eps=1e-8),
                dict(SPLIT=split, WRITE_COEF=with_coef, ACC=acc, BLOCK=fin_block),
                num_warps=4, config=f"fp32 partials split{split} BLOCK{fin_block}{' coef' if with_coef else ''} w4",
                workload=workload, hot=hot,
            )
        )
    return targets


def backward_targets(
    B: int, C: int, H: int, W: int, dtype: torch.dtype, *, need_a: bool, need_b: bool, workload: str, hot: bool, sms: int
) -> list[CompileTarget]:
    """The launch of :func:`cosine_distance_triton_backward` on contiguous NCHW inputs."""
    with gpu_tiles():
        block_p, block_c, warps = pixel_blocks(B, H * W, C, torch.device("cuda"), sms)
    st = _strides(B, C, H, W)
    args = dict(
        a_ptr=_PTR[dtype], b_ptr=_PTR[dtype], g_ptr="*fp32", coef_ptr="*fp32",
        ga_ptr=_PTR[dtype] if need_a else "*fp32", gb_ptr=_PTR[dtype] if need_b else "*fp32", C=C, H=H, W=W,
        **{f"sa_{k}": v for k, v in st.items()}, **{f"sb_{k}": v for k, v in st.items()},
    )
    grads = "+".join(n for n, need in (("ga", need_a), ("gb", need_b)) if need)
    return [
        launch_target(
            _cos_bwd_kernel, args,
            dict(NEED_GA=need_a, NEED_GB=need_b, ACC=acc_dtype(dtype), BLOCK_C=block_c, BLOCK_P=block_p),
            num_warps=warps, config=f"{_dtype_name(dtype)} P{block_p} C{block_c} {grads} w{warps}",
            workload=workload, hot=hot,
        )
    ]


def compile_targets() -> list[CompileTarget]:
    """Every launch of the cosine_distance kernels for the DESIGN.md cosdist workload (hot), its
    maps for one image (channel splits) and RD4AD's training loss (only the student's gradient)
    for B=8 and 32, in fp16 and fp32, planned for the
    multiprocessor counts of :data:`PLANNED_SMS`. The cosmap workloads' forward launches are in
    :func:`fastuad.ops.cosmap.compile_targets`."""
    targets: list[CompileTarget] = []
    batch, maps = COSDIST_WORKLOAD
    for sms in PLANNED_SMS:
        for dtype in TARGET_DTYPES:
            for c, h, w in maps:
                wl = f"cosdist B{batch} C{c}x{h}x{w}"
                targets += forward_targets(batch, c, h, w, dtype, with_coef=True, workload=wl, hot=True, sms=sms)
                targets += backward_targets(batch, c, h, w, dtype, need_a=True, need_b=True, workload=wl, hot=True, sms=sms)
            for c, h, w in maps:  # one image: the channel-split forward and its finalize kernel
                wl = f"cosdist B1 C{c}x{h}x{w}"
                targets += forward_targets(1, c, h, w, dtype, with_coef=True, workload=wl, hot=False, sms=sms)
                targets += backward_targets(1, c, h, w, dtype, need_a=True, need_b=True, workload=wl, hot=False, sms=sms)
            for b in (8, 32):
                for c, h, w in RD4AD_LEVELS:
                    wl = f"rd4ad loss B{b} C{c}x{h}x{w}"
                    targets += forward_targets(b, c, h, w, dtype, with_coef=True, workload=wl, hot=False, sms=sms)
                    targets += backward_targets(b, c, h, w, dtype, need_a=False, need_b=True, workload=wl, hot=False, sms=sms)
    return targets


COSINE_DISTANCE_BACKENDS = standard_backends(cosine_distance_reference, _CosineDistanceTriton.apply)


def cosine_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8, backend: str = "auto") -> torch.Tensor:
    """Cosine distance over channels, ``1 - F.cosine_similarity(a, b, dim=1, eps=eps)``.

    Args:
        a, b: feature maps ``[B, C, H, W]`` of the same shape, dtype (float16, bfloat16, float32
            or float64) and device. Any strides.
        eps: lower clamp of each vector norm, as in ``F.cosine_similarity``.
        backend: ``"auto"``, ``"torch"`` (reference) or ``"triton"``.

    Returns:
        ``[B, H, W]`` float32 (float64 for float64 inputs), differentiable in ``a`` and ``b``.
    """
    check_tensor("a", a, 4, "[B, C, H, W]")
    check_tensor("b", b, 4, "[B, C, H, W]")
    check_same("a", a, "b", b)
    eps = check_positive_float("eps", eps)
    impl = select_backend("cosine_distance", backend, COSINE_DISTANCE_BACKENDS, (a, b))
    return impl.fn(a, b, eps)
