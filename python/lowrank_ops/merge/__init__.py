"""Model merging: task vectors and the merge methods of the papers, a streaming safetensors engine and CLI.

```python
from lowrank_ops import merge
merged = merge.ties(base_state, [sd1, sd2], weights=[1, 1], density=0.2)
```
Every method is registered by name in :data:`merge.METHODS` (the YAML ``merge_method``).
"""
from .registry import METHODS, MergeMethod, get_method, register

__all__ = ["METHODS", "MergeMethod", "get_method", "register"]
