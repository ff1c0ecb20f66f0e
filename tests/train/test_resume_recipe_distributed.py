"""An accepted resume change takes effect under ZeRO-2, ZeRO-3 and FSDP2 as in one process
(tests/train/test_resume_recipe.py): two CPU processes, the shipped accelerate configs, the launch helpers of
tests/train/test_distributed.py.

DeepSpeed loads the checkpoint's optimizer groups (learning rate and xi included) into its base optimizer in
``deepspeed_load_checkpoint``; the Trainer's ``_load_optimizer_and_scheduler`` runs after it, and the accepted
values are put back there into the groups that DualAdam steps with. A 2-step run saves at step 2, with
xi = switch_rate = 0.1; the resume runs steps 3 and 4 at a new learning rate and xi = 0.05.
"""

from __future__ import annotations

import pytest
import torch

from train.test_distributed import ROOT, by_step, history, launch_two, succeeded

# short: no evaluation before training, a small evaluation after it; a checkpoint every 2 steps
SHORT = ["--max_train_samples", "32", "--max_eval_samples", "4", "--eval_on_start", "false", "--save_steps", "2"]
# where each ZeRO stage keeps its base optimizer's state_dict in the optimizer file it saves
BASE_OPTIMIZER_STATE = {"zero2": "base_optimizer_state", "zero3": "optimizer_state_dict"}


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2", "zero3", "fsdp"])
def test_an_accepted_learning_rate_and_switch_rate_take_effect_under_sharding(config, tmp_path):
    config_file, fsdp = ROOT / "recipes" / "accelerate" / f"{config}.yaml", config == "fsdp"
    succeeded(launch_two(config_file, tmp_path, *SHORT, "--max_steps", "2", "--optim_args", "switch_rate=0.1",
                         fsdp=fsdp))
    resumed = launch_two(config_file, tmp_path, *SHORT, "--max_steps", "4", "--resume_from_checkpoint", "latest",
                         "--learning_rate", "1e-3", "--optim_args", "switch_rate=0.05",
                         "--resume_accept_changes", "learning_rate,switch_rate", fsdp=fsdp)
    succeeded(resumed)
    assert "applying from step 2: learning_rate 0.003 -> 0.001; switch_rate 0.1 -> 0.05" in resumed.stdout

    log = history(tmp_path)
    assert by_step(log, "learning_rate") == pytest.approx({1: 3e-3, 2: 3e-3, 3: 1e-3, 4: 1e-3})
    # alpha_t = 1 - xi t: the step counters continue, with the new xi
    assert by_step(log, "dualadam_alpha") == pytest.approx({1: 0.9, 2: 0.8, 3: 0.85, 4: 0.8}, abs=1e-12)
    if config in BASE_OPTIMIZER_STATE:
        # the groups DeepSpeed saved after the resume are its base optimizer's, the ones DualAdam stepped with
        for rank in (0, 1):
            partition = tmp_path / "checkpoint-4" / "global_step4" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            saved = torch.load(partition, weights_only=False)["optimizer_state_dict"][BASE_OPTIMIZER_STATE[config]]
            assert {(group["lr"], group["switch_rate"]) for group in saved["param_groups"]} == {(1e-3, 0.05)}
