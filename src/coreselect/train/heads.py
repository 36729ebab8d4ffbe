"""``coreselect.train.heads``: the old import path of P2D-double-dagger's heads-only training.

It lives in :mod:`coreselect.methods.p2d.train` (the P2D package, issue 13); this module only
re-exports it for callers and user code written against the old path.
"""

from coreselect.methods.p2d.train import (
    KV_POLICY,
    HeadDelta,
    HeadsModule,
    HeadsOnly,
    HeadTrainResult,
    alignment_efficiency_ratio,
    apply_head_delta,
    estimate_aer,
    head_slices,
    seconds_per_token,
    train_heads,
    train_heads_from_file,
    train_heads_run,
)

__all__ = ["KV_POLICY", "HeadDelta", "HeadTrainResult", "HeadsModule", "HeadsOnly", "alignment_efficiency_ratio",
           "apply_head_delta", "estimate_aer", "head_slices", "seconds_per_token", "train_heads",
           "train_heads_from_file", "train_heads_run"]
