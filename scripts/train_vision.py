"""Train an image classifier (ResNet-18 on CIFAR-10/100, or a small net on scikit-learn digits) with DualAdam
or any HF optimizer, through the same Trainer, recipes and metrics as scripts/finetune.py.

Usage:
    python scripts/train_vision.py RECIPE.yaml [--key value ...]
    OMP_NUM_THREADS=1 python scripts/train_vision.py recipes/vision_digits.yaml    # offline, CPU, seconds
    python scripts/train_vision.py recipes/vision_digits.yaml --optim adamw_torch --optim_args "" \
        --weight_decay 0.01 --output_dir outputs/vision_digits_adamw
    python scripts/train_vision.py recipes/vision_cifar.yaml --dry_run true         # check it offline
    accelerate launch scripts/train_vision.py recipes/vision_cifar.yaml --dataset_name uoft-cs/cifar10 \
        --output_dir outputs/vision_cifar10_dualadam

The recipe's keys are field names of VisionArguments and TrainingArguments (run with --help to list them);
flags given on the command line win over the recipe.
"""

import sys

try:
    from dualadam_hf.train.vision.train import main
except KeyboardInterrupt:  # Ctrl-C while the libraries load (seconds): nothing has started, nothing to say
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main(prog="train_vision.py", description=__doc__))
