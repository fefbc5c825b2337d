"""Model merging: task vectors and the merge methods of the papers, a streaming safetensors engine and CLI.

```python
from lowrank_ops import merge
merged = merge.ties(base_state, [sd1, sd2], weights=[1, 1], density=0.2)
```
Every method is registered by name in :data:`merge.METHODS` (the YAML ``merge_method``).
"""
from .registry import METHODS, MergeMethod, get_method, register

__all__ = ["METHODS", "MergeMethod", "get_method", "register"]

from . import cabs as _cabs, dare as _dare, magnitude_prune as _mp, negmerge as _negmerge  # noqa: E402,F401
from . import ram as _ram, task_arithmetic as _ta, ties as _ties  # noqa: E402,F401

task_arithmetic = METHODS["task_arithmetic"]
ties = METHODS["ties"]
dare_linear = METHODS["dare_linear"]
dare_ties = METHODS["dare_ties"]
magnitude_prune = METHODS["magnitude_prune"]
cabs = METHODS["cabs"]
negmerge = METHODS["negmerge"]
ram = METHODS["ram"]
__all__ += ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cabs", "negmerge", "ram"]
