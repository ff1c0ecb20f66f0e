"""Image datasets for the vision experiments: train / validation / test splits with per-channel statistics.

Every split is a `torch.utils.data.Dataset` whose items are `{"pixel_values": float32 (C, H, W) in [0, 1],
"labels": int64 scalar}`, which `transformers.default_data_collator` stacks into a batch for
`ImageClassifier.forward`. They are torch datasets rather than `datasets.Dataset`s on purpose: the Trainer
would otherwise drop every column not named in `forward` before a lazy transform could create it.
"""

from dataclasses import dataclass

import datasets
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, Subset, random_split

IMAGE_COLUMNS = ("img", "image")
# CIFAR-100 on the Hub has both `fine_label` (100 classes, the paper's task) and `coarse_label` (20);
# CIFAR-10 has `label`. The first match wins.
LABEL_COLUMNS = ("fine_label", "label")


@dataclass(frozen=True)
class ImageSplits:
    train: Dataset
    validation: Dataset
    test: Dataset
    # Per-channel statistics of the training split, for `Normalize`.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int


class ImageTensorDataset(Dataset):
    """Integer-valued images held as uint8 (N, C, H, W), returned one at a time as float32 in [0, 1].

    uint8 storage keeps all of CIFAR in 180 MB per process (float32 would take four times that), and decoding
    once up front keeps PNG decoding out of every epoch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_value: int):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.max_value = max_value

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index].float() / self.max_value, "labels": self.labels[index]}


def load_digits_splits(seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> ImageSplits:
    """scikit-learn's bundled digits (1,797 images, 1×8×8, pixel values 0..16, 10 classes), split at random.

    The split is a seeded permutation, so the same seed always gives the same three disjoint splits.
    """
    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.uint8).unsqueeze(1)
    full = ImageTensorDataset(images, torch.from_numpy(digits.target), max_value=16)
    train, validation, test = random_split(full, fractions, generator=torch.Generator().manual_seed(seed))
    return _image_splits(train, validation, test, num_classes=10)


def load_cifar_splits(
    dataset_name: str = "uoft-cs/cifar100", validation_size: int = 5000, seed: int = 0
) -> ImageSplits:
    """CIFAR-10 or CIFAR-100 from the Hugging Face Hub (`uoft-cs/cifar10`, `uoft-cs/cifar100`).

    See `image_splits_from_hub` for the splits and statistics.
    """
    hub = datasets.load_dataset(dataset_name)
    return image_splits_from_hub(hub["train"], hub["test"], validation_size, seed)


def image_splits_from_hub(
    train_split: datasets.Dataset, test_split: datasets.Dataset, validation_size: int = 5000, seed: int = 0
) -> ImageSplits:
    """Holds out `validation_size` seeded-random images of the Hub's train split; its test split stays the test set.

    Images and labels come from the first columns named in IMAGE_COLUMNS and LABEL_COLUMNS; the label column must
    be a `ClassLabel`, which gives the number of classes. The statistics come from the remaining training
    images, as the paper computes them from the data. On the full 50,000 CIFAR training images they are the
    familiar constants: CIFAR-10 mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616); CIFAR-100 mean
    (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762).
    """
    image_column = _pick_column(train_split, IMAGE_COLUMNS, "image")
    label_column = _pick_column(train_split, LABEL_COLUMNS, "label")
    label_feature = train_split.features[label_column]
    if not isinstance(label_feature, datasets.ClassLabel):
        raise ValueError(f"label column {label_column!r} is {label_feature}, not a ClassLabel with known classes")
    full_train = _decode(train_split, image_column, label_column)
    if not 0 <= validation_size < len(full_train):
        raise ValueError(f"validation_size must lie in [0, {len(full_train)}), got {validation_size}")
    train, validation = random_split(
        full_train,
        [len(full_train) - validation_size, validation_size],
        generator=torch.Generator().manual_seed(seed),
    )
    test = _decode(test_split, image_column, label_column)
    return _image_splits(train, validation, test, num_classes=label_feature.num_classes)


def _pick_column(split: datasets.Dataset, candidates: tuple[str, ...], role: str) -> str:
    for name in candidates:
        if name in split.column_names:
            return name
    raise ValueError(
        f"no {role} column: expected one of {', '.join(candidates)}, the dataset has {', '.join(split.column_names)}"
    )


def _decode(split: datasets.Dataset, image_column: str, label_column: str) -> ImageTensorDataset:
    """Decodes every PIL image of a Hub split once, into uint8 (N, C, H, W)."""
    pixels = np.stack([np.asarray(image) for image in split[image_column]])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return ImageTensorDataset(images, torch.tensor(list(split[label_column])), max_value=255)


def _image_splits(train: Subset, validation: Dataset, test: Dataset, num_classes: int) -> ImageSplits:
    """Bundles the splits with the population mean and std per channel over every training pixel."""
    source = train.dataset
    pixels = source.images[train.indices].transpose(0, 1).flatten(1)
    # float64 for exact sums over tens of millions of pixels, one channel at a time to hold 370 MB, not 1.1 GB.
    std_mean = [torch.std_mean(channel.double() / source.max_value, correction=0) for channel in pixels]
    return ImageSplits(
        train=train,
        validation=validation,
        test=test,
        mean=tuple(mean.item() for _, mean in std_mean),
        std=tuple(std.item() for std, _ in std_mean),
        num_classes=num_classes,
    )
