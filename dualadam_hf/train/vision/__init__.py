"""Image classification for the paper's vision experiments: data, augmentation and models for the `Trainer`."""

from .augment import AUGMENTATION_KINDS, Normalize, RandomCropPad, RandomHorizontalFlip, build_augmentation
from .data import (
    ImageSplits,
    ImageTensorDataset,
    image_splits_from_hub,
    load_cifar_splits,
    load_digits_splits,
)
from .models import BACKBONES, BasicBlock, ImageClassifier, build_vision_model, digits_net, resnet18_cifar

__all__ = [
    "AUGMENTATION_KINDS",
    "BACKBONES",
    "BasicBlock",
    "ImageClassifier",
    "ImageSplits",
    "ImageTensorDataset",
    "Normalize",
    "RandomCropPad",
    "RandomHorizontalFlip",
    "build_augmentation",
    "build_vision_model",
    "digits_net",
    "image_splits_from_hub",
    "load_cifar_splits",
    "load_digits_splits",
    "resnet18_cifar",
]
