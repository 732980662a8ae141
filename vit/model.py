"""The Vision Transformer of Dosovitskiy et al. on uint8 patch tensors, in plain PyTorch.

Pre-norm encoder blocks with fused QKV projections and `scaled_dot_product_attention`; class-token or
global-average pooling; optional tanh pre-logits layer; zero-initialised head. The stem normalises
uint8 patches on the device and embeds them with one matmul (the patch layout is `vit.patches`).
Constructors read no tensor values, so a model can be built on the meta device and materialised with
`reset_parameters` (`vit.build.build_model`); blocks can be activation-checkpointed (`BlockCheckpointing`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit.config import Architecture, ViTConfig
from vit.patches import describe_patch_dim


def lecun_normal_(weight: torch.Tensor) -> None:
    """Truncated normal with variance 1/fan_in (flax's default Dense/Conv init, used by the paper)."""
    fan_in = weight.shape[1:].numel()
    # 0.8796 is the std of a unit normal truncated to [-2, 2]; dividing keeps the variance 1/fan_in.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def reset_submodules(model: nn.Module) -> None:
    """Call every submodule's own `reset_parameters` in the order the constructor built them: the random
    draws the constructor's layers made, so a model built on the meta device and then reset gets bit for
    bit the weights an eager build gets from the same seed."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if module is not model and callable(reset):
            reset()


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic depth per block, growing linearly from 0 at the first block to `drop_path` at the last.
    Plain Python: a tensor's values cannot be read on the meta device."""
    if depth == 1:
        return [0.0]
    return [drop_path * index / (depth - 1) for index in range(depth)]


class Materialisable:
    """A model family whose constructor draws its layers' default initialisation, then its own
    (`_init_weights`): `reset_parameters` draws both again in place, the way a model built on the meta
    device is materialised (`vit.build.build_model`)."""

    _init_weights: Callable[[], None]  # the family's own initialisation, over its layers' defaults

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every weight and derived buffer in place, drawing what the constructor draws."""
        reset_submodules(self)  # type: ignore[arg-type]
        self._init_weights()


class BlockCheckpointing:
    """Per-block activation checkpointing for a model that runs a sequence of blocks: when on, in training
    with grad enabled, each block keeps only its input and recomputes its activations in the backward pass
    (memory for one block's activations instead of all, for about one more forward pass). A switch, not a
    weight: the state_dict is the same either way."""

    training: bool
    activation_checkpointing: bool = False

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Checkpoint each block from the next training forward pass on (or stop doing so)."""
        self.activation_checkpointing = enabled

    def call_block(self, block: nn.Module, x: torch.Tensor, **kwargs: Any) -> Any:
        """`block(x, **kwargs)`, checkpointed when switched on, training and grad enabled (otherwise there
        is no backward pass to save memory for). torch's default preserve_rng_state makes the recompute
        draw the same dropout and drop-path masks, so gradients are those of the plain forward pass."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, **kwargs)
        return block(x, **kwargs)


class PatchInput(nn.Module):
    """What every model family does first: check the patch tensors fit it, and normalise uint8 pixels
    on the device. Has no weights (its buffers are derived from the config and not saved)."""

    def __init__(self, config: Architecture) -> None:
        super().__init__()
        self.config = config
        patch_dim = config.geometry.patch_dim
        self.register_buffer("scale", torch.empty(patch_dim), persistent=False)
        self.register_buffer("shift", torch.empty(patch_dim), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fill the normalisation buffers from the config, in place: not saved, so a model materialised
        from the meta device (where they hold nothing) needs them computed again."""
        device, pixels_per_channel = self.scale.device, self.config.patch_size * self.config.patch_size
        # The layout is (row, col, channel) within a patch, so channel values repeat with period C.
        mean = torch.tensor(self.config.mean, device=device).repeat(pixels_per_channel)
        std = torch.tensor(self.config.std, device=device).repeat(pixels_per_channel)
        self.scale.copy_(1.0 / (255.0 * std))
        self.shift.copy_(-mean / std)

    def check(self, patches: torch.Tensor, *, normalized: bool) -> None:
        """Raise a ValueError that says what the model expects when the input does not fit it."""
        geometry = self.config.geometry
        expected = geometry.shape
        size, channels = geometry.patch_size, geometry.channels
        what = (
            f"[batch, {geometry.num_patches}, {geometry.patch_dim}] ({geometry.grid}x{geometry.grid} patches "
            f"of {size}x{size}x{channels} for {geometry.image_size}px images)"
        )
        if patches.ndim != 3 or tuple(patches.shape[1:]) != expected:
            hint = describe_patch_dim(patches.shape[-1]) if patches.ndim >= 1 else ""
            got = list(patches.shape)
            raise ValueError(f"{self.config.label} expects patches {what}; got shape {got}{hint}")
        if normalized and not patches.is_floating_point():
            raise ValueError(f"normalized=True expects floating-point patches; got {patches.dtype}")
        if not normalized and patches.dtype != torch.uint8:
            raise ValueError(
                f"{self.config.label} expects uint8 patches {what}; got {patches.dtype} "
                "(pass normalized=True for patches that are already normalised floats)"
            )

    def normalize(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0-255) pixels -> (x/255 - mean) / std in float32. From uint8: one new tensor,
        scaled and shifted in place (2.5x faster on a CPU than three passes; the pass caps CPU training)."""
        scale, shift = self.scale.float(), self.shift.float()
        if patches.is_floating_point():
            return torch.addcmul(shift, patches.float(), scale)
        return patches.float().mul_(scale).add_(shift)

    def forward(self, patches: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        self.check(patches, normalized=normalized)
        return patches if normalized else self.normalize(patches)


class PatchStem(PatchInput):
    """uint8 patches -> normalised floats -> linear patch embedding (the paper's "E")."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.geometry.patch_dim, config.width)

    def forward(self, patches: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        x = super().forward(patches, normalized=normalized)
        return self.proj(x.to(self.proj.weight.dtype))


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample, rescaling the kept ones."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Attention(nn.Module):
    """Multi-head self-attention; Q, K and V come from one fused matmul."""

    def __init__(self, width: int, heads: int, attention_dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, *, need_weights: bool = False, explicit: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, attention probabilities [B, heads, T, T] or None). The fused kernel (SDPA) computes
        the output; with `need_weights` it also gives its own probabilities (the same kernel applied to
        identity values). `explicit` is the textbook softmax(QK^T / sqrt(d)) V instead, for comparison."""
        batch, tokens, width = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.attention_dropout if self.training else 0.0
        if need_weights and dropout:
            raise ValueError("attention probabilities are read in eval mode (attention dropout is on)")
        weights = None
        if explicit:
            weights = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
            if need_weights:
                identity = torch.eye(tokens, dtype=q.dtype, device=q.device).expand(batch, self.heads, -1, -1)
                weights = F.scaled_dot_product_attention(q, k, identity)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width)), weights


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer encoder block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = Attention(config.width, config.heads, config.attention_dropout)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = Mlp(config.width, config.mlp_dim, config.dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, *, need_weights: bool = False, explicit: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, the attention's probabilities or None: see Attention.forward)."""
        attended, weights = self.attn(self.norm1(x), need_weights=need_weights, explicit=explicit)
        x = x + self.drop_path(self.dropout(attended))
        return x + self.drop_path(self.mlp(self.norm2(x))), weights


class VisionTransformer(Materialisable, BlockCheckpointing, nn.Module):
    """ViT classifier: `model(uint8 patches [B, N, P*P*C]) -> logits [B, num_classes]`."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = PatchStem(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width)) if config.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.seq_len, config.width))
        self.dropout = nn.Dropout(config.dropout)
        rates = drop_path_rates(config.drop_path, config.depth)
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.pre_logits = (
            nn.Sequential(nn.Linear(config.width, config.representation_size), nn.Tanh())
            if config.representation_size
            else nn.Identity()
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self._init_weights()  # over the defaults the layers drew as they were built

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Initialise as the reference implementation does; the head starts at zero."""
        lecun_normal_(self.stem.proj.weight)
        nn.init.zeros_(self.stem.proj.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        width = self.config.width
        for block in self.blocks:
            # Xavier on each of Q, K, V separately, as if they were three width x width layers.
            for part in block.attn.qkv.weight.split(width, dim=0):
                nn.init.xavier_uniform_(part)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.xavier_uniform_(block.attn.proj.weight)
            nn.init.zeros_(block.attn.proj.bias)
            for layer in (block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.normal_(layer.bias, std=1e-6)
            for norm in (block.norm1, block.norm2):
                norm.reset_parameters()
        self.norm.reset_parameters()
        if isinstance(self.pre_logits, nn.Sequential):
            lecun_normal_(self.pre_logits[0].weight)
            nn.init.zeros_(self.pre_logits[0].bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def encode(self, patches: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        """Token sequence after the final LayerNorm: [B, seq_len, width]."""
        return self._encode(patches, normalized=normalized, need_weights=False, explicit=False)[0]

    def encode_with_attention(
        self, patches: torch.Tensor, *, normalized: bool = False, explicit: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The tokens `encode` gives, and every block's attention probabilities [B, heads, T, T] (query
        rows sum to 1), from the fused kernel unless `explicit`: what the paper's analyses read."""
        tokens, weights = self._encode(patches, normalized=normalized, need_weights=True, explicit=explicit)
        return tokens, [w for w in weights if w is not None]

    def _encode(
        self, patches: torch.Tensor, *, normalized: bool, need_weights: bool, explicit: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        x = self.stem(patches, normalized=normalized)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.dropout(x + self.pos_embed)
        weights = []
        for block in self.blocks:
            if need_weights:  # the analyses' path (eval mode): never checkpointed
                x, block_weights = block(x, need_weights=True, explicit=explicit)
            else:
                x, block_weights = self.call_block(block, x, explicit=explicit)
            weights.append(block_weights)
        return self.norm(x), weights

    def features(self, patches: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        """Pooled pre-logits features [B, feature_dim]: what the head and few-shot probes read."""
        tokens = self.encode(patches, normalized=normalized)
        pooled = tokens[:, 0] if self.config.pool == "cls" else tokens.mean(dim=1)
        return self.pre_logits(pooled)

    def forward(self, patches: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        """Logits [B, num_classes] for uint8 patches (or normalised floats with `normalized=True`)."""
        return self.head(self.features(patches, normalized=normalized))

    def normalize(self, patches: torch.Tensor) -> torch.Tensor:
        """The stem's normalisation alone, for augmentations that mix images (mixup) before the model."""
        self.stem.check(patches, normalized=patches.is_floating_point())  # uint8, or float pixels (a crop)
        return self.stem.normalize(patches)
