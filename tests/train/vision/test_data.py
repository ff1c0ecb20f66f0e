import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import default_data_collator

from dualadam_hf.train.vision.data import image_splits_from_hub, load_digits_splits


def all_pixels_and_labels(split):
    batch = default_data_collator([split[i] for i in range(len(split))])
    return batch["pixel_values"], batch["labels"]


def test_digits_splits_cover_the_dataset_disjointly():
    splits = load_digits_splits(seed=0)
    indices = [set(split.indices) for split in (splits.train, splits.validation, splits.test)]
    assert sum(len(i) for i in indices) == 1797
    assert set.union(*indices) == set(range(1797))
    assert [len(i) for i in indices] == [1258, 270, 269]
    assert splits.num_classes == 10


def test_digits_items_are_unit_range_images_with_int64_labels():
    splits = load_digits_splits(seed=0)
    item = splits.train[0]
    assert item["pixel_values"].shape == (1, 8, 8) and item["pixel_values"].dtype == torch.float32
    assert item["labels"].shape == () and item["labels"].dtype == torch.int64
    pixels, labels = all_pixels_and_labels(splits.train)
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    assert set(labels.tolist()) == set(range(10))


def test_digits_split_depends_on_the_seed_only():
    first, again, other = load_digits_splits(seed=0), load_digits_splits(seed=0), load_digits_splits(seed=1)
    assert first.train.indices == again.train.indices and first.test.indices == again.test.indices
    assert first.train.indices != other.train.indices
    assert first.mean == again.mean and first.mean != other.mean


def test_digits_statistics_come_from_the_training_split():
    splits = load_digits_splits(seed=0)
    pixels, _ = all_pixels_and_labels(splits.train)
    assert splits.mean == pytest.approx((pixels.double().mean().item(),))
    assert splits.std == pytest.approx((pixels.double().std(correction=0).item(),))


def fake_hub_split(num_images, label_columns, seed):
    """A tiny in-memory stand-in for a CIFAR split on the Hub: PIL images plus ClassLabel columns."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(num_images, 32, 32, 3), dtype=np.uint8)
    columns = {"img": [PIL.Image.fromarray(image) for image in pixels]}
    features = {"img": datasets.Image()}
    for name, num_classes in label_columns.items():
        columns[name] = rng.integers(0, num_classes, size=num_images).tolist()
        features[name] = datasets.ClassLabel(num_classes=num_classes)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)), pixels, columns


def test_cifar100_layout_uses_fine_labels_and_decodes_images_exactly():
    label_columns = {"fine_label": 100, "coarse_label": 20}
    train, train_pixels, train_columns = fake_hub_split(40, label_columns, seed=0)
    test, test_pixels, test_columns = fake_hub_split(10, label_columns, seed=1)
    splits = image_splits_from_hub(train, test, validation_size=8, seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (32, 8, 10)
    assert splits.num_classes == 100
    item = splits.test[3]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    expected = torch.from_numpy(test_pixels[3]).permute(2, 0, 1).float() / 255
    assert torch.equal(item["pixel_values"], expected)
    assert item["labels"].item() == test_columns["fine_label"][3]
    index = splits.validation.indices[0]
    assert splits.validation[0]["labels"].item() == train_columns["fine_label"][index]
    assert set(splits.train.indices).isdisjoint(splits.validation.indices)


def test_cifar10_layout_uses_label_and_training_statistics():
    train, train_pixels, _ = fake_hub_split(30, {"label": 10}, seed=2)
    test, _, _ = fake_hub_split(5, {"label": 10}, seed=3)
    splits = image_splits_from_hub(train, test, validation_size=10, seed=0)
    assert splits.num_classes == 10
    training_pixels = train_pixels[splits.train.indices].astype(np.float64) / 255
    np.testing.assert_allclose(splits.mean, training_pixels.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(splits.std, training_pixels.std(axis=(0, 1, 2)))
    again = image_splits_from_hub(train, test, validation_size=10, seed=0)
    other = image_splits_from_hub(train, test, validation_size=10, seed=1)
    assert again.validation.indices == splits.validation.indices != other.validation.indices


def test_missing_label_column_is_named():
    train, _, _ = fake_hub_split(4, {"coarse_label": 20}, seed=0)
    with pytest.raises(ValueError, match="fine_label, label.*img, coarse_label"):
        image_splits_from_hub(train, train, validation_size=1)


def test_label_column_without_class_names_is_refused():
    train = datasets.Dataset.from_dict(
        {"img": [PIL.Image.new("RGB", (32, 32))] * 4, "label": [0, 1, 2, 3]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}),
    )
    with pytest.raises(ValueError, match="ClassLabel"):
        image_splits_from_hub(train, train, validation_size=1)


def test_validation_size_must_leave_training_images():
    train, _, _ = fake_hub_split(4, {"label": 10}, seed=0)
    with pytest.raises(ValueError, match="validation_size"):
        image_splits_from_hub(train, train, validation_size=4)
