"""Image classifiers for the paper's vision experiments, shaped for the Hugging Face `Trainer`.

`ImageClassifier.forward(pixel_values, labels=None)` returns a `SequenceClassifierOutput` whose `loss` is set
only when labels are given: the contract `Trainer.compute_loss` and `Trainer.prediction_step` rely on.
Augmentation runs inside the model, on the training device, and only while `model.training` is True.
"""

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .augment import build_augmentation


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection; a 1×1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet18_cifar(num_classes: int, in_channels: int = 3) -> nn.Sequential:
    """ResNet-18 in its CIFAR form: 3×3 stride-1 stem and no max-pool, so 32×32 inputs keep 4×4 maps at the end.

    The layout (and PyTorch's default initialisation) matches the widely used kuangliu/pytorch-cifar model the
    Adam-variant papers train: 11,173,962 parameters for 10 classes, 11,220,132 for 100.
    """
    stages = OrderedDict(
        stem=nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
    )
    channels = 64
    for stage, (width, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        stages[f"layer{stage}"] = nn.Sequential(BasicBlock(channels, width, stride), BasicBlock(width, width, 1))
        channels = width
    stages["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    stages["head"] = nn.Linear(channels, num_classes)
    return nn.Sequential(stages)


def digits_net(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """A 38 k-parameter conv net for 8×8 images (scikit-learn's digits): a fast stand-in for ResNet-18 in tests."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 16, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc=nn.Linear(32 * 4 * 4, 64),
            relu3=nn.ReLU(),
            head=nn.Linear(64, num_classes),
        )
    )


class ImageClassifier(nn.Module):
    """A backbone behind an augmentation/normalisation module, with the Trainer's input and output names."""

    # The Trainer reads this to find the model input when counting input tokens or passing inputs to metrics.
    main_input_name = "pixel_values"

    def __init__(self, backbone: nn.Module, augmentation: nn.Module):
        super().__init__()
        self.augmentation = augmentation
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.backbone(self.augmentation(pixel_values))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


BACKBONES = {"resnet18_cifar": resnet18_cifar, "digits_net": digits_net}


def build_vision_model(
    name: str, num_classes: int, mean: Sequence[float], std: Sequence[float], augmentation: str = "none"
) -> ImageClassifier:
    """Builds backbone `name` for `len(mean)`-channel images, behind the `augmentation` recipe ("cifar" or "none")."""
    if name not in BACKBONES:
        raise ValueError(f"unknown vision model {name!r}; valid names: {', '.join(BACKBONES)}")
    backbone = BACKBONES[name](num_classes, in_channels=len(mean))
    return ImageClassifier(backbone, build_augmentation(augmentation, mean, std))
