"""Loads the compiled CUDA extension ``fastuad._C`` if it was built."""

from __future__ import annotations

BUILD_HINT = (
    "the CUDA extension fastuad._C is not built; on a machine with the CUDA toolkit run "
    "`FASTUAD_BUILD_CUDA=1 pip install --no-build-isolation -e .` (TORCH_CUDA_ARCH_LIST picks the GPU arch, "
    "default 9.0 when no GPU is visible)"
)

try:
    from fastuad import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: str | None = None
except ImportError as exc:  # the common case on CPU-only machines
    _C = None
    IMPORT_ERROR = str(exc)


def cuda_ext_reasons() -> list[str]:
    """Why the ``cuda`` backend cannot run at all (empty when the extension is loaded)."""
    if _C is None:
        return [BUILD_HINT]
    return []
