"""Backbones of the five-regime study (``benchmarks/peft_study.py``), scaled to 2 CPU cores.

Each backbone is a timm model name plus ``model_kwargs`` (what
``lightning_peft.modules.ImageClassifier`` builds), the image side it reads, the block lists
``AdaptiveCheckpointCallback`` switches and the linear layers the LoRA-family regimes adapt:

* ``vit_s``: ViT-Small's shape (``vit_small_patch16_224``: pre-norm blocks of attention + MLP,
  MLP ratio 4, head dim ``dim / heads``), scaled to ``dim 64, depth 6, heads 4`` on 16x16 grey
  digits with 4x4 patches (16 tokens + class token).
* ``tiny_vit``: TinyViT's shape (``tiny_vit_5m_224``: an MBConv stage, then windowed-attention
  stages with a local depthwise conv, patch merging between stages), scaled to three stages
  ``embed_dims (32, 64, 96)``, ``depths (1, 2, 1)`` on 32x32 digits (token grids 8x8 -> 4x4 ->
  2x2).
* ``vision_mamba``: a Vim-style backbone (patch embedding, a stack of Mamba selective-state-space
  blocks, mean pooling, linear head) built from transformers' ``MambaBlock``, which runs its
  reference pure-PyTorch selective scan when ``mamba_ssm`` is absent (it is, here). Registered
  with timm as ``study_vision_mamba`` so ``ImageClassifier`` builds it like the others.

``x [B, C, S, S]`` -> logits ``[B, num_classes]`` for all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Backbone:
    """One backbone of the study: what to build and how to adapt and checkpoint it."""

    key: str
    label: str
    model_name: str
    model_kwargs: dict[str, Any]
    image_size: int
    #: dotted paths (relative to the LightningModule) of the block lists to checkpoint
    blocks: list[str]
    #: LoRA/QLoRA/AdaLoRA targets; "all-linear" = every nn.Linear but the head
    lora_targets: str | list[str] = "all-linear"
    shape_of: str = ""
    notes: list[str] = field(default_factory=list)


BACKBONES: dict[str, Backbone] = {
    "vit_s": Backbone(
        key="vit_s",
        label="ViT-S-shaped",
        model_name="vit_small_patch16_224",
        model_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "in_chans": 1},
        image_size=16,
        blocks=["model.blocks"],
        shape_of="ViT-Small (dim 384, depth 12, heads 6) scaled to dim 64, depth 6, heads 4; 16x16 px, patch 4",
    ),
    "tiny_vit": Backbone(
        key="tiny_vit",
        label="TinyViT-shaped",
        model_name="tiny_vit_5m_224",
        model_kwargs={
            "in_chans": 1,
            "embed_dims": (32, 64, 96),
            "depths": (1, 2, 1),
            "num_heads": (1, 2, 3),
            "window_sizes": (8, 4, 2),
            "drop_path_rate": 0.0,
        },
        image_size=32,
        # the MBConv stage's block too: at 8x8 with 4x expansion it holds much of the activations
        blocks=["model.stages.0.blocks", "model.stages.1.blocks", "model.stages.2.blocks"],
        shape_of="TinyViT-5M (dims 64-320, depths 2-2-6-2) scaled to 3 stages, dims 32-64-96, depths 1-2-1; 32x32 px",
        notes=[
            "TinyViT blocks hold batch-norm layers (local conv, MBConv): a checkpointed block recomputes its forward, "
            "so its running statistics are updated twice per step (momentum 0.1); accuracy is measured on the model as trained",
        ],
    ),
    "vision_mamba": Backbone(
        key="vision_mamba",
        label="Vim-style Mamba",
        model_name="study_vision_mamba",
        model_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 2, "state_size": 8, "in_chans": 1},
        image_size=16,
        blocks=["model.blocks"],
        # MambaMixer reads x_proj/out_proj/dt_proj `.weight` itself (for the fused kernel call), so
        # apply_adapter refuses to wrap them for QLoRA/AdaLoRA: the LoRA family adapts in_proj (the largest) only
        lora_targets=["in_proj"],
        shape_of="Vim-S-style (patch embed + Mamba blocks, mean pool) at dim 64, depth 2, state 8; 16x16 px, patch 4",
        notes=[
            "transformers' reference PyTorch selective scan (mamba_ssm is not installed): a Python loop over the 16 tokens, "
            "so it is far slower per MAC than the attention backbones",
            "unidirectional scan (Vim scans both ways); LoRA/QLoRA/AdaLoRA adapt in_proj only: MambaMixer reads the weights of "
            "x_proj, out_proj and dt_proj directly, which apply_adapter rightly refuses to wrap",
        ],
    ),
}


class VisionMamba(nn.Module):
    """Patch embedding + ``depth`` transformers ``MambaBlock``s + RMSNorm + mean pool + head.

    ``x [B, C, S, S]`` -> ``patch_embed`` (``Conv2d`` with kernel = stride = ``patch_size``) ->
    tokens ``[B, L, D]`` with ``L = (S / patch_size)^2`` plus a learnt position embedding ->
    each block ``h <- h + Mixer(RMSNorm(h))`` (selective scan along the ``L`` tokens) ->
    ``head(mean_L(norm(h)))`` ``[B, num_classes]``.
    """

    def __init__(
        self,
        img_size: int = 16,
        patch_size: int = 4,
        embed_dim: int = 64,
        depth: int = 2,
        state_size: int = 8,
        in_chans: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        from transformers import MambaConfig
        from transformers.models.mamba.modeling_mamba import MambaBlock, MambaRMSNorm

        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        cfg = MambaConfig(hidden_size=embed_dim, state_size=state_size, num_hidden_layers=depth, expand=2, conv_kernel=4)
        tokens = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(MambaBlock(cfg, layer_idx=i) for i in range(depth))
        self.norm = MambaRMSNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        for block in self.blocks:
            _init_mixer(block.mixer, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


@torch.no_grad()
def _init_mixer(mixer: nn.Module, cfg: Any) -> None:
    """Mamba's initialisation (Gu & Dao 2023): ``A = -[1..N]`` per channel (stored as
    ``A_log = log [1..N]``), ``D = 1``, ``dt = softplus(dt_bias)`` log-uniform in
    ``[dt_min, dt_max]``. transformers only applies it inside its own ``from_pretrained``/
    ``post_init`` machinery, so a bare ``MambaBlock`` starts with uninitialised memory."""
    n = mixer.A_log.shape[1]
    mixer.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(mixer.A_log))
    mixer.D.fill_(1.0)
    std = cfg.time_step_rank**-0.5 * cfg.time_step_scale
    mixer.dt_proj.weight.uniform_(-std, std)
    lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
    dt = torch.exp(torch.rand(mixer.dt_proj.bias.shape) * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
    mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


def register_timm_models() -> None:
    """Register ``study_vision_mamba`` with timm (idempotent), so ``timm.create_model`` and
    therefore ``ImageClassifier(model_name="study_vision_mamba")`` build it."""
    import timm
    from timm.models import register_model

    if timm.is_model("study_vision_mamba"):
        return

    def study_vision_mamba(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
        if pretrained:
            raise ValueError("study_vision_mamba has no pretrained weights")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return VisionMamba(**kwargs)

    study_vision_mamba.__module__ = __name__
    register_model(study_vision_mamba)
