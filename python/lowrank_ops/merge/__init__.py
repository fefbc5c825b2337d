"""Model merging: task vectors and the merge methods of the papers, a streaming safetensors engine and CLI.

```python
from lowrank_ops import merge
merged = merge.ties(base_state, [sd1, sd2], weights=[1, 1], density=0.2)
```
Every method is registered by name in :data:`merge.METHODS` (the YAML ``merge_method``).
"""
from .registry import METHODS, MergeMethod, get_method, register

__all__ = ["METHODS", "MergeMethod", "get_method", "register"]

# methods of this part (issue 4, part 2), the streaming engine and LoRA-space merges
from .slerp import slerp_tensor as _slerp_tensor  # noqa: E402,F401
from . import model_stock as _model_stock_mod, pcb as _pcb_mod, lines as _lines_mod  # noqa: E402,F401
from . import tsv_m as _tsv_m_mod, lore as _lore_mod, sequential_projection as _seqproj_mod  # noqa: E402,F401
from .atlas import atlas, learn_coefficients  # noqa: E402
from .lore import lore_estimate  # noqa: E402
from .config import MergeConfig, ConfigError, parse_config  # noqa: E402
from .engine import MergeError, merge_checkpoints  # noqa: E402
from . import lora  # noqa: E402

slerp = METHODS["slerp"]
model_stock = METHODS["model_stock"]
pcb = METHODS["pcb"]
lines = METHODS["lines"]
tsv_m = METHODS["tsv_m"]
lore = METHODS["lore"]
sequential_projection = METHODS["sequential_projection"]

__all__ += ["slerp", "model_stock", "pcb", "lines", "tsv_m", "lore", "sequential_projection", "atlas",
            "learn_coefficients", "lore_estimate", "MergeConfig", "ConfigError", "parse_config", "MergeError",
            "merge_checkpoints", "lora"]
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
