import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments, default_data_collator

from dualadam_hf.train.vision.augment import Normalize
from dualadam_hf.train.vision.data import load_digits_splits
from dualadam_hf.train.vision.models import build_vision_model, digits_net, resnet18_cifar

MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def resnet18_cifar_parameter_formula(num_classes):
    """Counted from the architecture by hand: weights of bias-free convs, weight and bias of every BatchNorm."""

    def conv_bn(in_channels, out_channels, kernel):
        return in_channels * out_channels * kernel * kernel + 2 * out_channels

    total = conv_bn(3, 64, 3)
    in_channels = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block_stride in (stride, 1):
            total += conv_bn(in_channels, width, 3) + conv_bn(width, width, 3)
            if block_stride != 1 or in_channels != width:
                total += conv_bn(in_channels, width, 1)
            in_channels = width
    return total + 512 * num_classes + num_classes


@pytest.mark.parametrize("num_classes, reference", [(10, 11_173_962), (100, 11_220_132)])
def test_resnet18_cifar_parameter_count(num_classes, reference):
    count = count_parameters(resnet18_cifar(num_classes))
    assert count == resnet18_cifar_parameter_formula(num_classes)
    assert count == reference


def test_resnet18_cifar_keeps_spatial_size_through_the_stem():
    stem = resnet18_cifar(100).stem
    assert stem(torch.rand(2, 3, 32, 32)).shape == (2, 64, 32, 32)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in resnet18_cifar(100).modules())


def test_classifier_gives_logits_and_the_mean_cross_entropy():
    torch.manual_seed(0)
    model = build_vision_model("resnet18_cifar", 100, MEAN, STD, augmentation="cifar").eval()
    pixel_values = torch.rand(4, 3, 32, 32)
    labels = torch.tensor([0, 5, 42, 99])
    with_labels = model(pixel_values, labels=labels)
    assert with_labels.logits.shape == (4, 100)
    torch.testing.assert_close(with_labels.loss, F.cross_entropy(with_labels.logits, labels))
    without_labels = model(pixel_values)
    assert without_labels.loss is None
    assert list(without_labels.keys()) == ["logits"]
    torch.testing.assert_close(without_labels.logits, with_labels.logits)


def test_classifier_augments_only_in_training_mode():
    torch.manual_seed(0)
    model = build_vision_model("resnet18_cifar", 10, MEAN, STD, augmentation="cifar")
    pixel_values = torch.rand(8, 3, 32, 32)
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model.eval()
    model(pixel_values)
    model(pixel_values)
    model.train()
    model(pixel_values)
    clean = Normalize(MEAN, STD)(pixel_values)
    assert torch.equal(seen[0], clean) and torch.equal(seen[1], clean)
    assert not torch.equal(seen[2], clean)


def test_digits_net_forward_and_size():
    model = digits_net(10)
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert 10_000 < count_parameters(model) < 100_000


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ValueError, match="resnet18_cifar, digits_net"):
        build_vision_model("resnet50", 10, MEAN, STD)


def test_digits_net_learns_digits_with_adam():
    splits = load_digits_splits(seed=0)
    torch.manual_seed(0)
    model = build_vision_model("digits_net", splits.num_classes, splits.mean, splits.std)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True, collate_fn=default_data_collator)
    model.train()
    for _ in range(10):
        for batch in loader:
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
    model.eval()
    validation = default_data_collator([splits.validation[i] for i in range(len(splits.validation))])
    with torch.no_grad():
        predictions = model(validation["pixel_values"]).logits.argmax(-1)
    accuracy = (predictions == validation["labels"]).float().mean().item()
    assert accuracy > 0.9


def test_classifier_follows_the_trainer_conventions(tmp_path):
    splits = load_digits_splits(seed=0)
    torch.manual_seed(0)
    model = build_vision_model("digits_net", splits.num_classes, splits.mean, splits.std)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=64,
        max_steps=20,
        learning_rate=3e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        # Counting "tokens" needs the model's main_input_name to find pixel_values in the batch.
        include_num_input_tokens_seen=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=splits.train, eval_dataset=splits.validation)
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert trainer.state.num_input_tokens_seen > 0
    assert "eval_loss" in trainer.evaluate()
    prediction = trainer.predict(splits.test)
    assert prediction.predictions.shape == (len(splits.test), 10)
    assert np.array_equal(prediction.label_ids, [splits.test[i]["labels"].item() for i in range(len(splits.test))])
