"""`build_dispatcher`: the dispatcher table keyed by `BackendConfig.dispatcher`.

Shape legend: T tokens on this rank (flattened batch*seq), D model dim, K top-k, E global
experts, P EP ranks, L local experts of this EP rank (E = P * L), S rows this rank sends
(one per (token, destination rank)), V rows this rank receives, R rows being grouped by
expert (the T tokens without EP, the V received rows with it), N expert rows after grouping
(one per (row, chosen local expert)), J local expert slots per row HybridEP keeps (min(K, L)).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from am_moe.dispatch.all_to_all import AllToAllDispatcher
from am_moe.dispatch.base import TokenDispatcher
from am_moe.dispatch.deepep import DeepEPDispatcher
from am_moe.dispatch.hybridep import HybridEPDispatcher
from am_moe.dispatch.local import LocalDispatcher
from am_moe.dispatch.uccl_ep import UCCLEPDispatcher

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from am_dtype.backend import BackendConfig

__all__ = ["build_dispatcher"]


def build_dispatcher(
    backend: BackendConfig, num_experts: int, ep_mesh: DeviceMesh | None = None
) -> TokenDispatcher:
    """The dispatcher named by `backend.dispatcher` for `num_experts` over `ep_mesh`.

    Without an EP mesh (or with a single EP rank) nothing moves, so every backend is the
    `LocalDispatcher`; a GPU backend asked for then warns that it falls back.
    """
    if backend.dispatcher not in _DISPATCHERS:
        raise ValueError(
            f"dispatcher={backend.dispatcher!r} is not supported; accepted: {sorted(_DISPATCHERS)}"
        )
    if ep_mesh is None or ep_mesh.size() == 1:
        if backend.dispatcher != "torch":
            warnings.warn(
                f"dispatcher={backend.dispatcher!r} needs expert parallelism over more than one "
                "rank; falling back to the local dispatcher",
                stacklevel=2,
            )
        return LocalDispatcher(num_experts)
    return _DISPATCHERS[backend.dispatcher](num_experts, ep_mesh.get_group(), backend=backend)


_DISPATCHERS: dict[str, type[TokenDispatcher]] = {
    "torch": AllToAllDispatcher,
    "deepep": DeepEPDispatcher,
    "hybridep": HybridEPDispatcher,
    "uccl_ep": UCCLEPDispatcher,
}
