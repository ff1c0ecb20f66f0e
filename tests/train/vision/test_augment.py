import pytest
import torch

from dualadam_hf.train.vision.augment import Normalize, RandomCropPad, RandomHorizontalFlip, build_augmentation

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def images(batch=16, channels=3, size=32, seed=0):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_crop_keeps_shape_and_range_and_each_sample_is_a_shifted_window_of_the_padded_image():
    x = images()
    crop = RandomCropPad(padding=4).train()
    torch.manual_seed(0)
    y = crop(x)
    assert y.shape == x.shape
    assert 0.0 <= y.min() and y.max() <= 1.0
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    offsets = []
    for sample, cropped in zip(padded, y):
        windows = [
            (i, j) for i in range(9) for j in range(9) if torch.equal(sample[:, i : i + 32, j : j + 32], cropped)
        ]
        assert windows, "a cropped sample is not a 32×32 window of its padded image"
        offsets.append(windows[0])
    assert len(set(offsets)) > 1, "all samples got the same offset"
    assert any(offset != (4, 4) for offset in offsets), "no sample was shifted"


def test_crop_is_repeatable_under_manual_seed():
    x = images()
    crop = RandomCropPad().train()
    torch.manual_seed(1)
    first = crop(x)
    torch.manual_seed(1)
    assert torch.equal(crop(x), first)
    assert not torch.equal(crop(x), first)


def test_flip_mirrors_some_samples_and_leaves_the_rest():
    x = images(batch=64)
    flip = RandomHorizontalFlip(p=0.5).train()
    torch.manual_seed(0)
    y = flip(x)
    flipped = [torch.equal(a, b.flip(-1)) for a, b in zip(y, x)]
    kept = [torch.equal(a, b) for a, b in zip(y, x)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


@pytest.mark.parametrize("p, expect_flipped", [(0.0, False), (1.0, True)])
def test_flip_probability_extremes(p, expect_flipped):
    x = images()
    y = RandomHorizontalFlip(p=p).train()(x)
    assert torch.equal(y, x.flip(-1) if expect_flipped else x)


def test_normalize_uses_the_given_mean_and_std_per_channel():
    x = images()
    y = Normalize(MEAN, STD)(x)
    for channel, (mean, std) in enumerate(zip(MEAN, STD)):
        torch.testing.assert_close(y[:, channel], (x[:, channel] - mean) / std)


def test_normalize_rejects_bad_statistics():
    with pytest.raises(ValueError):
        Normalize((0.5, 0.5), (0.2,))
    with pytest.raises(ValueError):
        Normalize((0.5,), (0.0,))


def test_cifar_pipeline_is_the_papers_crop_flip_normalise():
    pipeline = build_augmentation("cifar", MEAN, STD)
    assert [type(module) for module in pipeline] == [RandomCropPad, RandomHorizontalFlip, Normalize]
    assert pipeline[0].padding == 4 and pipeline[1].p == 0.5


def test_cifar_pipeline_in_eval_mode_only_normalises_and_is_deterministic():
    x = images()
    pipeline = build_augmentation("cifar", MEAN, STD).eval()
    expected = Normalize(MEAN, STD)(x)
    assert torch.equal(pipeline(x), expected)
    assert torch.equal(pipeline(x), expected)


def test_cifar_pipeline_in_training_mode_augments_then_normalises():
    x = images()
    pipeline = build_augmentation("cifar", MEAN, STD).train()
    torch.manual_seed(0)
    y = pipeline(x)
    assert y.shape == x.shape
    assert not torch.equal(y, Normalize(MEAN, STD)(x))
    # Undoing the normalisation gives back pixels in [0, 1]: zero padding never leaves the range.
    raw = y * torch.tensor(STD).view(-1, 1, 1) + torch.tensor(MEAN).view(-1, 1, 1)
    assert raw.min() > -1e-6 and raw.max() < 1 + 1e-6


def test_none_pipeline_only_normalises_in_training_mode_too():
    x = images()
    pipeline = build_augmentation("none", MEAN, STD).train()
    assert torch.equal(pipeline(x), Normalize(MEAN, STD)(x))


def test_unknown_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match="cifar, none"):
        build_augmentation("autoaugment", MEAN, STD)
