"""A small decoder-only transformer (GPT) sharded with FSDP2, on deterministic synthetic text.

Each sequence is an arithmetic progression of tokens modulo the vocabulary with a random start
and stride: easy to learn, fully determined by (seed, step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from _trainer import Batch, train
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tokens(idx) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


DEFAULTS: dict[str, Any] = {
    "vocab": 512,
    "dim": 256,
    "layers": 4,
    "heads": 4,
    "seq_len": 64,
    "batch_size": 8,
    "lr": 3e-3,
    "steps": 30,
}


def build(config: dict[str, Any]) -> tuple[nn.Module, list[nn.Module]]:
    model = TinyGPT(
        int(config["vocab"]),
        int(config["dim"]),
        int(config["layers"]),
        int(config["heads"]),
        int(config["seq_len"]),
    )
    return model, list(model.blocks)


def make_batch(config: dict[str, Any], gen: torch.Generator) -> Batch:
    batch, seq, vocab = int(config["batch_size"]), int(config["seq_len"]), int(config["vocab"])
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    stride = torch.randint(1, 8, (batch, 1), generator=gen)
    tokens = (start + stride * torch.arange(seq + 1)) % vocab
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main() -> None:
    train("tiny-gpt", build, make_batch, loss, DEFAULTS)


if __name__ == "__main__":
    main()
