"""Backbone, CARP head and the multi-crop forward.

The module layout (``backbone.*``, ``head.mlp.*``, ``head.last_layer.weight_g`` /
``weight_v``) matches the published checkpoints, so their weights load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from carp_fast.config import ModelConfig


def build_backbone(arch: str, zero_init_residual: bool = True) -> tuple[nn.Module, int]:
    """A torchvision ResNet with ``fc`` replaced by identity, and its feature width."""
    try:
        constructor = getattr(tvm, arch)
    except AttributeError:
        raise ValueError(f"unknown torchvision architecture {arch!r}") from None
    backbone = constructor(weights=None, zero_init_residual=zero_init_residual)
    width = backbone.fc.in_features
    backbone.fc = nn.Identity()
    return backbone, width


class PrototypeLayer(nn.Module):
    """Weight-normalised linear map to the K prototypes, without bias.

    Row k of the effective weight is ``weight_g[k] * weight_v[k] / ||weight_v[k]||``
    (what ``torch.nn.utils.weight_norm`` computes, with the published parameter names).
    Given a partition ``[G, P]`` of prototype indices, the rows are taken in partition
    order before the matmul, so group g of the output is columns ``[g*P, (g+1)*P)`` and
    no kernel ever gathers logits.
    """

    def __init__(self, in_dim: int, num_prototypes: int, norm_last_layer: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(num_prototypes, in_dim))
        self.weight_g = nn.Parameter(torch.ones(num_prototypes, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)  # nn.Linear's default init
        self.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor, partition: torch.Tensor | None = None) -> torch.Tensor:
        weight_v, weight_g = self.weight_v, self.weight_g
        if partition is not None:
            rows = partition.reshape(-1)
            weight_v, weight_g = weight_v.index_select(0, rows), weight_g.index_select(0, rows)
        weight = weight_v * (weight_g / weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, weight)


class CarpHead(nn.Module):
    """MLP ``in -> hidden -> ... -> bottleneck`` (BatchNorm + GELU between) and prototypes."""

    def __init__(self, in_dim: int, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(cfg.head_layers - 1):
            layers += [nn.Linear(width, cfg.hidden_dim), nn.BatchNorm1d(cfg.hidden_dim), nn.GELU()]
            width = cfg.hidden_dim
        layers.append(nn.Linear(width, cfg.bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = PrototypeLayer(cfg.bottleneck_dim, cfg.num_prototypes, cfg.norm_last_layer)

    def forward(self, features: torch.Tensor, partition: torch.Tensor | None = None) -> torch.Tensor:
        return self.last_layer(self.mlp(features), partition)


class CarpModel(nn.Module):
    """Backbone + head; maps multi-crop views to grouped logits ``[V, B, G*P]``."""

    def __init__(self, cfg: ModelConfig, memory_format: torch.memory_format = torch.channels_last):
        """``memory_format`` of the backbone's weights: channels-last, as every loader's batches
        are (the fast layout for cuDNN's mixed-precision convolutions); the profiler's
        published baseline alone asks for ``torch.contiguous_format`` (NCHW)."""
        super().__init__()
        self.backbone, self.embed_dim = build_backbone(cfg.arch, cfg.zero_init_residual)
        self.head = CarpHead(self.embed_dim, cfg)
        self.backbone.to(memory_format=memory_format)

    def forward(
        self,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None = None,
        partition: torch.Tensor | None = None,
        num_views: int | None = None,
    ) -> torch.Tensor:
        """Logits of ``num_views`` views stacked view-major along the batch dimension.

        One backbone call per resolution (the loader already groups views by size, so no
        input is concatenated); the features of all views go through the head together,
        so its BatchNorm sees every view as in the published wrapper.
        """
        features = [self.backbone(global_views)]
        if local_views is not None and local_views.shape[0] > 0:
            features.append(self.backbone(local_views))
        features = features[0] if len(features) == 1 else torch.cat(features)
        logits = self.head(features, partition)
        if num_views is None:
            return logits
        return logits.view(num_views, -1, logits.shape[-1])
