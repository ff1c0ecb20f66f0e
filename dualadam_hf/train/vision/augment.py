"""Batched image augmentation in plain torch, run inside the model on the training device.

Inputs are float batches in [0, 1] of shape (N, C, H, W). The random modules act only in training mode, so
evaluation (and an eval-mode pass over the training set) sees clean images; `Normalize` always acts. Random
draws come from torch's generator on the batch's device, so `torch.manual_seed` makes them repeatable.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

AUGMENTATION_KINDS = ("cifar", "none")


class RandomCropPad(nn.Module):
    """Zero-pads each side by `padding` pixels, then crops every sample back to H×W at its own random offset.

    Equivalent to torchvision's `RandomCrop(size, padding=padding)` with zero fill. Padding happens before
    normalisation, so the border is black, as in the paper's pipeline.
    """

    def __init__(self, padding: int = 4):
        super().__init__()
        if padding < 0:
            raise ValueError(f"padding must be non-negative, got {padding}")
        self.padding = padding

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return images
        batch, channels, height, width = images.shape
        padded = F.pad(images, (self.padding,) * 4)
        offsets = torch.randint(0, 2 * self.padding + 1, (2, batch), device=images.device)
        rows = offsets[0, :, None] + torch.arange(height, device=images.device)
        cols = offsets[1, :, None] + torch.arange(width, device=images.device)
        # Broadcast (N,1,1,1), (1,C,1,1), (N,1,H,1), (N,1,1,W) into one gather of shape (N, C, H, W).
        sample_index = torch.arange(batch, device=images.device)[:, None, None, None]
        channel_index = torch.arange(channels, device=images.device)[None, :, None, None]
        return padded[sample_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


class RandomHorizontalFlip(nn.Module):
    """Mirrors each sample left-to-right with probability `p`."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p = p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return images
        flip = torch.rand(images.shape[0], device=images.device) < self.p
        return torch.where(flip[:, None, None, None], images.flip(-1), images)


class Normalize(nn.Module):
    """Per-channel `(x - mean) / std`, in training and evaluation alike.

    mean and std are buffers so that a saved checkpoint carries the statistics its weights were trained with.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(value <= 0 for value in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


def build_augmentation(kind: str, mean: Sequence[float], std: Sequence[float], padding: int = 4) -> nn.Sequential:
    """The input pipeline of one training recipe, ending in normalisation.

    "cifar" is the paper's CIFAR recipe: random crop with `padding` pixels of zero padding, random horizontal
    flip, then normalisation. "none" only normalises.
    """
    if kind == "cifar":
        return nn.Sequential(RandomCropPad(padding), RandomHorizontalFlip(), Normalize(mean, std))
    if kind == "none":
        return nn.Sequential(Normalize(mean, std))
    raise ValueError(f"unknown augmentation kind {kind!r}; valid kinds: {', '.join(AUGMENTATION_KINDS)}")
