"""The GPU launch configurations of knn, memory_read and local_attention, checked under the
interpreter: ``gpu_tiles()`` makes each launcher choose the tiles, warps and stages it picks on
a GPU (the ones the AOT compile check builds), on problems small enough for the interpreter but
spanning several of those tiles where it matters. ``gpu_tiles(arch=80)`` picks an A100's
(sm_8x) configuration instead of sm_90's, where knn and local_attention differ."""

import pytest
import torch

from conftest import TRITON_DEVICE
from fastuad.ops import knn, knn_reference, local_attention, local_attention_reference, memory_read, memory_read_reference
from fastuad.ops._launch import gpu_tiles, interpreter_tiles, launch_arch
from fastuad.ops.knn_search import knn_config
from fastuad.ops.local_attn import attention_blocks
from fastuad.ops.memory import memread_blocks


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(TRITON_DEVICE, dtype)


def test_gpu_tiles_switches_every_heuristic():
    assert knn_config(9, 1536, torch.float16, gpu=True).block_n == 64
    with gpu_tiles():
        assert not interpreter_tiles()
        assert knn_config(9, 1536, torch.float16) == knn_config(9, 1536, torch.float16, gpu=True)
        assert memread_blocks(256, torch.float32) == memread_blocks(256, torch.float32, gpu=True)
        assert attention_blocks(torch.float16, 32) == attention_blocks(torch.float16, 32, gpu=True)
        for kernel in ("fwd", "dq", "dkv"):
            assert attention_blocks(torch.float32, 32, kernel=kernel) == attention_blocks(torch.float32, 32, gpu=True, kernel=kernel)


def test_attention_blocks_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="kernel must be one of"):
        attention_blocks(torch.float32, 32, kernel="bwd")


def test_tiles_per_architecture():
    """None and sm_90 (and newer) get the sm_90 tiles, unchanged; sm_80/86/89 the sm_8x ones."""
    sm90_knn = {torch.float16: (64, 64, 64, 4, 2), torch.float32: (64, 64, 32, 4, 2)}
    sm8x_knn = {torch.float16: (64, 64, 64, 8, 2), torch.float32: (64, 64, 16, 4, 2)}
    sm90_attn = {
        torch.float16: {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkv": (64, 64, 4, 2)},
        torch.float32: {"fwd": (64, 32, 4, 2), "dq": (64, 32, 4, 2), "dkv": (16, 64, 8, 2)},
    }
    sm8x_attn = {
        torch.float16: {"fwd": (64, 64, 8, 2), "dq": (64, 64, 8, 2), "dkv": (64, 64, 8, 2)},
        torch.float32: {"fwd": (64, 32, 8, 2), "dq": (16, 32, 8, 2), "dkv": (16, 16, 4, 2)},
    }
    for arch, want_knn, want_attn in ((None, sm90_knn, sm90_attn), (90, sm90_knn, sm90_attn), (100, sm90_knn, sm90_attn),
                                      (80, sm8x_knn, sm8x_attn), (86, sm8x_knn, sm8x_attn), (89, sm8x_knn, sm8x_attn)):
        for dtype in (torch.float16, torch.float32):
            for k in (1, 9):
                cfg = knn_config(k, 1536, dtype, gpu=True, arch=arch)
                assert (cfg.block_n, cfg.block_m, cfg.block_d, cfg.num_warps, cfg.num_stages) == want_knn[dtype], (arch, dtype, k)
            assert knn_config(64, 1536, dtype, gpu=True, arch=arch).num_warps == 8
            for kernel, blocks in want_attn[dtype].items():
                assert attention_blocks(dtype, 32, gpu=True, kernel=kernel, arch=arch) == blocks, (arch, dtype, kernel)
        assert knn_config(9, 1536, torch.bfloat16, gpu=True, arch=arch) == knn_config(9, 1536, torch.float16, gpu=True, arch=arch)
        assert attention_blocks(torch.float64, 32, gpu=True, arch=arch) == (16, 16, 4, 1)
    # The interpreter's tiles do not depend on the architecture.
    assert knn_config(9, 80, torch.float32, gpu=False, arch=80) == knn_config(9, 80, torch.float32, gpu=False)
    assert attention_blocks(torch.float32, 32, gpu=False, kernel="dkv", arch=80) == (16, 16, 4, 1)


def test_launch_arch_follows_the_device_and_gpu_tiles(monkeypatch):
    """The launchers hand ``launch_arch(device)`` to the heuristics: None for CPU tensors (sm_90's
    tiles), the ``gpu_tiles(arch=)`` of the enclosing block, kept by a nested block without one."""
    from fastuad.ops import knn_search, local_attn

    cpu = torch.device("cpu")
    assert launch_arch(cpu) is None
    seen = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            seen.append(kwargs.get("arch"))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(knn_search, "knn_config", spy(knn_search.knn_config))
    monkeypatch.setattr(local_attn, "attention_blocks", spy(local_attn.attention_blocks))
    q = _randn(5, 16)
    x = _randn(1, 4, 4, 1, 16)
    with gpu_tiles():
        assert launch_arch(cpu) is None
        knn(q, q, 1, backend="triton")
        with gpu_tiles(arch=80):
            assert launch_arch(cpu) == 80
            knn(q, q, 1, backend="triton")
            with gpu_tiles():
                assert launch_arch(cpu) == 80
                local_attention(x, x, x, 3, backend="triton")
        assert launch_arch(cpu) is None
    assert launch_arch(cpu) is None
    assert seen == [None, 80, 80]


@pytest.mark.parametrize("arch", [None, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [1, 9])
def test_knn_gpu_config(k, dtype, arch):
    """Two 64-row query blocks (one partial), a bank of three 64-row tiles (one partial), D over
    two 64-wide steps (fp16) / three 32-wide steps (fp32; five 16-wide steps with sm_8x tiles)."""
    q, b = _randn(70, 80, dtype=dtype), _randn(150, 80, dtype=dtype, seed=1)
    with gpu_tiles(arch=arch):
        dist, index = knn(q, b, k, backend="triton")
    ref, _ = knn_reference(q, b, k)
    torch.testing.assert_close(dist, ref, atol=2e-4, rtol=1e-5)
    named = torch.linalg.vector_norm(q.double()[:, None, :] - b.double()[index], dim=-1)
    torch.testing.assert_close(named, ref.double(), atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype,classes,dim", [
    (torch.float32, None, 200), (torch.float32, 3, 200), (torch.float16, None, 200), (torch.float16, 3, 200),
    (torch.float32, None, 300), (torch.float16, 3, 300),
])
def test_memory_read_gpu_config(dtype, classes, dim):
    """D=200: one 256-column output chunk (masked), reduced over 64 (fp16) / 32 (fp32) column
    chunks, the last partial; D=300: two output chunks, each program recomputing the logits.
    70 queries in 16-row blocks, 70 slots in 32-slot tiles; cosine, shrinkage λ = 1/M, forward
    and both gradients."""
    n, m = 70, 70
    q = _randn(n, dim, dtype=dtype).requires_grad_(True)
    shape = (m, dim) if classes is None else (classes, m, dim)
    mem = _randn(*shape, dtype=dtype, seed=1).requires_grad_(True)
    cls = None if classes is None else torch.arange(n, device=TRITON_DEVICE) % classes
    g = _randn(n, dim, seed=2)
    # a sharp softmax: few weights sit next to λ, where the shrinkage's derivative jumps
    kw = dict(similarity="cosine", temperature=0.05, shrink_threshold=1.0 / m)
    with gpu_tiles():
        out = memory_read(q, mem, cls, backend="triton", **kw)
        gq, gm = torch.autograd.grad((out * g).sum(), (q, mem))
    ref = memory_read_reference(q.double(), mem.double(), cls, **kw)
    rq, rm = torch.autograd.grad((ref * g.double()).sum(), (q, mem))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out, ref.float(), **tol)
    torch.testing.assert_close(gq.float(), rq.float(), **tol)
    torch.testing.assert_close(gm.float(), rm.float(), **tol)


@pytest.mark.parametrize("arch", [None, 80])
@pytest.mark.parametrize("mode", ["inside", "outside"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_local_attention_gpu_config(mode, dtype, arch):
    """A 16x12 grid (192 tokens: three 64-token tiles) with k, v broadcast from batch 1, window 7:
    the GPU tiles of the forward, dQ and dK/dV kernels (64x64 for fp16; 64x32, 64x32 and 16x64
    for fp32 on sm_90, 64x32, 16x32 and 16x16 on sm_8x), band and tile skipping included."""
    B, H, W, NH, d = 2, 16, 12, 2, 32
    q = _randn(B, H, W, NH, d, dtype=dtype).requires_grad_(True)
    k = _randn(1, H, W, NH, d, dtype=dtype, seed=1).requires_grad_(True)
    v = _randn(1, H, W, NH, d, dtype=dtype, seed=2).requires_grad_(True)
    g = _randn(B, H, W, NH, d, seed=3)
    with gpu_tiles(arch=arch):
        out = local_attention(q, k, v, 7, mode, backend="triton")
        grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref = local_attention_reference(q, k, v, 7, mode)
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    tol = dict(atol=2e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(out, ref, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), **tol)


def test_limits_are_dispatch_reasons():
    """Shapes past what the kernels compile for: backend="triton" names the limit, "auto" on CPU
    tensors still answers (the reference), and the reasons list the limit for "auto" on CUDA."""
    from fastuad.ops import BackendUnavailableError
    from fastuad.ops.local_attn import LOCAL_ATTENTION_BACKENDS, MAX_HEAD_DIM
    from fastuad.ops.memory import MAX_FEATURE_DIM, MEMORY_READ_BACKENDS

    q = torch.randn(4, MAX_FEATURE_DIM + 16, device=TRITON_DEVICE)
    mem = torch.randn(5, MAX_FEATURE_DIM + 16, device=TRITON_DEVICE)
    with pytest.raises(BackendUnavailableError, match=f"D <= {MAX_FEATURE_DIM}"):
        memory_read(q, mem, backend="triton")
    assert MEMORY_READ_BACKENDS["triton"].not_supported_reasons((q[:, :MAX_FEATURE_DIM], mem[:, :MAX_FEATURE_DIM])) == []
    x = torch.randn(1, 3, 3, 1, MAX_HEAD_DIM * 2, device=TRITON_DEVICE)
    with pytest.raises(BackendUnavailableError, match=f"head dims up to {MAX_HEAD_DIM}"):
        local_attention(x, x, x, 3, backend="triton")
    reasons = LOCAL_ATTENTION_BACKENDS["triton"].not_supported_reasons((x, x, x))
    assert any(str(MAX_HEAD_DIM) in r for r in reasons)
    assert LOCAL_ATTENTION_BACKENDS["triton"].not_supported_reasons((x[..., :MAX_HEAD_DIM],) * 3) == []
    assert local_attention(x.cpu(), x.cpu(), x.cpu(), 3).shape == x.shape  # auto on CPU: the reference


@pytest.mark.parametrize("module", ["knn_search", "memory", "local_attn"])
def test_compile_targets_cover_every_launched_kernel(module):
    """Every kernel the module launches (``name[grid](``) has a hot compile target, each target's
    signature types every argument, and the constexprs are the launchers' GPU choices."""
    import importlib
    import inspect
    import re

    mod = importlib.import_module(f"fastuad.ops.{module}")
    launched = set(re.findall(r"(\w+)\[\(?[^\]]*\]\(", inspect.getsource(mod)))
    launched = {n for n in launched if hasattr(getattr(mod, n, None), "arg_names")}
    targets = mod.compile_targets()
    assert launched and launched <= {t.name for t in targets if t.hot}
    for t in targets:
        assert list(t.signature) == list(t.kernel.arg_names)
        assert {n for n, ty in t.signature.items() if ty == "constexpr"} == set(t.constexprs)
        assert set(t.divisible_by_16) <= set(t.signature)
    if module == "knn_search":
        cfg = knn_config(9, 1536, torch.float32, gpu=True)
        assert any(t.hot and t.constexprs["KP"] == cfg.kp and t.constexprs["BLOCK_D"] == cfg.block_d and t.num_warps == cfg.num_warps
                   for t in targets)


@pytest.mark.parametrize("arch", [None, 90, 80])
def test_compile_targets_are_each_archs_launches(arch):
    """``compile_targets(arch)`` of knn and local_attention lists what the launchers pick on that
    GPU: every target's tiles and warps are the heuristic's for its dtype (and kernel), and the
    sm_90 list is the default's, target for target."""
    from fastuad.ops import knn_search, local_attn

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    knn_targets = knn_search.compile_targets(arch)
    assert knn_targets
    for t in knn_targets:
        dtype = dtypes[t.config.split()[0]]
        cfg = knn_config(t.constexprs["KP"], 1536, dtype, gpu=True, arch=arch)
        assert (t.constexprs["BLOCK_N"], t.constexprs["BLOCK_M"], t.num_warps, t.num_stages) == (
            cfg.block_n, cfg.block_m, cfg.num_warps, cfg.num_stages)
        assert t.constexprs["BLOCK_D"] == cfg.block_d  # every workload's D is >= 64
    roles = {"fwd": "fwd", "bwd-dq": "dq", "bwd-dkv": "dkv"}
    attn_targets = local_attn.compile_targets(arch)
    assert {t.name for t in attn_targets if t.hot} == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkv_kernel"}
    for t in attn_targets:
        label, dt = t.config.split()[:2]
        blocks = attention_blocks(dtypes[dt], 32, gpu=True, kernel=roles[label], arch=arch)
        assert (t.constexprs["BLOCK_M"], t.constexprs["BLOCK_N"], t.num_warps, t.num_stages) == blocks
    if arch == 90:
        for mod in (knn_search, local_attn):
            default = mod.compile_targets()
            assert [(t.config, t.constexprs, t.num_warps, t.num_stages, t.workload, t.hot) for t in mod.compile_targets(90)] == [
                (t.config, t.constexprs, t.num_warps, t.num_stages, t.workload, t.hot) for t in default]
