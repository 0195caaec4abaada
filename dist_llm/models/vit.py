"""Vision Transformer as a plain module: conv patch embedding, class token, learned positions,
pre-norm encoder layers, final LayerNorm and a linear classifier on the class token.

Matches Hugging Face's ``ViTForImageClassification`` numerics (mapping in
:mod:`dist_llm.interop.vit`). Input: ``pixel_values`` float ``[B, C, H, W]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.config.schema import EncoderConfig
from dist_llm.models.encoder import EncoderLayer, init_weights


class ViT(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_emb = nn.Parameter(torch.zeros(1, n_patches + 1, d))
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg, pre_norm=True) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.num_classes)
        init_weights(self, cfg.init_std)
        nn.init.trunc_normal_(self.cls_token, std=cfg.init_std)
        nn.init.trunc_normal_(self.pos_emb, std=cfg.init_std)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states ``[B, 1 + patches, d]`` (class token first)."""
        c = self.cfg
        if tuple(pixel_values.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"expected pixel_values [B, {c.num_channels}, {c.image_size}, {c.image_size}] "
                             f"(encoder.num_channels/image_size), got {list(pixel_values.shape)}")
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_emb
        x = self.emb_drop(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.encode(pixel_values)[:, 0])


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels.reshape(-1))
