"""The BiT ResNet of Kolesnikov et al. 2020 ("Big Transfer"), the ViT paper's CNN baseline, on uint8 patches.

ResNet-v2: pre-activation bottleneck units, GroupNorm instead of BatchNorm, weight-standardised
convolutions, a zero-initialised head. It reads the same patch tensors as the ViT (the data path is
unchanged): the shared `PatchInput` normalises them on the device and `vit.patches.unpatchify` rebuilds
the image. Layer shapes follow the BiT reference (7x7/2 stem, zero-padded 3x3/2 max pool, stride on the
3x3 convolution, projection shortcut in the first unit of each stage). Like the ViT it can be built on the
meta device and materialised with `reset_parameters`, and checkpointed per bottleneck unit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vit.config import BiTConfig
from vit.model import BlockCheckpointing, Materialisable, PatchInput
from vit.patches import unpatchify

# HF transformers' and timm's BiT epsilon, not the BiT reference's 1e-10: one standardisation for every
# BiT vitpipe builds, trains, loads from HF or exports to it (HF's config has no field for it, so a second
# value could not travel with the weights). The two differ only for filters whose variance nears 1e-8,
# which trained checkpoints do have; there HF's value is the one their logits were computed with.
WS_EPSILON = 1e-8


def standardize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Weight standardisation (Qiao et al. 2019): each output filter to zero mean and unit (biased) variance
    over its inputs and kernel, in fp32 whatever the weights' dtype. HF's formula op for op (a batch norm
    over each filter, epsilon inside the square root), so HF's weights give HF's logits at any scale."""
    flat = weight.float().reshape(1, weight.shape[0], -1)
    standardized = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=WS_EPSILON)
    return standardized.reshape_as(weight).to(weight.dtype)


class StdConv2d(nn.Conv2d):
    """A bias-free convolution whose weights are standardised on every forward pass."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = standardize_weight(self.weight)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            # oneDNN's bf16 weight gradient of a strided 3x3 on a 1x1 map (16 px images in BiT's last
            # stage) comes out NaN now and then, as if from unwritten memory; DeepSpeed then skips the
            # step (benchmarks/bench_bf16.py). bf16 weights and activations, fp32 arithmetic: CPUs are a
            # test path.
            return F.conv2d(x.float(), weight.float(), None, self.stride, self.padding).to(x.dtype)
        return F.conv2d(x, weight, None, self.stride, self.padding)


class PreActBottleneck(nn.Module):
    """GN-ReLU-conv1x1, GN-ReLU-conv3x3 (strided), GN-ReLU-conv1x1, plus the shortcut; the projection
    shortcut reads the pre-activated input, as in ResNet-v2."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = cout // 4
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = StdConv2d(cin, mid, 1)
        self.norm2 = nn.GroupNorm(groups, mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride, padding=1)
        self.norm3 = nn.GroupNorm(groups, mid)
        self.conv3 = StdConv2d(mid, cout, 1)
        self.downsample = StdConv2d(cin, cout, 1, stride=stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.norm1(x))
        shortcut = self.downsample(activated) if self.downsample is not None else x
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.norm2(out)))
        out = self.conv3(F.relu(self.norm3(out)))
        return out + shortcut


class ResNetV2(Materialisable, BlockCheckpointing, nn.Module):
    """BiT classifier: `model(uint8 patches [B, N, P*P*C]) -> logits [B, num_classes]`, any image size."""

    def __init__(self, config: BiTConfig) -> None:
        super().__init__()
        self.config = config
        self.input = PatchInput(config)
        self.stem = StdConv2d(config.channels, config.stem_width, 7, stride=2, padding=3)
        units: list[nn.Module] = []
        cin = config.stem_width
        for stage, (blocks, cout) in enumerate(zip(config.stage_blocks, config.stage_widths, strict=True)):
            for unit in range(blocks):
                stride = 2 if stage > 0 and unit == 0 else 1
                units.append(PreActBottleneck(cin, cout, stride, config.groups))
                cin = cout
        self.body = nn.Sequential(*units)
        self.norm = nn.GroupNorm(config.groups, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self._init_weights()  # over the defaults the layers drew as they were built

    @torch.no_grad()
    def _init_weights(self) -> None:
        """BiT's own initialisation over PyTorch's layer defaults: the head starts at zero."""
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised patches [B, N, P*P*C] -> images [B, C, H, W] (the one patch layout, inverted)."""
        geometry = self.config.geometry
        images = unpatchify(x, geometry.patch_size, geometry.channels)
        return images.permute(0, 3, 1, 2)

    def features(self, patches: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        """Global-pooled pre-head features [B, feature_dim]: what the head and few-shot probes read."""
        x = self.image(self.input(patches, normalized=normalized))
        x = self.stem(x.to(self.stem.weight.dtype))
        x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), kernel_size=3, stride=2)
        for unit in self.body:
            x = self.call_block(unit, x)
        x = F.relu(self.norm(x))
        return x.mean(dim=(2, 3))

    def forward(self, patches: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        """Logits [B, num_classes] for uint8 patches (or normalised floats with `normalized=True`)."""
        return self.head(self.features(patches, normalized=normalized))

    def normalize(self, patches: torch.Tensor) -> torch.Tensor:
        """The input's normalisation alone, for augmentations that mix images (mixup) before the model."""
        self.input.check(patches, normalized=patches.is_floating_point())  # uint8, or float pixels (a crop)
        return self.input.normalize(patches)
