"""The paper's looks inside a trained ViT (Dosovitskiy et al. 2020, section 4.5, Figures 6 and 7), as pure
functions of weights and images: attention rollout maps, the mean attention distance of every head by
depth, the cosine similarity of the learned position embeddings, and the principal components of the
patch-embedding filters.

The attention probabilities are the model's own (`VisionTransformer.encode_with_attention`), not a second
implementation of attention; everything else here is arithmetic on them and on the weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vit.model import VisionTransformer
from vit.patches import PatchGeometry, patchify, unpatchify

DISTANCE_IMAGES = 128  # the paper averages attention distances over 128 example images
COMPONENTS = 28  # the paper shows the first 28 principal components of the embedding filters


# --------------------------------------------------------------------------- attention distance


def patch_distances(grid: int, patch_size: int) -> torch.Tensor:
    """[N, N] Euclidean distance in pixels between the centres of the patches of a grid x grid image."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch_size
    return torch.cdist(centres, centres)


def mean_attention_distance(attention: torch.Tensor, distances: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B, heads] the paper's "attention distance": for each query patch, the distance in pixels to every
    key patch weighted by its attention, averaged over the query patches.

    The class token has no place in the image, so its row and column are left out and each query's weights
    over the patches are renormalised to sum to 1: attention spread evenly over every token then gives the
    grid's mean pairwise distance, attention of each patch to itself gives 0.
    """
    patches = attention[..., prefix:, prefix:].double()
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return (patches * distances.to(patches.device)).sum(dim=-1).mean(dim=-1)


# --------------------------------------------------------------------------- attention rollout


def attention_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """[B, T, T] how much each output token draws on each input token through every layer (Abnar &
    Zuidema 2020, as the paper's Appendix D.8 does): each layer's attention averaged over heads, the
    residual connection counted as an identity half, rows renormalised, and the layers multiplied."""
    if not attentions:
        raise ValueError("attention rollout needs the attention of at least one layer")
    batch, _, tokens, _ = attentions[0].shape
    identity = torch.eye(tokens, dtype=torch.float64, device=attentions[0].device)
    rollout = identity.expand(batch, tokens, tokens)
    for attention in attentions:
        mixed = 0.5 * attention.double().mean(dim=1) + 0.5 * identity
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    return rollout


def rollout_map(rollout: torch.Tensor, grid: int, prefix: int) -> torch.Tensor:
    """[B, grid, grid] what the pooled representation draws on, patch by patch: the class token's row of
    the rollout, or for global-average pooling the mean of every token's row."""
    pooled = rollout[:, 0] if prefix else rollout.mean(dim=1)
    return pooled[:, prefix:].reshape(-1, grid, grid)


# --------------------------------------------------------------------------- weights alone


def position_similarity(pos_embed: torch.Tensor, prefix: int) -> torch.Tensor:
    """[N, N] cosine similarity between the position embeddings of every two patches (class token's
    left out): row i, reshaped to the grid, is the paper's tile for patch i (Figure 7, centre)."""
    grid_part = pos_embed.detach().reshape(-1, pos_embed.shape[-1])[prefix:].double()
    unit = F.normalize(grid_part, dim=-1)
    return unit @ unit.T


def embedding_components(
    weight: torch.Tensor, patch_size: int, channels: int, count: int = COMPONENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first principal components of the patch-embedding filters (the rows of E, one per embedding
    dimension, each a P x P x C patch) as patches [k, P, P, C], and the share of the filters' variance
    each explains [k] (Figure 7, left). Each component's sign is fixed so its largest entry is positive."""
    filters = weight.detach().double().reshape(weight.shape[0], -1)
    centred = filters - filters.mean(dim=0, keepdim=True)
    _, singular, directions = torch.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    explained = variance / variance.sum().clamp_min(1e-30)
    keep = min(count, directions.shape[0])
    components = directions[:keep]
    peaks = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    components = components * peaks.sign()
    return components.reshape(keep, patch_size, patch_size, channels), explained[:keep]


# --------------------------------------------------------------------------- a model over images


def fit_images(patches: torch.Tensor, stored: PatchGeometry, geometry: PatchGeometry) -> torch.Tensor:
    """uint8 patches of the stored geometry as the model's: each whole image resized (bilinear,
    antialiased) to the model's resolution and cut into its patches. The analyses look at whole images."""
    if stored.channels != geometry.channels:
        raise ValueError(f"the images have {stored.channels} channel(s), the model reads {geometry.channels}")
    if stored == geometry:
        return patches
    images = unpatchify(patches, stored.patch_size, stored.channels).permute(0, 3, 1, 2).float()
    size = (geometry.image_size, geometry.image_size)
    resized = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    pixels = resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return patchify(pixels, geometry.patch_size)


@dataclass
class Analysis:
    """What `analyze_vit` found; tensors on the CPU."""

    distances: torch.Tensor  # [layers, heads] mean attention distance, pixels, averaged over the images
    uniform_distance: float  # the distance attention spread evenly over the grid would give
    images_seen: int  # images the distances average over
    images: torch.Tensor  # [R, H, W, C] uint8: the images the rollout maps are of
    rollout: torch.Tensor  # [R, grid, grid]
    similarity: torch.Tensor  # [N, N] position-embedding cosine similarity
    components: torch.Tensor  # [k, P, P, C] principal components of the embedding filters
    explained: torch.Tensor  # [k] share of the filters' variance each component explains


@torch.no_grad()
def analyze_vit(
    model: VisionTransformer,
    batches: Iterable[torch.Tensor],
    *,
    rollout_images: int,
    max_images: int = DISTANCE_IMAGES,
    components: int = COMPONENTS,
    explicit: bool = False,
) -> Analysis:
    """Every analysis of one ViT: distances over the first `max_images` images of `batches` (uint8
    patches in the model's geometry), rollout maps of the first `rollout_images` of them, and the
    weight-only looks. `explicit` reads the attention from the textbook path instead of the fused one."""
    model.eval()
    config = model.config
    geometry, prefix = config.geometry, config.num_prefix_tokens
    device = model.pos_embed.device
    distances = patch_distances(geometry.grid, geometry.patch_size)
    total = torch.zeros(config.depth, config.heads, dtype=torch.float64)
    seen = 0
    shown: list[torch.Tensor] = []
    maps: list[torch.Tensor] = []
    for batch in batches:
        batch = batch[: max_images - seen].to(device)
        if not len(batch):
            break
        _, attentions = model.encode_with_attention(batch, explicit=explicit)
        for layer, attention in enumerate(attentions):
            total[layer] += mean_attention_distance(attention, distances, prefix).sum(dim=0).cpu()
        wanted = rollout_images - sum(len(m) for m in maps)
        if wanted > 0:
            rollout = attention_rollout([a[:wanted] for a in attentions])
            maps.append(rollout_map(rollout, geometry.grid, prefix).float().cpu())
            shown.append(unpatchify(batch[:wanted].cpu(), geometry.patch_size, geometry.channels))
        seen += len(batch)
        if seen >= max_images:
            break
    if not seen:
        raise ValueError("no images to analyse the attention on")
    parts, explained = embedding_components(
        model.stem.proj.weight.cpu(), geometry.patch_size, geometry.channels, components
    )
    return Analysis(
        distances=(total / seen).float(),
        uniform_distance=float(distances.mean()),
        images_seen=seen,
        images=torch.cat(shown),
        rollout=torch.cat(maps),
        similarity=position_similarity(model.pos_embed.cpu(), prefix).float(),
        components=parts.float(),
        explained=explained.float(),
    )
