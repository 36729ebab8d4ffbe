"""P2D (paper 003, "From Parameters to Data"): task-sensitive attention heads pick the data.

Three stages (paper Fig. 2), one module each; this package only re-exports them:

1. :mod:`~coreselect.methods.p2d.localize`: fast head localization (``H_T``, ``heads.json``,
   the heat map, ``coreselect heads``);
2. :mod:`~coreselect.methods.p2d.select`: parameter-guided selection (P2D-dagger, the
   registered ``p2d`` method, its experiment rows; the falsification options of issue 15:
   ``heads=random`` + ``head_seed``, ``score=activation``, the ``ppl`` skew, several targets);
3. :mod:`~coreselect.methods.p2d.train`: sparse head adaptation (P2D-double-dagger, heads-only
   training on ``transformers.Trainer``) and the Alignment Efficiency Ratio.
"""

from coreselect.methods.p2d.localize import (
    PROXIES,
    Head,
    HeadsArgs,
    HeadSet,
    attention_importance,
    gradient_importance,
    head_gates,
    heads_command,
    localize_heads,
    n_top,
    o_proj_of,
    per_example_loss,
    plot_heatmap,
    random_heads,
    top_heads,
)
from coreselect.methods.p2d.select import (
    FEATURES,
    PPL_MODES,
    SCORES,
    P2DConfig,
    P2DMethod,
    activation_scores,
    head_activations,
    head_features,
    shared_prefix,
)
from coreselect.models.introspect import HeadGeometry, decoder_layers

__all__ = [
    "FEATURES",
    "PPL_MODES",
    "PROXIES",
    "SCORES",
    "Head",
    "HeadGeometry",
    "HeadSet",
    "HeadsArgs",
    "P2DConfig",
    "P2DMethod",
    "activation_scores",
    "attention_importance",
    "decoder_layers",
    "gradient_importance",
    "head_activations",
    "head_features",
    "head_gates",
    "heads_command",
    "localize_heads",
    "n_top",
    "o_proj_of",
    "per_example_loss",
    "plot_heatmap",
    "random_heads",
    "shared_prefix",
    "top_heads",
]
