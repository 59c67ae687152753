"""Which optional GPU packages are installed, found with `importlib.util.find_spec`.

Nothing is imported: the flags only say whether a package could be. `am_dtype.backend` and
`am_dtype.fp8` both read them from here, so neither has to import the other for them.
"""

from __future__ import annotations

import importlib.util

__all__ = ["HAVE_DEEP_EP", "HAVE_GMM", "HAVE_TE", "HAVE_UCCL_EP"]


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


HAVE_TE = _has("transformer_engine")
HAVE_DEEP_EP = _has("deep_ep")
HAVE_GMM = _has("grouped_gemm")
HAVE_UCCL_EP = _has("uccl") or _has("ep")
