"""Distributed fine-tuning with the shipped accelerate configs (DDP, ZeRO-2, ZeRO-3, FSDP2), on CPU:
two processes over gloo, each run compared with one process that sees the same global batches.

Same batches: the Trainer's sampler is seeded (Accelerate's seedable sampler: the same permutation on
every process), and Accelerate deals the per-device batches of that permutation round-robin
(split_batches=False): at step k rank r takes per-device batch 2k + r, so the two ranks of 4 together
see the one process's batch of 8. The training loss is normalised by the label tokens of the whole
global batch (the Trainer gathers num_items_in_batch), so it is the one-process loss up to the order
of floating-point reductions.

The tiny recipe packs its batches (padding-free): every two-process run below trains packed and is
compared with a one-process run of padded batches, so each also checks that packing changes neither
the steps' losses nor the whole-set evaluation under DDP, ZeRO-2/3 and FSDP2; `ddp_padded` keeps the
padded layout covered under two processes.

Every run: 8 optimizer steps of DualAdam with switch_ratio=1.0 (alpha_t = 1 - t/8, non-zero until the
last step, so a counter restarted by a resume would show), an evaluation before the first step (the
same weights everywhere: the whole-set measures must agree to float precision; 15 validation
examples, so the last evaluation batch is uneven across ranks), a checkpoint at step 4 and an
evaluation at the end.

On CPU, `--cpu` is not passed: it selects Accelerate's single-process launcher whatever the config.
The recipe's `use_cpu: true` makes the processes CPU ones. FSDP runs go through tests/fsdp_on_cpu.py,
because Accelerate enables FSDP only on GPU-like devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dualadam_hf.hf.trainer import zero3_partitions_in_groups
from dualadam_hf.optim.dualadam import DualAdam

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
CHECKPOINT_STEP = 4
# alpha_t = 1 - xi * t with xi = 1 / (switch_ratio * max_steps) = 1/8
EXPECTED_ALPHA = {step: 1.0 - step / STEPS for step in range(1, STEPS + 1)}
RUN = [
    "recipes/tiny_alpaca.yaml", "--max_steps", str(STEPS), "--max_train_samples", "64", "--max_eval_samples", "15",
    "--optim_args", "switch_ratio=1.0", "--logging_steps", "1", "--eval_strategy", "no", "--eval_on_start", "true",
    "--save_strategy", "steps", "--save_steps", str(CHECKPOINT_STEP), "--disable_tqdm", "true", "--report_to", "none",
]
# What a checkpoint holds shows that the config did what it says: two optimizer partitions for ZeRO,
# two model partitions for ZeRO-3, two DCP shards of model and optimizer for FSDP2.
SHARDED_FILES = {
    "ddp": ["optimizer.pt", "rng_state_1.pth"],
    "zero2": [f"global_step{CHECKPOINT_STEP}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)],
    "zero3": [
        f"global_step{CHECKPOINT_STEP}/zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"
        for rank in (0, 1)
        for kind in ("model", "optim")
    ],
    "fsdp": [f"{folder}/__{rank}_0.distcp" for folder in ("pytorch_model_fsdp_0", "optimizer_0") for rank in (0, 1)],
}


def launch(launcher_args: list[str], script_args: list[str], output_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, *script_args,
               "--output_dir", str(output_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def launch_two(config_file: Path, output_dir: Path, *flags: str, fsdp: bool = False) -> subprocess.CompletedProcess:
    launcher = ["--config_file", str(config_file), "--num_processes", "2", "--mixed_precision", "no",
                "--main_process_port", "0"]
    script = ["tests/fsdp_on_cpu.py", "scripts/finetune.py"] if fsdp else ["scripts/finetune.py"]
    return launch(launcher, [*script, *RUN, "--per_device_train_batch_size", "4", *flags], output_dir)


def succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    assert "x 2 processes = 8 examples per optimizer step" in result.stdout


def deepspeed_launch_config(directory: Path, settings: dict) -> Path:
    """An accelerate config that points at a DeepSpeed JSON holding ``settings``."""
    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "gradient_clipping": "auto", **settings}
    (directory / "ds_config.json").write_text(json.dumps(ds_config))
    launch_config = directory / "accelerate.yaml"
    launch_config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "num_machines": 1,
        "deepspeed_config": {"deepspeed_config_file": str(directory / "ds_config.json"), "zero3_init_flag": False},
    }))
    return launch_config


def history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def by_step(log: list[dict], key: str) -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in log if key in entry}


def evaluations(log: list[dict]) -> list[dict]:
    return [entry for entry in log if "eval_loss" in entry]


def max_relative_loss_difference(log: list[dict], reference_log: list[dict]) -> float:
    loss, reference_loss = by_step(log, "loss"), by_step(reference_log, "loss")
    assert sorted(loss) == sorted(reference_loss) == list(range(1, STEPS + 1))
    return max(abs(loss[step] - reference_loss[step]) / abs(reference_loss[step]) for step in loss)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, per-device batch 8: the run every two-process run is compared with."""
    output_dir = tmp_path_factory.mktemp("one_process")
    launcher = ["--num_processes", "1", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]
    result = launch(
        launcher, ["scripts/finetune.py", *RUN, "--per_device_train_batch_size", "8", "--packing", "false"], output_dir
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert by_step(history(output_dir), "dualadam_alpha") == pytest.approx(EXPECTED_ALPHA, abs=1e-12)
    return output_dir


@pytest.fixture(scope="module")
def shipped_config_run(tmp_path_factory):
    """Config name -> output directory of its two-process run, launched once, on first use. "ddp_padded" is
    the DDP config with packing off."""
    output_dirs: dict[str, Path] = {}

    def run(config: str) -> Path:
        if config not in output_dirs:
            output_dir = tmp_path_factory.mktemp(config)
            shipped, _, padded = config.partition("_")
            flags = ["--packing", "false"] if padded else []
            config_file = ROOT / "recipes" / "accelerate" / f"{shipped}.yaml"
            succeeded(launch_two(config_file, output_dir, *flags, fsdp=shipped == "fsdp"))
            output_dirs[config] = output_dir
        return output_dirs[config]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "ddp_padded", "zero2", "zero3", "fsdp"])
def test_two_processes_train_like_one(config, reference, shipped_config_run):
    output_dir = shipped_config_run(config)
    log, reference_log = history(output_dir), history(reference)

    for name in SHARDED_FILES[config.partition("_")[0]]:
        assert (output_dir / f"checkpoint-{CHECKPOINT_STEP}" / name).is_file(), name
    # DualAdam did the steps, behind the config's wrappers, with alpha_t from its own step counters
    assert by_step(log, "dualadam_alpha") == pytest.approx(EXPECTED_ALPHA, abs=1e-12)

    # the non-pad tokens trained on are summed over the processes: the one process's count
    train_results = json.loads((output_dir / "train_results.json").read_text())
    assert train_results["train_nonpad_tokens"] == json.loads((reference / "train_results.json").read_text())[
        "train_nonpad_tokens"
    ]

    difference = max_relative_loss_difference(log, reference_log)
    print(f"{config}: max relative difference of the training loss to one process: {difference:.2e}")
    assert difference < 5e-3

    # Before training the weights are the same everywhere: whole-set measures, not one rank's share
    first, reference_first = evaluations(log)[0], evaluations(reference_log)[0]
    assert first["step"] == reference_first["step"] == 0
    for key in ("eval_loss", "eval_train_loss", "eval_gen_gap"):
        assert first[key] == pytest.approx(reference_first[key], rel=1e-5, abs=1e-6), key
    assert evaluations(log)[-1]["eval_loss"] == pytest.approx(evaluations(reference_log)[-1]["eval_loss"], rel=0.03)

    # the model the run hands over is one loadable file (gathered under ZeRO-3 and FSDP2), the one-process weights
    weights, reference_weights = load_file(output_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == reference_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference_weights[name], rtol=0, atol=1e-3, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2", "fsdp"])
def test_resume_from_a_sharded_checkpoint(config, shipped_config_run, tmp_path):
    uninterrupted = shipped_config_run(config)
    checkpoint = uninterrupted / f"checkpoint-{CHECKPOINT_STEP}"
    succeeded(launch_two(ROOT / "recipes" / "accelerate" / f"{config}.yaml", tmp_path,
                         "--resume_from_checkpoint", str(checkpoint), fsdp=config == "fsdp"))
    resumed, full = history(tmp_path), history(uninterrupted)

    assert evaluations(resumed)[-1]["eval_loss"] == pytest.approx(evaluations(full)[-1]["eval_loss"], abs=1e-4)
    # the steps after the checkpoint continue alpha_t from the restored step counters
    after = {step: alpha for step, alpha in by_step(resumed, "dualadam_alpha").items() if step > CHECKPOINT_STEP}
    assert after == pytest.approx({step: EXPECTED_ALPHA[step] for step in range(CHECKPOINT_STEP + 1, STEPS + 1)})


@pytest.mark.slow
def test_zero3_sub_groups_each_count_their_steps(reference, tmp_path):
    """ZeRO-3 steps DualAdam once per sub-group, each a flat partition in its own state: with small
    sub-groups every state's counter still equals the optimizer steps, and alpha_t is right."""
    config = deepspeed_launch_config(tmp_path, {"zero_optimization": {"stage": 3, "sub_group_size": 20_000}})
    succeeded(launch_two(config, tmp_path / "run"))
    log = history(tmp_path / "run")

    assert by_step(log, "dualadam_alpha") == pytest.approx(EXPECTED_ALPHA, abs=1e-12)
    assert max_relative_loss_difference(log, history(reference)) < 5e-3
    partition = tmp_path / "run" / f"checkpoint-{CHECKPOINT_STEP}" / f"global_step{CHECKPOINT_STEP}"
    saved = torch.load(partition / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    state = saved["optimizer_state_dict"]["optimizer_state_dict"]
    assert len(state["state"]) > len(state["param_groups"])  # several sub-groups per param group
    assert {float(entry["step"]) for entry in state["state"].values()} == {float(CHECKPOINT_STEP)}


@pytest.mark.slow
def test_zero_offload_with_the_flag_steps_dualadam(reference, tmp_path):
    config = deepspeed_launch_config(tmp_path, {
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "zero_force_ds_cpu_optimizer": False,
    })
    succeeded(launch_two(config, tmp_path / "run"))
    log = history(tmp_path / "run")

    assert by_step(log, "dualadam_alpha") == pytest.approx(EXPECTED_ALPHA, abs=1e-12)
    assert max_relative_loss_difference(log, history(reference)) < 5e-3


REPLACING_CONFIGS = {
    "optimizer_block": (
        {"zero_optimization": {"stage": 2},
         "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}},
        "DeepSpeed config has an 'optimizer' block: it would replace DualAdam (optim=dualadam); remove the block",
    ),
    "offload_without_flag": (
        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
        (
            "DeepSpeed config offloads the optimizer to cpu: Accelerate would replace DualAdam (optim=dualadam) with "
            'DeepSpeedCPUAdam; add "zero_force_ds_cpu_optimizer": false to the DeepSpeed config'
        ),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", REPLACING_CONFIGS)
def test_deepspeed_config_that_replaces_dualadam_is_refused(case, tmp_path):
    settings, message = REPLACING_CONFIGS[case]
    result = launch_two(deepspeed_launch_config(tmp_path, settings), tmp_path / "run")

    assert result.returncode != 0
    # each process says it in one line, without a traceback of ours; nothing was trained. (The two
    # processes write to one stderr at once, so a line's newline may land after the other's line.)
    assert result.stderr.count(f"error: {message}") == 2, result.stderr[-4000:]
    assert "DeepSpeedConfigError" not in result.stderr
    assert "'loss'" not in result.stdout
    assert not (tmp_path / "run" / "trainer_state.json").exists()


@pytest.mark.slow
def test_rescaled_invadam_term_is_refused_under_zero_before_any_loading(tmp_path):
    # ZeRO hands DualAdam flat partitions: a per-tensor norm there would be a per-partition one
    config = deepspeed_launch_config(tmp_path, {"zero_optimization": {"stage": 2}})
    result = launch_two(config, tmp_path / "run", "--optim_args", "switch_ratio=1.0,inv_scale=adam_rms")

    assert result.returncode != 0
    message = ("error: optim_args: inv_scale=adam_rms rescales per whole tensor, but DeepSpeed hands the optimizer "
               "shards of tensors")
    assert result.stderr.count(message) == 2, result.stderr[-4000:]
    assert "data: train:" not in result.stdout + result.stderr and not (tmp_path / "run").exists()  # nothing loaded



def test_a_launch_precision_that_disagrees_with_the_recipe_is_one_line_per_rank(tmp_path):
    # the shipped ZeRO-2 config says mixed_precision: bf16; the tiny recipe trains in fp32
    launcher = ["--config_file", "recipes/accelerate/zero2.yaml", "--num_processes", "2", "--main_process_port", "0"]
    result = launch(launcher, ["scripts/finetune.py", *RUN], tmp_path / "run")

    assert result.returncode != 0
    message = ("error: precision: the accelerate launch config sets mixed_precision=bf16 but the recipe trains in fp32, "
               "and DeepSpeed needs the two to agree: launch with --mixed_precision no, or set bf16: true in the recipe\n")
    assert result.stderr.count(message) == 2, result.stderr[-4000:]
    assert "mismatch" not in result.stderr  # DeepSpeed's own many-line refusal never comes
    assert "data: train:" not in result.stdout + result.stderr and not (tmp_path / "run").exists()

class FakeZero3:
    """What zero3_partitions_in_groups reads of DeepSpeed's ZeRO-3 optimizer, and how it steps."""

    def __init__(self, optimizer: DualAdam, flats: list[torch.Tensor], sub_group_to_group_id: dict[int, int]):
        self.optimizer = optimizer
        self.fp32_partitioned_groups_flat = flats
        self.sub_group_to_group_id = sub_group_to_group_id

    def step(self) -> None:
        for sub_group, group_index in self.sub_group_to_group_id.items():
            flat = self.fp32_partitioned_groups_flat[sub_group]
            flat.grad = torch.ones_like(flat)
            self.optimizer.param_groups[group_index]["params"] = [flat]
            self.optimizer.step()
            self.optimizer.param_groups[group_index]["params"] = []


def test_zero3_partitions_are_visible_while_reading():
    flats = [torch.zeros(3), torch.zeros(2), torch.zeros(4)]
    optimizer = DualAdam([{"params": [flats[0]]}, {"params": [flats[2]]}], lr=0.1, switch_rate=0.25)
    zero3 = FakeZero3(optimizer, flats, {0: 0, 1: 0, 2: 1})
    for group in optimizer.param_groups:
        group["params"] = []
    wrapped = type("AcceleratedOptimizer", (), {"optimizer": zero3})()
    for _ in range(2):
        zero3.step()

    assert optimizer.latest_alpha() is None  # what DeepSpeed leaves between steps
    with zero3_partitions_in_groups(wrapped):
        assert [len(group["params"]) for group in optimizer.param_groups] == [2, 1]
        assert optimizer.latest_alpha() == pytest.approx(0.5)
    assert [group["params"] for group in optimizer.param_groups] == [[], []]
    with zero3_partitions_in_groups(optimizer):  # not ZeRO-3: nothing changes
        assert optimizer.latest_alpha() is None
