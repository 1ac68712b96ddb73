"""DCNv2 ranking model (cross network + deep tower over sparse embeddings and dense features)
on synthetic click logs, sharded with FSDP2.

Clicks come from a fixed hidden "teacher" (seeded once), features from a generator seeded by
(seed, step): every batch is reproducible.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from _trainer import Batch, train
from torch import nn


class CrossLayer(nn.Module):
    """x_{l+1} = x_0 * (W x_l + b) + x_l (DCN-V2, full-rank)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class DCNv2(nn.Module):
    def __init__(
        self,
        num_dense: int,
        cardinalities: list[int],
        emb_dim: int,
        cross_layers: int,
        deep: list[int],
    ) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c, emb_dim) for c in cardinalities)
        dim = num_dense + emb_dim * len(cardinalities)
        self.cross = nn.ModuleList(CrossLayer(dim) for _ in range(cross_layers))
        layers: list[nn.Module] = []
        width = dim
        for hidden in deep:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.deep = nn.Sequential(*layers)
        self.head = nn.Linear(dim + width, 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        embedded = [table(sparse[:, i]) for i, table in enumerate(self.embeddings)]
        x0 = torch.cat([dense, *embedded], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.head(torch.cat([x, self.deep(x0)], dim=1)).squeeze(1)


DEFAULTS: dict[str, Any] = {
    "num_dense": 13,
    "cardinalities": [1000, 1000, 500, 500, 200, 200, 100, 100],
    "emb_dim": 16,
    "cross_layers": 3,
    "deep": [256, 128],
    "batch_size": 256,
    "lr": 1e-3,
    "steps": 40,
}


def build(config: dict[str, Any]) -> tuple[nn.Module, list[nn.Module]]:
    model = DCNv2(
        int(config["num_dense"]),
        [int(c) for c in config["cardinalities"]],
        int(config["emb_dim"]),
        int(config["cross_layers"]),
        [int(d) for d in config["deep"]],
    )
    return model, [*model.embeddings, model.deep]


def _teacher(config: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(12345)
    dense_w = torch.randn(int(config["num_dense"]), generator=gen)
    sparse_w = [torch.randn(int(c), generator=gen) for c in config["cardinalities"]]
    return dense_w, sparse_w


def make_batch(config: dict[str, Any], gen: torch.Generator) -> Batch:
    batch = int(config["batch_size"])
    dense = torch.randn(batch, int(config["num_dense"]), generator=gen)
    sparse = torch.stack(
        [torch.randint(0, int(c), (batch,), generator=gen) for c in config["cardinalities"]], dim=1
    )
    dense_w, sparse_w = _teacher(config)
    logit = dense @ dense_w * 0.5 + sum(w[sparse[:, i]] for i, w in enumerate(sparse_w)) * 0.5
    clicks = (torch.rand(batch, generator=gen) < torch.sigmoid(logit)).float()
    return dense, sparse, clicks


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    dense, sparse, clicks = batch
    return F.binary_cross_entropy_with_logits(model(dense, sparse), clicks)


def main() -> None:
    train("dcnv2", build, make_batch, loss, DEFAULTS)


if __name__ == "__main__":
    main()
