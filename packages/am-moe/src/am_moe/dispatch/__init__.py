"""Token dispatchers: route each token's rows to the experts chosen for it, then combine back.

A dispatcher turns the router's choice for every token (top-k expert `indices_TK` with
`weights_TK`) into one contiguous block of rows per local expert for the expert kernels
(`dispatch`), and turns the kernels' output rows back into one vector per token, weighted by
the routing weights (`combine`). Autograd flows through both to the token activations and to
the routing weights (the router's gradient).

One class per backend (the table `_DISPATCHERS`, keyed by `BackendConfig.dispatcher`):

- `LocalDispatcher`: no expert parallelism; this rank owns every expert.
- `AllToAllDispatcher` ("torch"): experts are split evenly over an EP process group; each
  token is sent, once per destination rank, only to the ranks owning at least one of its
  experts (`all_to_all_single` with exchanged counts), together with its local expert ids and
  routing weights there; the receiver expands it to one row per chosen local expert, and on the
  way back returns one already-weighted row per (token, rank), which the source rank sums.
  Sending the K weights (a few bytes next to a D-wide row) is what lets the return trip carry
  one row per (token, rank) instead of one per (token, expert). Compared with all-gathering
  every token to every EP rank this moves only routed tokens.
- `DeepEPDispatcher` ("deepep"), `HybridEPDispatcher` ("hybridep"), `UCCLEPDispatcher`
  ("uccl_ep"): the same algorithm run by GPU kernel libraries through their public Python
  APIs (`deep_ep.Buffer`, `deep_ep.HybridEPBuffer`, `uccl.ep.Buffer`), imported only when
  constructed. The library moves each routed token once per destination rank with its
  routing weights and returns it the same way; rows are grouped by expert and weighted
  here, as for "torch". Autograd Functions wire backward as the libraries document it: the
  gradient of a dispatch is a combine with the same handle, that of a combine a cached
  dispatch. Activations travel in bf16 by default (`comm_dtype`), routing weights in
  float32. The kernels need CUDA; on CPU the glue is tested against emulations of the APIs.

Shape legend: T tokens on this rank (flattened batch*seq), D model dim, K top-k, E global
experts, P EP ranks, L local experts of this EP rank (E = P * L), S rows this rank sends
(one per (token, destination rank)), V rows this rank receives, R rows being grouped by
expert (the T tokens without EP, the V received rows with it), N expert rows after grouping
(one per (row, chosen local expert)), J local expert slots per row HybridEP keeps (min(K, L)).

Files, one job each: `base` (the contract, routing checks, byte counters), `grouping`
(rows grouped by local expert and summed back), `local`, `all_to_all`, `kernel_library`
(shared base of the GPU libraries), `deepep`, `hybridep`, `uccl_ep`, `build`
(`build_dispatcher`). Every public name is re-exported here, so `am_moe.dispatch.X` keeps
working.
"""

from am_moe.dispatch.all_to_all import AllToAllDispatcher
from am_moe.dispatch.base import DispatchStats, TokenDispatcher
from am_moe.dispatch.build import build_dispatcher
from am_moe.dispatch.deepep import DeepEPDispatcher
from am_moe.dispatch.hybridep import HybridEPDispatcher
from am_moe.dispatch.local import LocalDispatcher
from am_moe.dispatch.uccl_ep import UCCLEPDispatcher

__all__ = [
    "AllToAllDispatcher",
    "DeepEPDispatcher",
    "DispatchStats",
    "HybridEPDispatcher",
    "LocalDispatcher",
    "TokenDispatcher",
    "UCCLEPDispatcher",
    "build_dispatcher",
]
