"""`UCCLEPDispatcher` ("uccl_ep"): UCCL-EP's DeepEP-compatible `uccl.ep.Buffer`.

Shape legend: T tokens on this rank (flattened batch*seq), D model dim, K top-k, E global
experts, P EP ranks, L local experts of this EP rank (E = P * L), S rows this rank sends
(one per (token, destination rank)), V rows this rank receives, R rows being grouped by
expert (the T tokens without EP, the V received rows with it), N expert rows after grouping
(one per (row, chosen local expert)), J local expert slots per row HybridEP keeps (min(K, L)).
"""

from __future__ import annotations

from am_moe.dispatch.deepep import _DeepEPStyleDispatcher

__all__ = ["UCCLEPDispatcher"]


class UCCLEPDispatcher(_DeepEPStyleDispatcher):
    """UCCL-EP kernels ("uccl_ep"): `uccl.ep.Buffer`, DeepEP's `Buffer` API over UCCL."""

    package, backend_name = "uccl", "uccl_ep"
    install_hint = (
        "build UCCL-EP from source (https://github.com/uccl-project/uccl, its ep/ directory)"
    )
    module, buffer_class = "uccl.ep", "Buffer"
