"""Native offline-RL algorithms: ``make_algorithm('bc' | 'iql' | 'cql', ctx, config)``.

algo = make_algorithm("iql", ctx, {"expectile": 0.7, "beta": 3.0})
algo.init_from(bc.state_dict())      # the actor starts from BC's
metrics = algo.update(batch)         # one gradient step, 0-dim detached tensors
"""

from __future__ import annotations

from typing import Any

from trainer.algos.base import AlgoContext, Algorithm, AlgorithmBase, parse_config
from trainer.algos.bc import BC, BCConfig
from trainer.algos.cql import CQL, CQLConfig
from trainer.algos.iql import IQL, IQLConfig

__all__ = [
    "ALGORITHMS",
    "CONFIGS",
    "AlgoContext",
    "Algorithm",
    "AlgorithmBase",
    "BC",
    "BCConfig",
    "CQL",
    "CQLConfig",
    "IQL",
    "IQLConfig",
    "make_algorithm",
]

ALGORITHMS: dict[str, type] = {"bc": BC, "iql": IQL, "cql": CQL}
CONFIGS: dict[str, type] = {"bc": BCConfig, "iql": IQLConfig, "cql": CQLConfig}


def make_algorithm(name: str, ctx: AlgoContext, config: dict[str, Any] | None = None) -> Algorithm:
    """Build algorithm ``name`` for ``ctx`` from its hyper-parameters.

    Unknown names or hyper-parameters are a ValueError that names them and the valid ones.
    """
    if name not in ALGORITHMS:
        raise ValueError(
            f"unknown algorithm {name!r}; native algorithms are: {', '.join(ALGORITHMS)}"
        )
    cfg: Any = parse_config(CONFIGS[name], dict(config or {}), name)
    algo: Algorithm = ALGORITHMS[name](ctx, cfg)
    return algo
