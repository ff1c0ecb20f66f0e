"""What the fine-tuned model answers: the BLEU-4 / ROUGE-L metric, generation at evaluation, early stopping
and the best checkpoint, and compare.py's samples.md."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import dry_run_in

from dualadam_hf import generation_metric
from dualadam_hf.analysis.compare import compare
from dualadam_hf.hf.generation import Prompt, generate, select_prompts
from dualadam_hf.models.tiny import build_tiny_llama, load_tiny_tokenizer
from dualadam_hf.train.finetune import main
from dualadam_hf.train.sft_data import DataArguments, prepare_datasets

ROOT = Path(__file__).resolve().parents[2]
TINY = "recipes/tiny_alpaca.yaml"
GENERATE = ["--max_steps", "4", "--eval_steps", "2", "--max_train_samples", "32", "--max_eval_samples", "12",
            "--generation_eval_samples", "5", "--generation_max_new_tokens", "12", "--disable_tqdm", "true"]


# ---- the metric ----

@pytest.fixture(scope="module")
def metric():
    return generation_metric()  # evaluate.load of the package's folder: offline


def score(metric, prediction: str, reference: str) -> dict[str, float]:
    return metric.compute(predictions=[prediction], references=[reference])


def test_identical_answers_score_one_and_disjoint_ones_zero(metric):
    assert score(metric, "今天天气很好，我们去公园。", "今天天气很好，我们去公园。") == {"bleu": 1.0, "rouge_l": 1.0}
    assert score(metric, "the cat sat on the mat", "the cat sat on the mat") == {"bleu": 1.0, "rouge_l": 1.0}
    assert score(metric, "苹果香蕉", "火车飞机") == {"bleu": 0.0, "rouge_l": 0.0}


def test_scores_by_hand_over_words_and_over_characters(metric):
    # words: LCS "the cat on the mat" = 5 of 6 each; clipped precisions 5/6, then add-one (3+1)/(5+1),
    # (1+1)/(4+1), (0+1)/(3+1); equal lengths, no brevity penalty
    english = score(metric, "the cat sat on the mat", "the cat is on the mat")
    assert english["rouge_l"] == pytest.approx(5 / 6)
    assert english["bleu"] == pytest.approx((5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    # characters: LCS 今天天气 = 4 of 6; unigrams 4/6, bigrams (3+1)/(5+1), trigrams (2+1)/(4+1), 4-grams (1+1)/(3+1)
    chinese = score(metric, "今天天气很好", "今天天气不错")
    assert chinese["rouge_l"] == pytest.approx(4 / 6)
    assert chinese["bleu"] == pytest.approx((4 / 6 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25)
    # a short answer: every precision 1, the brevity penalty exp(1 - 4/2)
    assert score(metric, "a b", "a b c d")["bleu"] == pytest.approx(math.exp(-1))


def test_empty_answers(metric):
    assert score(metric, "", "有内容") == {"bleu": 0.0, "rouge_l": 0.0}
    assert score(metric, "", "")["rouge_l"] == 1.0


# ---- generation at evaluation ----

def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generation_at_each_evaluation_writes_scores_and_samples(tmp_path):
    out = tmp_path / "run"
    assert main([TINY, *GENERATE, "--output_dir", str(out)]) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_bleu" in entry]
    assert [entry["step"] for entry in evaluations][:2] == [2, 4]
    for entry in evaluations:
        assert 0.0 <= entry["eval_bleu"] <= 1.0 and 0.0 <= entry["eval_rouge_l"] <= 1.0
        assert 1.0 <= entry["eval_gen_len"] <= 12.0 and 0.0 <= entry["eval_gen_eos_rate"] <= 1.0

    samples = records_of(out / "generations" / "step_4.jsonl")
    tokenizer = load_tiny_tokenizer()
    data = prepare_datasets(DataArguments(dataset_name=str(ROOT / "dualadam_hf/assets/alpaca_zh_sample.jsonl"),
                                          validation_fraction=0.15, max_seq_length=192, max_eval_samples=12), tokenizer)
    expected = select_prompts(data.eval, 5, seed=42)
    assert [r["index"] for r in samples] == [p.index for p in expected]
    assert [r["prompt"] for r in samples] == [tokenizer.decode(p.prompt_ids) for p in expected]
    assert all(r["prompt"].endswith("### Response:\n") for r in samples)  # the prompt stops where the answer starts
    assert [r["reference"] for r in samples] == [tokenizer.decode(p.reference_ids, skip_special_tokens=True) for p in expected]
    final = evaluations[-1]
    assert final["eval_gen_eos_rate"] == pytest.approx(sum(r["ended_with_eos"] for r in samples) / 5)
    assert final["eval_gen_len"] == pytest.approx(sum(r["generated_tokens"] for r in samples) / 5)
    scores = generation_metric().compute(predictions=[r["answer"] for r in samples],
                                         references=[r["reference"] for r in samples])
    assert final["eval_rouge_l"] == pytest.approx(scores["rouge_l"]) and final["eval_bleu"] == pytest.approx(scores["bleu"])


def test_left_padding_does_not_change_the_answers():
    tokenizer = load_tiny_tokenizer()
    model = build_tiny_llama(tokenizer, seed=3).eval()
    lengths = (5, 17, 9, 30)
    prompts = [Prompt(i, [tokenizer.bos_token_id, *range(10 + i, 10 + i + n)], [7]) for i, n in enumerate(lengths)]
    one_by_one = generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=1, synced_gpus=False)
    batched = generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=4, synced_gpus=False)
    assert batched == one_by_one


def test_an_answer_stops_at_the_eos_and_says_so():
    tokenizer = load_tiny_tokenizer()
    model = build_tiny_llama(tokenizer, seed=3).eval()
    with torch.no_grad():  # make eos the model's only choice
        model.lm_head.bias = None
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id] = 1.0
        model.model.norm.weight.fill_(1.0)
    answers = generate(model, tokenizer, [Prompt(0, [tokenizer.bos_token_id, 20, 21], [7])], max_new_tokens=8,
                       batch_size=1, synced_gpus=False)
    assert answers == [([tokenizer.eos_token_id], True)]


# ---- early stopping and the best checkpoint ----

def test_early_stopping_stops_a_rising_ppl_and_the_best_checkpoint_is_restored(tmp_path):
    out = tmp_path / "run"
    flags = ["--optim", "adamw_torch", "--learning_rate", "3e-2", "--max_steps", "16", "--eval_steps", "2",
             "--save_strategy", "steps", "--save_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "16",
             "--per_device_train_batch_size", "8", "--generation_eval_samples", "0", "--disable_tqdm", "true",
             "--early_stopping_patience", "2", "--load_best_model_at_end", "true"]
    assert main([TINY, *flags, "--output_dir", str(out)]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    ppl = {entry["step"]: entry["eval_ppl"] for entry in state["log_history"] if "eval_ppl" in entry}
    best_step = min(ppl, key=ppl.get)
    assert state["global_step"] == best_step + 2 * 2 < 16  # two evaluations without a better eval_ppl, then stop
    assert state["best_model_checkpoint"] == str(out / f"checkpoint-{best_step}")
    final, best = load_file(str(out / "model.safetensors")), load_file(str(out / f"checkpoint-{best_step}" / "model.safetensors"))
    assert all(torch.equal(final[name], best[name]) for name in best)


def test_early_stopping_without_evaluations_is_one_line(tmp_path, capsys):
    assert main([TINY, *dry_run_in(tmp_path), "--eval_strategy", "no", "--early_stopping_patience", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "error: early_stopping_patience needs evaluations: set eval_strategy to steps or epoch\n"
    assert main([TINY, *dry_run_in(tmp_path), "--load_best_model_at_end", "true", "--save_strategy", "no"]) == 2
    assert capsys.readouterr().err == (
        "error: load_best_model_at_end needs checkpoints where it evaluates: save_strategy is no, eval_strategy steps; "
        "make them equal (and save_steps a multiple of eval_steps) or set save_strategy: best\n"
    )


def test_the_dry_run_prints_the_generation_settings(tmp_path, capsys):
    assert main([TINY, *dry_run_in(tmp_path), "--early_stopping_patience", "3"]) == 0
    out = capsys.readouterr().out
    assert "generation:      4 greedy answers per evaluation, at most 48 new tokens" in out
    assert "early stopping after 3 evaluations without a better eval_ppl" in out


# ---- compare.py ----

def test_compare_pairs_the_runs_answers_by_prompt_and_summarizes_the_scores(tmp_path):
    runs = []
    for optimizer in ("dualadam", "adamw_torch"):
        out = tmp_path / optimizer
        assert main([TINY, *GENERATE, "--optim", optimizer, "--output_dir", str(out)]) == 0
        runs.append(out)
    summaries = compare(runs, tmp_path / "cmp")
    for summary in summaries:
        assert {"final_eval_bleu", "best_eval_bleu", "final_eval_rouge_l", "best_eval_rouge_l"} <= set(summary)
    assert (tmp_path / "cmp" / "generation.png").stat().st_size > 0
    samples = (tmp_path / "cmp" / "samples.md").read_text(encoding="utf-8")
    first = records_of(runs[0] / "generations" / "step_4.jsonl")[0]
    second = records_of(runs[1] / "generations" / "step_4.jsonl")[0]
    assert first["prompt"] == second["prompt"]
    section = samples.split("## 1\n", 1)[1].split("## 2\n", 1)[0]
    assert first["prompt"].strip() in section
    assert f"| dualadam | {first['answer']} |" in section
    assert f"| adamw_torch | {second['answer']} |" in section


# ---- two processes ----

def launch_two(config: str, output_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    wrapper = ["tests/fsdp_on_cpu.py"] if config.endswith("fsdp.yaml") else []  # FSDP on CPU processes
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", "0", *wrapper, "scripts/finetune.py", TINY, *GENERATE,
               "--eval_on_start", "true", "--per_device_train_batch_size", "4", "--output_dir", str(output_dir), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero3", "fsdp"])
def test_two_processes_answer_as_one_process_does(tmp_path, engine):
    # at step 0 every run has the same weights: the gathered answers must be the one-process answers
    assert main([TINY, *GENERATE, "--eval_on_start", "true", "--output_dir", str(tmp_path / "one")]) == 0
    result = launch_two(f"recipes/accelerate/{engine}.yaml", tmp_path / "two")
    assert result.returncode == 0, result.stderr[-4000:]
    one = records_of(tmp_path / "one" / "generations" / "step_0.jsonl")
    two = records_of(tmp_path / "two" / "generations" / "step_0.jsonl")
    assert len(two) == 5 and [r["index"] for r in two] == [r["index"] for r in one]  # 5 prompts over 2 processes
    assert [r["answer"] for r in two] == [r["answer"] for r in one]
    history = json.loads((tmp_path / "two" / "trainer_state.json").read_text())["log_history"]
    assert all(math.isfinite(entry["eval_rouge_l"]) for entry in history if "eval_rouge_l" in entry)


def test_tensorboard_gets_the_samples_as_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main([TINY, *GENERATE, "--report_to", "tensorboard",
                 "--output_dir", str(out)]) == 0
    events = [EventAccumulator(str(path.parent), size_guidance={"tensors": 0}).Reload()
              for path in out.rglob("events.out.tfevents.*")]
    texts = [event.Tensors("eval/generations/text_summary") for event in events if "eval/generations/text_summary" in event.Tags()["tensors"]]
    assert texts and [item.step for item in texts[0]][:2] == [2, 4]
    assert "| prompt | reference | answer |" in texts[0][0].tensor_proto.string_val[0].decode()
