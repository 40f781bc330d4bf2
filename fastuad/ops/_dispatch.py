"""Backend selection shared by every op: ``backend="auto" | "torch" | "triton" | "cuda"``.

Each op declares one :class:`Backend` per implementation. A backend says why it cannot run a
given call (:meth:`Backend.not_supported_reasons`); an empty list means it can. ``"auto"`` walks
the op's preference order for the inputs' device and takes the first backend with no reasons.
A backend named explicitly either runs or raises :class:`BackendUnavailableError` with its
reasons: it never falls back silently.

Two things override the backend a caller asked for, for every op at once:

- :func:`force_backend` (``with fastuad.ops.force_backend("torch"): model(x)``) runs every op
  call in the block on the named backend, e.g. the pure-PyTorch references for a baseline
  timing or a parity check; a forced backend that cannot run raises as if named explicitly.
- ONNX export (:func:`is_exporting`: ``torch.onnx.is_in_onnx_export()`` or the exporter's own
  :func:`exporting` block) always takes the ``"torch"`` reference, so the fused ops lower to
  standard ONNX operators; ops whose reference loops over chunks give a plain lowering then
  (``knn``: one matmul + TopK).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from fastuad.errors import FastUADError
from fastuad.ops._validate import FLOAT_DTYPES

BACKENDS = ("auto", "torch", "triton", "cuda")

# Read once, at import: Triton's interpreter is chosen by this variable before kernels load.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:  # Triton ships with Linux CUDA builds of torch; elsewhere the triton backend reports it.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False


class BackendUnavailableError(FastUADError, RuntimeError):
    """A backend was named explicitly but cannot run these inputs."""


@dataclass
class Backend:
    """One implementation of an op.

    ``fn`` runs the op; ``check`` returns the reasons it cannot run the given tensors (empty when
    it can). ``devices`` are the device types it accepts and ``dtypes`` the input dtypes.
    """

    name: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    check: Callable[..., list[str]] | None = None
    extra_reasons: Callable[[], list[str]] = field(default=lambda: [])

    def not_supported_reasons(self, tensors: Sequence[torch.Tensor], **kwargs) -> list[str]:
        reasons = list(self.extra_reasons())
        for t in tensors:
            if t.device.type not in self.devices:
                reasons.append(f"{self.name} runs on {'/'.join(self.devices)} tensors, got a {t.device.type} tensor")
                break
        for t in tensors:
            if t.dtype not in self.dtypes:
                names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
                reasons.append(f"{self.name} supports dtypes {names}, got {str(t.dtype).replace('torch.', '')}")
                break
        if self.check is not None:
            reasons.extend(self.check(tensors, **kwargs))
        return reasons


def triton_reasons() -> list[str]:
    """Why Triton kernels cannot run at all in this process (empty when they can)."""
    if not HAS_TRITON:
        return ["triton is not installed (pip install triton; it needs Linux)"]
    return []


def triton_devices() -> tuple[str, ...]:
    """Devices Triton kernels run on here: CUDA, plus CPU under ``TRITON_INTERPRET=1``."""
    return ("cuda", "cpu") if TRITON_INTERPRET else ("cuda",)


def triton_dtypes(base: tuple[torch.dtype, ...]) -> tuple[torch.dtype, ...]:
    """The interpreter has no bfloat16: drop it there."""
    return tuple(d for d in base if not (TRITON_INTERPRET and d == torch.bfloat16))


def standard_backends(
    reference: Callable,
    fused: Callable,
    *,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    fused_dtypes: tuple[torch.dtype, ...] | None = None,
    check: Callable[..., list[str]] | None = None,
) -> dict[str, Backend]:
    """The ``{"torch": ..., "triton": ...}`` table every op starts from.

    ``reference`` (the pure-PyTorch op, any device, ``dtypes``) and ``fused`` (the Triton
    launcher or its autograd ``Function.apply``, on :func:`triton_devices` and ``fused_dtypes``,
    default ``dtypes``, less bfloat16 under the interpreter) are called with the same arguments.
    ``check(tensors, **kwargs)`` lists what the Triton kernels cannot run beyond device and dtype.
    An op with more backends (cosmap's ``"cuda"``) adds its own entry to the returned dict.
    """
    return {
        "torch": Backend("torch", reference, devices=("cpu", "cuda"), dtypes=dtypes),
        "triton": Backend(
            "triton",
            fused,
            devices=triton_devices(),
            dtypes=triton_dtypes(dtypes if fused_dtypes is None else fused_dtypes),
            check=check,
            extra_reasons=triton_reasons,
        ),
    }


def check_backend_name(backend: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


@dataclass(frozen=True)
class OpCall:
    """One recorded op call: the op's name, the backend that ran it, its tensor inputs' shapes and dtypes."""

    op: str
    backend: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    def __str__(self) -> str:
        args = ", ".join(f"{dt}{list(sh)}" for sh, dt in zip(self.shapes, self.dtypes))
        return f"{self.op}[{self.backend}]({args})"


_TRACES: list[list[OpCall]] = []
_FORCED: list[str] = []
_EXPORTING: list[bool] = []


@contextlib.contextmanager
def force_backend(backend: str) -> Iterator[None]:
    """Run every fused-op call inside the block on ``backend``, whatever the caller asked for.

    ``with fastuad.ops.force_backend("torch"): model(images)`` times or checks a whole model on
    the pure-PyTorch references; ``"auto"`` restores the normal choice. Blocks nest (the
    innermost wins).
    """
    check_backend_name(backend)
    _FORCED.append(backend)
    try:
        yield
    finally:
        _FORCED.pop()


@contextlib.contextmanager
def exporting() -> Iterator[None]:
    """Mark the block as an export trace: every op takes its ``"torch"`` reference lowering."""
    _EXPORTING.append(True)
    try:
        yield
    finally:
        _EXPORTING.pop()


def is_exporting() -> bool:
    """True inside :func:`exporting` or while ``torch.onnx.export`` traces a model."""
    if _EXPORTING:
        return True
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except Exception:  # pragma: no cover - torch.onnx unavailable in a stripped build
        return False


@contextlib.contextmanager
def trace() -> Iterator[list[OpCall]]:
    """Record every fused-op call made inside the block, in order.

    ``with fastuad.ops.trace() as calls: model(x)`` leaves one :class:`OpCall` per call in
    ``calls`` (op name as the dispatcher knows it, backend chosen, input shapes and dtypes), so
    a user sees which kernels a model ran. Traces nest: an inner block's calls appear in the
    outer list too.
    """
    calls: list[OpCall] = []
    _TRACES.append(calls)
    try:
        yield calls
    finally:
        _TRACES.remove(calls)


def _record(op: str, impl: "Backend", tensors: Sequence[torch.Tensor]) -> None:
    if not _TRACES:
        return
    call = OpCall(
        op,
        impl.name,
        tuple(tuple(t.shape) for t in tensors),
        tuple(str(t.dtype).replace("torch.", "") for t in tensors),
    )
    for calls in _TRACES:
        calls.append(call)


def no_backend_message(op: str, backends: dict[str, Backend], order: Sequence[str], tensors, **kwargs) -> str:
    """``"<op>: no backend can run these inputs:"`` then one line per backend tried with its reasons."""
    lines = [f"{op}: no backend can run these inputs:"]
    for name in order:
        if name in backends:
            reasons = backends[name].not_supported_reasons(tensors, **kwargs) or ["(no reason given)"]
            lines.append(f"  {name}: " + "; ".join(reasons))
    return "\n".join(lines)


def select_backend(
    op: str,
    backend: str,
    backends: dict[str, Backend],
    tensors: Sequence[torch.Tensor],
    **kwargs,
) -> Backend:
    """Pick the implementation of ``op`` that runs ``tensors``.

    ``backends`` maps names to implementations; for ``"auto"`` the order of preference is
    cuda, triton, torch on CUDA tensors and torch alone on CPU tensors.
    """
    check_backend_name(backend)
    if is_exporting():
        backend = "torch"
    elif _FORCED:
        backend = _FORCED[-1]
    if backend == "auto":
        on_cuda = all(t.is_cuda for t in tensors)
        order = ("cuda", "triton", "torch") if on_cuda else ("torch",)
        for name in order:
            impl = backends.get(name)
            if impl is not None and not impl.not_supported_reasons(tensors, **kwargs):
                _record(op, impl, tensors)
                return impl
        raise BackendUnavailableError(no_backend_message(op, backends, order, tensors, **kwargs))
    impl = backends.get(backend)
    if impl is None:
        have = ", ".join(sorted(backends))
        raise BackendUnavailableError(f"{op} has no {backend!r} backend (it has: {have})")
    reasons = impl.not_supported_reasons(tensors, **kwargs)
    if reasons:
        raise BackendUnavailableError(f"{op}: backend={backend!r} cannot run these inputs: " + "; ".join(reasons))
    _record(op, impl, tensors)
    return impl

