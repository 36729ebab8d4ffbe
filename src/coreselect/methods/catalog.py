"""Where each method lives: ``--method NAME`` -> the module that registers it.

Adding a method = one new module that calls :func:`coreselect.methods.registry.register`
plus one line here. The registry imports a module only when its method is asked for, so
``import coreselect`` and ``coreselect --help`` stay cheap (torch, bm25s and the DSIR
library load on demand).
"""

from __future__ import annotations

MODULES: dict[str, str] = {
    "trim": "coreselect.methods.trim",
    "random": "coreselect.methods.baselines.random",
    "bm25": "coreselect.methods.baselines.bm25",
    "dsir": "coreselect.methods.baselines.dsir",
    "rds": "coreselect.methods.baselines.model_based",
    "less": "coreselect.methods.baselines.model_based",
    "tagcos": "coreselect.methods.baselines.model_based",
    "s2l": "coreselect.methods.baselines.model_based",
    "cld": "coreselect.methods.baselines.model_based",
    "p2d": "coreselect.methods.p2d",
}
