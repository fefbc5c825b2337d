"""Small transformer-like models for adapter tests (no hub, no transformers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4, ff: int = 48) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.up_proj = nn.Linear(d, ff)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(a)
        return x + self.down_proj(F.gelu(self.up_proj(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, d: int = 32, layers: int = 2, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(layers)])
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for blk in self.layers:
            x = blk(x)
        return self.head(x)


def make(seed: int = 0, dtype=torch.float32, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kw).to(dtype)
