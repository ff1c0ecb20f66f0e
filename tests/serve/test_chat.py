"""scripts/chat.py: the prompt is the training example's prompt, the streamed answer is generate's answer, the
conversation loop keeps and forgets history, and every way loading can fail is one line."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from dualadam_hf.hf.generation import eos_ids
from dualadam_hf.models.tiny import build_tiny_llama, load_tiny_tokenizer
from dualadam_hf.serve.chat import Conversation, StreamedText, build_parser, generation_settings, main
from dualadam_hf.train.finetune import main as finetune
from dualadam_hf.train.sft_data import IGNORE_INDEX, tokenize_record
from tiny_runs import SHORT, TINY

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = ["用一句话介绍长城。", "Write a short poem about the sea.", "翻译成英文：我每天早上七点起床。"]
MAX_NEW = 12


def training_prompt(tokenizer, message: str) -> list[int]:
    """What training put before a response to ``message``: the ids of its example whose labels are ignored."""
    example = tokenize_record(tokenizer, {"instruction": message, "input": "", "output": "好"}, 4096)
    first_learnt = next(index for index, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    return example["input_ids"][:first_learnt]


def greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = MAX_NEW) -> list[int]:
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        output = model.generate(input_ids=torch.tensor([prompt_ids]), generation_config=config)
    return output[0, len(prompt_ids):].tolist()


def answer_text(model, tokenizer, prompt_ids: list[int]) -> str:
    return tokenizer.decode(greedy(model, tokenizer, prompt_ids), skip_special_tokens=True)


@pytest.fixture
def generate_inputs(monkeypatch):
    """The prompt ids every generate call receives, and whether the model generating carries LoRA layers (under
    a PEFT model, the base model's generate runs with the adapter's layers in it)."""
    seen: list[tuple[list[int], bool]] = []
    original = transformers.GenerationMixin.generate

    def recording(self, *args, **kwargs):
        seen.append((kwargs["input_ids"][0].tolist(), any("lora_A" in name for name, _ in self.named_parameters())))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", recording)
    return seen


def test_the_prompt_is_the_training_examples_prompt(tiny_openpangu):
    # Alpaca (the tiny tokenizer has no chat template) and the published chat template
    for tokenizer in (load_tiny_tokenizer(), AutoTokenizer.from_pretrained(tiny_openpangu)):
        for message in MESSAGES:
            assert Conversation(tokenizer).prompt_ids(message) == training_prompt(tokenizer, message)


def test_a_prompt_on_the_tiny_run_is_answered_as_generate_answers_it(tiny_run, capsys, generate_inputs):
    assert main([str(tiny_run), *sum((["--prompt", m] for m in MESSAGES), []), "--max_new_tokens", str(MAX_NEW)]) == 0
    captured = capsys.readouterr()
    tokenizer = AutoTokenizer.from_pretrained(tiny_run)
    model = AutoModelForCausalLM.from_pretrained(tiny_run).eval()
    expected = [answer_text(model, tokenizer, training_prompt(tokenizer, message)) for message in MESSAGES]
    assert captured.out == "\n\n".join(expected) + "\n"
    assert generate_inputs[: len(MESSAGES)] == [(training_prompt(tokenizer, message), False) for message in MESSAGES]
    assert captured.err == ""


def test_a_prompt_on_a_lora_run_is_answered_by_the_base_with_the_adapter(tiny_lora_run, capsys, generate_inputs):
    from peft import PeftModel

    assert main([str(tiny_lora_run), "--prompt", MESSAGES[0], "--prompt", MESSAGES[1], "--max_new_tokens", str(MAX_NEW)]) == 0
    out = capsys.readouterr().out
    record = json.loads((tiny_lora_run / "run_config.json").read_text())
    tokenizer = load_tiny_tokenizer()
    base = build_tiny_llama(tokenizer, seed=record["seed"])
    model = PeftModel.from_pretrained(base, tiny_lora_run).eval()
    expected = [answer_text(model, tokenizer, training_prompt(tokenizer, message)) for message in MESSAGES[:2]]
    assert out == "\n\n".join(expected) + "\n"
    # the training prompts, answered by the base with the adapter's layers in it
    assert generate_inputs[:2] == [(training_prompt(tokenizer, message), True) for message in MESSAGES[:2]]


def test_the_streamed_text_is_the_decoded_answer_piece_by_piece():
    tokenizer = load_tiny_tokenizer()
    ids = tokenizer("长城 is long，万里。\n第二行 ✓", add_special_tokens=False)["input_ids"]
    pieces: list[str] = []
    streamed = StreamedText(tokenizer, pieces.append)
    streamed.put(torch.tensor([[1, 2, 3]]))  # the prompt, which generate passes first
    for token in ids:
        streamed.put(torch.tensor([token]))
    streamed.end()
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == "长城 is long，万里。\n第二行 ✓"
    assert len([piece for piece in pieces if piece]) > 3  # written as it came, not at the end
    assert not any("\ufffd" in piece for piece in pieces)  # a byte-level token in mid-character waited for the rest


def test_the_conversation_loop_keeps_history_forgets_it_and_leaves_at_ctrl_d(pangu_run, tiny_openpangu, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{MESSAGES[0]}\n{MESSAGES[1]}\n/reset\n{MESSAGES[1]}\n/help\n"))
    assert main([str(pangu_run), "--max_new_tokens", str(MAX_NEW)]) == 0
    captured = capsys.readouterr()

    tokenizer = AutoTokenizer.from_pretrained(pangu_run)
    model = AutoModelForCausalLM.from_pretrained(pangu_run, dtype=torch.float32).eval()
    first_ids = greedy(model, tokenizer, training_prompt(tokenizer, MESSAGES[0]))
    first = tokenizer.decode(first_ids, skip_special_tokens=True)
    conversation = tokenizer.apply_chat_template(
        [{"role": "user", "content": MESSAGES[0]}, {"role": "assistant", "content": first},
         {"role": "user", "content": MESSAGES[1]}], tokenize=False, add_generation_prompt=True)
    with_history = answer_text(model, tokenizer, tokenizer(conversation)["input_ids"])
    fresh = answer_text(model, tokenizer, training_prompt(tokenizer, MESSAGES[1]))
    assert with_history != fresh  # the history changes the answer: the comparison below can fail
    # stdout: each input prompt, each answer; /reset and the unknown command answer on stderr; Ctrl-D a newline
    assert captured.out == f"> {first}\n> {with_history}\n> > {fresh}\n> > \n"
    assert "(conversation forgotten)" in captured.err and "unknown command /help: /reset, /exit" in captured.err
    assert captured.err.startswith(f"{pangu_run}: full fine-tune of {tiny_openpangu}, dualadam; the chat template, greedy")


def test_the_alpaca_history_puts_each_turn_back_as_its_training_example(tiny_lora_run):
    tokenizer = load_tiny_tokenizer()
    conversation = Conversation(tokenizer)
    conversation.add(MESSAGES[0], "答", tokenizer("答", add_special_tokens=False)["input_ids"], ended=False)
    first_example = tokenize_record(tokenizer, {"instruction": MESSAGES[0], "input": "", "output": "答"}, 4096)
    assert conversation.prompt_ids(MESSAGES[1]) == first_example["input_ids"] + training_prompt(tokenizer, MESSAGES[1])


def test_the_script_answers_on_stdin_and_leaves_at_exit(tiny_lora_run):
    result = subprocess.run(
        [sys.executable, "scripts/chat.py", str(tiny_lora_run), "--max_new_tokens", "6"],
        input=f"{MESSAGES[0]}\n/exit\n{MESSAGES[1]}\n", capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"), check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the input prompt, the answer, the input prompt that read /exit, and nothing after
    assert result.stdout.startswith("> ") and result.stdout.endswith("\n> ") and result.stdout.count("> ") == 2
    assert result.stdout.removeprefix("> ").removesuffix("\n> ").strip()
    assert "LoRA adapter on builtin:tiny-llama, dualadam; the Alpaca prompt, greedy, cpu float32" in result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr


def test_sample_takes_the_saved_generation_config(pangu_run, tiny_openpangu, capsys):
    model = AutoModelForCausalLM.from_pretrained(pangu_run)
    tokenizer = AutoTokenizer.from_pretrained(pangu_run)
    published = json.loads((tiny_openpangu / "generation_config.json").read_text())
    sampled = generation_settings(model, tokenizer, sample=True, max_new_tokens=5)
    assert sampled.do_sample and sampled.top_p == published["top_p"] == 0.8 and sampled.max_new_tokens == 5
    greedy_settings = generation_settings(model, tokenizer, sample=False, max_new_tokens=5)
    assert not greedy_settings.do_sample and greedy_settings.num_beams == 1
    assert sampled.eos_token_id == greedy_settings.eos_token_id == [published["eos_token_id"]]
    # seeded sampling repeats
    outputs = []
    for _ in range(2):
        assert main([str(pangu_run), "--prompt", MESSAGES[0], "--sample", "--seed", "3", "--max_new_tokens", "8"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def copy_run(source: Path, destination: Path, *, leave_out=()) -> Path:
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(*leave_out))
    return destination


def test_a_checkpoint_folder_chats_and_an_unfinished_run_names_its_checkpoint(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    checkpoint = copy_run(tiny_run, run / "checkpoint-4", leave_out=["run_config.json", "generations", "*results.json"])
    assert main([str(run), "--prompt", MESSAGES[0]]) == 1
    assert capsys.readouterr().err == (f"error: {run}: an unfinished run (no final model and no run_config.json yet); "
                                       f"its newest checkpoint is {checkpoint}: pass that folder\n")
    assert main([str(checkpoint), "--prompt", MESSAGES[0], "--max_new_tokens", "4"]) == 0
    assert main([str(tiny_run), "--prompt", MESSAGES[0], "--max_new_tokens", "4"]) == 0
    first, second = capsys.readouterr().out.split("\n")[:2]
    assert first == second  # the same weights answer the same


@pytest.mark.parametrize("case", ["missing", "empty", "base gone", "no template", "too long", "no gpu"])
def test_each_failure_is_one_line(case, tiny_run, tiny_lora_run, tmp_path, capsys, monkeypatch):
    argv, status = [str(tmp_path / "nowhere"), "--prompt", "hi"], 1
    if case == "missing":
        message = f"{tmp_path / 'nowhere'}: no such directory"
    elif case == "empty":
        (tmp_path / "nowhere").mkdir()
        message = f"{tmp_path / 'nowhere'}: no model here (no config.json for full weights, no adapter_config.json"
    elif case == "base gone":
        run = copy_run(tiny_lora_run, tmp_path / "lora")
        record = json.loads((run / "run_config.json").read_text())
        (run / "run_config.json").write_text(json.dumps(dict(record, model=str(tmp_path / "base"))))
        argv = [str(run), "--prompt", "hi"]
        message = f"{run}: the adapter's base model {tmp_path / 'base'} is not available: {tmp_path / 'base'}: no such directory"
    elif case == "no template":  # a model folder that no run of ours left: nothing says how to prompt it
        model = copy_run(tiny_run, tmp_path / "model", leave_out=["run_config.json", "trainer_state.json"])
        argv = [str(model), "--prompt", "hi"]
        message = f"{model}: the tokenizer has no chat template, and no run of scripts/finetune.py left this model"
    elif case == "too long":
        argv = [str(tiny_run), "--prompt", "好" * 600]
        message = "--prompt 1: the prompt is"
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        argv, status = [str(tiny_run), "--device", "cuda", "--prompt", "hi"], 2
        message = "--device cuda: no CUDA GPU is available here"
    assert main(argv) == status
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {message}") and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""


def test_help_explains_every_flag():
    parser = build_parser("chat.py", "")
    assert all(action.help for action in parser._actions)
    assert {"--prompt", "--max_new_tokens", "--sample", "--seed", "--device", "--dtype"} <= {
        option for action in parser._actions for option in action.option_strings}


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune([str(ROOT / TINY), *SHORT, "--max_steps", "2", "--output_dir", str(run)]) == 0
    checkpoint = run / "checkpoint-2"
    weights = checkpoint / "model.safetensors"
    with weights.open("r+b") as file:  # flip 256 bytes in the middle of the tensors
        file.seek(weights.stat().st_size // 2)
        data = file.read(256)
        file.seek(weights.stat().st_size // 2)
        file.write(bytes(byte ^ 0xFF for byte in data))
    capsys.readouterr()
    assert main([str(checkpoint), "--prompt", MESSAGES[0]]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {checkpoint}: its files differ from its checkpoint_manifest.json (model.safetensors")
    assert len(err.splitlines()) == 1
