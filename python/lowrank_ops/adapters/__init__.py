"""PEFT methods on lowrank_ops layers: configs, injection, merge, peft-format save/load.

```python
from lowrank_ops import adapters
model = adapters.inject(model, adapters.LoRA(r=16, alpha=16), target=r".*(q_proj|v_proj)$")
opt = torch.optim.AdamW(adapters.trainable_parameters(model), lr=1e-4)
adapters.save_pretrained(model, "out/")        # peft layout
model = adapters.merge_and_unload(model)
```
"""
from .config import AdapterConfig
from .inject import adapter_layers, count_parameters, inject, merge_and_unload, trainable_parameters, unload
from .io import adapter_state_dict, load_pretrained, save_pretrained
from .lora import DoRA, LoRA
from .vera import VeRA
from .kasa import KaSA, kasa_regularizer
from .lamda import LaMDA, lamda_freeze_projection_b, lamda_freeze_step
from .loldu import LoLDU
from .qrlora import QRLoRA
from .salt import SALT, salt_regularizer
from .sorsa import SORSA, sorsa_regularizer
from .svf import SVF
from .svft import SVFT
from .lora import EVA, MiLoRA, OLoRA, PiSSA, eva_init
from .lora_sb import LoRASB, lora_sb_init
from .extract import extract_lora
from .combine import combine

__all__ = [
    "AdapterConfig", "LoRA", "DoRA", "VeRA",
    "inject", "adapter_layers", "trainable_parameters", "count_parameters", "merge_and_unload", "unload",
    "save_pretrained", "load_pretrained", "adapter_state_dict",
    "SVFT", "SORSA", "SVF", "KaSA", "SALT", "LaMDA", "QRLoRA", "LoLDU",
    "sorsa_regularizer", "kasa_regularizer", "salt_regularizer", "lamda_freeze_projection_b", "lamda_freeze_step",
    "PiSSA", "MiLoRA", "OLoRA", "EVA", "LoRASB", "eva_init", "lora_sb_init", "extract_lora", "combine",
]
