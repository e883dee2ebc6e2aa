"""jax_router: a fused Mixture-of-Experts router for JAX (CUDA and CPU XLA FFI kernels)."""

from . import reference
from ._ffi import KernelsMissingWarning, export_checks
from .dispatch import dispatch_plan, permute, unpermute
from .aux_loss import fused_compute_score_for_moe_aux_loss, fused_moe_aux_loss
from .plan import DispatchPlan
from .options import RouteOptions, RoutingMapFormat, ScoreFunction
from .qb import fused_topk_with_score_function_qb, route_topk_qb
from .router import fused_topk_with_score_function, route_topk

__all__ = [
    "fused_topk_with_score_function",
    "route_topk",
    "route_topk_qb",
    "fused_topk_with_score_function_qb",
    "fused_compute_score_for_moe_aux_loss",
    "fused_moe_aux_loss",
    "dispatch_plan",
    "permute",
    "unpermute",
    "DispatchPlan",
    "reference",
    "export_checks",
    "KernelsMissingWarning",
    "RouteOptions",
    "RoutingMapFormat",
    "ScoreFunction",
]
__version__ = "0.1.0"
