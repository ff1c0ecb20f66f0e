"""scripts/finetune.py end to end on the embedded default, dry runs of the openPangu recipes, LoRA, resume."""

from __future__ import annotations

import json

import datasets
import pytest
import torch.distributed as dist
import transformers
from one_process_group import one_process_group
from tiny_runs import dry_run_in

from dualadam_hf.train.cli import script_main
from dualadam_hf.train.finetune import ARGUMENT_TYPES, describe, main
from dualadam_hf.train.sft_data import DataError

TINY = "recipes/tiny_alpaca.yaml"
# a few steps on a slice of the sample: seconds on a CPU
SHORT = ["--max_steps", "4", "--eval_steps", "2", "--logging_steps", "1", "--max_train_samples", "32",
         "--max_eval_samples", "8", "--per_device_train_batch_size", "4", "--disable_tqdm", "true"]


def history(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not load weights or data")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "recipe,optimizer",
    [("recipes/pangu_alpaca.yaml", "dualadam"), ("recipes/pangu_alpaca_adamw.yaml", "adamw_torch_fused")],
)
def test_dry_run_of_the_openpangu_recipes_is_offline(recipe, optimizer, tmp_path, capsys, no_downloads):
    assert main([recipe, *dry_run_in(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FreedomIntelligence/openPangu-Embedded-1B (trust_remote_code=False" in out
    assert "llm-wizard/alpaca-gpt4-data-zh" in out
    assert f"optimizer:       {optimizer}" in out
    assert "4 per device x 8 accumulation x 1 processes = 32 examples per optimizer step" in out
    assert "bf16 mixed" in out
    assert "packing:         on (padding-free batches for training and evaluation; attention: packed_sdpa: torch's varlen FlashAttention kernel" in out


def test_dry_run_says_whether_packing_is_on_and_how_examples_are_kept_apart(tmp_path, capsys, no_downloads):
    assert main([TINY, *dry_run_in(tmp_path), "--packing", "false"]) == 0
    assert "packing:         off (each batch right-padded to its longest example)" in capsys.readouterr().out
    assert main([TINY, *dry_run_in(tmp_path), "--attn_implementation", "eager"]) == 0
    assert "attention: eager, kept apart by a block-diagonal mask; use_cache off" in capsys.readouterr().out
    assert main([TINY, *dry_run_in(tmp_path), "--attn_implementation", "flash_attention_2"]) == 0
    assert "attention: flash_attention_2, kept apart by the example boundaries" in capsys.readouterr().out


def test_packing_with_an_attention_that_cannot_keep_examples_apart_is_refused_before_loading(tmp_path, capsys, no_downloads):
    out = tmp_path / "run"
    assert main([TINY, "--output_dir", str(out), "--attn_implementation", "paged|eager"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: packing: attn_implementation=paged|eager cannot keep packed examples apart; use one of eager, sdpa, "
        "packed_sdpa, flex_attention, flash_attention_2, flash_attention_3, flash_attention_4, or set packing: false\n"
    )
    assert not out.exists()


def test_a_model_found_unable_to_pack_once_loaded_exits_2_in_one_line(tmp_path, capsys, monkeypatch):
    from dualadam_hf.hf import packing

    message = "packing: llama does not run its attention through transformers' attention interface"

    def cannot(model):
        raise packing.PackingError(message)

    monkeypatch.setattr(packing, "prepare_for_packing", cannot)
    out = tmp_path / "run"
    assert main([TINY, "--output_dir", str(out), *SHORT]) == 2
    assert capsys.readouterr().err.endswith(f"error: {message}\n")
    assert not (out / "model.safetensors").exists() and not (out / "train_results.json").exists()


def test_dry_run_names_xi_and_the_step_where_alpha_reaches_zero(tmp_path, capsys, no_downloads):
    assert main([TINY, *dry_run_in(tmp_path), "--optim_args", "switch_rate=0.004"]) == 0
    assert "xi = 0.004: alpha reaches 0 at step 250" in capsys.readouterr().out
    assert main([TINY, *dry_run_in(tmp_path), "--max_steps", "200"]) == 0
    assert "alpha reaches 0 at step 60" in capsys.readouterr().out


def test_dry_run_names_the_rescaled_invadam_term_and_refuses_it_under_sharding(tmp_path, capsys, monkeypatch,
                                                                                 no_downloads):
    rescaled = ["--optim_args", "switch_ratio=0.3,inv_scale=adam_rms"]
    assert main([TINY, *dry_run_in(tmp_path), *rescaled]) == 0
    assert "inv_scale adam_rms: the InvAdam term is rescaled, per tensor, to the Adam term's norm" in capsys.readouterr().out
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    assert main([TINY, *dry_run_in(tmp_path), *rescaled]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: optim_args: inv_scale=adam_rms rescales per whole tensor, but FSDP hands")
    assert err.count("\n") == 1


def test_unknown_key_exits_2_with_one_line(tmp_path, capsys):
    assert main([TINY, "--output_dir", str(tmp_path / "run"), "--lora_rank", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: command line: unknown key 'lora_rank'") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_bad_optim_args_exit_2_before_any_loading(tmp_path, capsys):
    assert main([TINY, "--output_dir", str(tmp_path / "run"), "--optim_args", "switch_rat=0.1"]) == 2
    assert "unknown key 'switch_rat' for optim=dualadam" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_record_without_output_stops_the_run_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", "input": ""}\n')
    assert main([TINY, "--output_dir", str(tmp_path / "run"), "--dataset_name", str(data)]) == 1
    assert "bad.jsonl: record 1 has no field 'output'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_tiny_recipe_runs_and_leaves_state_metrics_and_model(tmp_path):
    out = tmp_path / "run"
    assert main([TINY, "--output_dir", str(out), *SHORT]) == 0
    log = history(out)
    assert [e["step"] for e in log if "dualadam_alpha" in e] == [1, 2, 3, 4]
    evals = [e for e in log if "eval_ppl" in e]
    assert evals and all({"eval_loss", "eval_train_loss", "eval_gen_gap"} <= set(e) for e in evals)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "train_results.json", "eval_results.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "run_config.json").read_text())
    assert config["optim"] == "dualadam" and config["model"] == "builtin:tiny-llama"
    train_results = json.loads((out / "train_results.json").read_text())
    assert "train_truncated_examples" in train_results
    # the recipe packs: the summary says how much padding that removed, and the non-pad throughput
    assert 0.05 < train_results["train_padding_share"] < 0.95
    assert train_results["train_nonpad_tokens_per_second"] > 0
    assert config["packing"] is True


@pytest.mark.parametrize("max_steps,eval_steps", [(4, 2), (5, 2)])
def test_the_final_evaluation_is_the_trainers_last_one_not_a_second(tmp_path, monkeypatch, max_steps, eval_steps):
    """transformers evaluates at the last step of a step-strategy run (at 4 as every 2 steps, at 5 as the
    end): the run's eval_results.json takes those numbers, and nothing evaluates the same model twice."""
    from dualadam_hf.hf.trainer import DualAdamTrainer

    calls = []
    real = DualAdamTrainer.evaluate

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DualAdamTrainer, "evaluate", counted)
    out = tmp_path / "run"
    flags = [*SHORT, "--max_steps", str(max_steps), "--eval_steps", str(eval_steps)]
    assert main([TINY, "--output_dir", str(out), *flags]) == 0
    assert calls == sorted({*range(eval_steps, max_steps + 1, eval_steps), max_steps})
    last = [e for e in history(out) if "eval_ppl" in e][-1]
    final = json.loads((out / "eval_results.json").read_text())
    assert last["step"] == max_steps and final["eval_ppl"] == last["eval_ppl"] and final["eval_gen_gap"] == last["eval_gen_gap"]


def test_lora_saves_an_adapter(tmp_path):
    out = tmp_path / "lora"
    assert main([TINY, "--output_dir", str(out), *SHORT, "--use_peft", "true", "--lora_r", "4"]) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()


def test_resume_from_checkpoint_is_honoured(tmp_path):
    out = tmp_path / "run"
    assert main([TINY, "--output_dir", str(out), *SHORT, "--save_strategy", "steps", "--save_steps", "2"]) == 0
    straight = [e for e in history(out) if "loss" in e]
    resumed_dir = tmp_path / "resumed"
    assert main([TINY, "--output_dir", str(resumed_dir), *SHORT,
                 "--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0
    resumed = [e for e in history(resumed_dir) if "loss" in e]
    # the checkpoint's history (steps 1-2) is carried over; steps 3-4 are trained after the resume
    assert [e["step"] for e in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed[2:], straight[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["dualadam_alpha"] == pytest.approx(b["dualadam_alpha"])


def test_the_adamw_baseline_of_a_dualadam_recipe_drops_its_optim_args(tmp_path, capsys, no_downloads):
    assert main([TINY, *dry_run_in(tmp_path), "--optim", "adamw_torch"]) == 0
    out = capsys.readouterr().out
    assert "optimizer:       adamw_torch" in out
    assert "optim_args 'switch_ratio=0.3' are DualAdam's; not used by adamw_torch" in out


def test_lora_run_resumes_from_its_checkpoint(tmp_path):
    # peft issues 859, 1313: a LoRA optimizer state that does not match the new param groups
    out, resumed_dir = tmp_path / "lora", tmp_path / "lora_resumed"
    lora = ["--use_peft", "true", "--lora_r", "4"]
    assert main([TINY, "--output_dir", str(out), *SHORT, *lora, "--save_strategy", "steps", "--save_steps", "2"]) == 0
    assert main([TINY, "--output_dir", str(resumed_dir), *SHORT, *lora,
                 "--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0
    straight = [e for e in history(out) if "loss" in e]
    resumed = [e for e in history(resumed_dir) if "loss" in e]
    for a, b in zip(resumed[2:], straight[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["dualadam_alpha"] == pytest.approx(b["dualadam_alpha"])


@pytest.mark.parametrize("outcome", ["finished", "refused"])
def test_the_process_group_is_destroyed_before_the_script_returns(outcome, tmp_path, capsys, monkeypatch):
    # left to interpreter shutdown, gloo's threads can abort a finished run (pytorch/pytorch#190489);
    # a finished run waits for the other processes first, a failed one must not (they may never come)
    barriers = []
    monkeypatch.setattr(dist, "barrier", lambda *args, **kwargs: barriers.append(dist.is_initialized()))

    def run(*settings):
        assert dist.is_initialized()
        if outcome == "refused":
            raise DataError("a record has no output")

    with one_process_group():
        code = script_main(ARGUMENT_TYPES, [TINY, "--output_dir", str(tmp_path / "run")],
                           prog="finetune.py", description="", describe=describe, run=run)
        assert not dist.is_initialized()
    assert code == (0 if outcome == "finished" else 1)
    assert barriers == ([True] if outcome == "finished" else [])
