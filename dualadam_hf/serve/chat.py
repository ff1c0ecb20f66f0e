"""Talk to a fine-tuned model: each prompt rendered as training rendered it, each answer streamed as it is generated.

``main`` is ``scripts/chat.py``. A message becomes the ids a training example puts before its response
(``sft_data.encode_prompt``: the tokenizer's chat template, or the Alpaca prompt for a run whose tokenizer has
none). Later turns of a conversation add the earlier ones: under a chat template the whole conversation is
rendered by the template; under the Alpaca prompt, which has no turns, each earlier turn is put back as the
example it would have been (its prompt, its answer, eos). Answers are greedy unless ``--sample`` asks for
the model's own ``generation_config``; they stop at the tokenizer's and the model's eos ids.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from dualadam_hf.hf.generation import eos_ids
from dualadam_hf.serve.trained import TrainedModel, load_trained, quiet_libraries
from dualadam_hf.train.cli import at_least, report_error
from dualadam_hf.train.sft_data import encode_prompt, has_chat_template

COMMANDS = {"/reset": "forget the conversation", "/exit": "leave (Ctrl-D does too)"}
INPUT_PROMPT = "> "
DTYPES = {"auto": None, "bf16": "bfloat16", "fp32": "float32"}


class ChatError(ValueError):
    """A prompt that cannot be answered (too long for the model); one line."""


@dataclass
class Conversation:
    """The turns so far, and the ids of the next prompt."""

    tokenizer: Any
    turns: list[tuple[str, str, list[int]]] = field(default_factory=list)  # (message, answer, the turn's ids)

    def prompt_ids(self, message: str) -> list[int]:
        """Under a chat template, the conversation as the template renders it, tokenized as training tokenized its
        examples (for the first message, the very ids of ``encode_prompt``); under the Alpaca prompt, the earlier
        turns' examples and the message's prompt."""
        if has_chat_template(self.tokenizer):
            messages = [
                turn
                for user, answer, _ in self.turns
                for turn in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})
            ]
            messages.append({"role": "user", "content": message})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text)["input_ids"]
        return [token for *_, ids in self.turns for token in ids] + encode_prompt(self.tokenizer, message, "")

    def add(self, message: str, answer: str, answer_ids: list[int], ended: bool) -> None:
        """Keep a turn; an answer cut by max_new_tokens gets its eos, as every training example has one."""
        ending = [] if ended else [self.tokenizer.eos_token_id]
        self.turns.append((message, answer, encode_prompt(self.tokenizer, message, "") + answer_ids + ending))


class StreamedText(BaseStreamer):
    """Writes the answer as it grows. The new ids are decoded whole each time and only the part not yet written
    goes out, so what is written is exactly ``tokenizer.decode(answer, skip_special_tokens=True)`` (a token that
    ends inside a multi-byte character waits for the rest of it)."""

    def __init__(self, tokenizer: Any, write: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.write = write
        self.ids: list[int] | None = None  # None until generate has passed the prompt
        self.text = ""

    def put(self, value: torch.Tensor) -> None:
        if self.ids is None:
            self.ids = []
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def _show(self, *, final: bool) -> None:
        text = self.tokenizer.decode(self.ids or [], skip_special_tokens=True)
        if (final or not text.endswith("\ufffd")) and text.startswith(self.text):
            self.write(text[len(self.text):])
            self.text = text


def generation_settings(model: Any, tokenizer: Any, *, sample: bool, max_new_tokens: int) -> Any:
    """Greedy (one beam) unless ``sample``: then the model's saved ``generation_config`` (temperature, top_p,
    top_k) with sampling on. Either stops at the tokenizer's and the model's eos ids."""
    from transformers import GenerationConfig

    stop = eos_ids(tokenizer, model)
    if sample:
        settings = GenerationConfig.from_dict(model.generation_config.to_dict())
        settings.do_sample = True
    else:
        settings = GenerationConfig(do_sample=False, num_beams=1)
    settings.max_new_tokens = max_new_tokens
    settings.eos_token_id = stop
    settings.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    settings.use_cache = True  # a training run may have saved use_cache: false (packing, checkpointing)
    return settings


def context_length(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def fit(conversation: Conversation, message: str, max_new_tokens: int, limit: int | None) -> tuple[list[int], int]:
    """The prompt's ids and how many tokens the answer may take: the oldest turns are dropped until a whole
    answer fits the model's context; a message that does not fit alone is refused."""
    ids = conversation.prompt_ids(message)
    while limit is not None and conversation.turns and len(ids) + max_new_tokens > limit:
        conversation.turns.pop(0)
        ids = conversation.prompt_ids(message)
    if limit is not None and len(ids) >= limit:
        raise ChatError(f"the prompt is {len(ids)} tokens: the model reads at most {limit}")
    return ids, max_new_tokens if limit is None else min(max_new_tokens, limit - len(ids))


@torch.no_grad()
def answer(trained: TrainedModel, prompt_ids: list[int], settings: Any, write: Callable[[str], None]) -> tuple[str, list[int], bool]:
    """Generate, writing the text as it comes; returns the text, the new ids (up to and with the eos) and
    whether it ended with an eos."""
    device = next(trained.model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    streamed = StreamedText(trained.tokenizer, write)
    output = trained.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    generation_config=settings, streamer=streamed)
    new = output[0, len(prompt_ids):].tolist()
    ended = next((position for position, token in enumerate(new) if token in settings.eos_token_id), None)
    return streamed.text, new if ended is None else new[: ended + 1], ended is not None


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="RUN_DIR",
                        help="a run's output_dir (full weights or a LoRA adapter, loaded on the base model its "
                        "run_config.json names), one of its checkpoint-N folders, a model folder or a Hub id")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="answer TEXT and exit; repeat it for several prompts, each answered on its own (no "
                        "history). Without it: an interactive conversation on stdin")
    parser.add_argument("--max_new_tokens", type=at_least(1), default=256,
                        help="length cap of each answer, in tokens (an answer stops at eos first; default 256)")
    parser.add_argument("--sample", action="store_true",
                        help="sample with the model's saved generation_config (temperature, top_p, top_k) "
                        "instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=None, help="seed of --sample, for answers that repeat")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (auto: the GPU when there is one)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="auto",
                        help="weights' dtype (auto: bf16 on a GPU that supports it, fp32 otherwise)")
    return parser


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    if device == "cuda" and not torch.cuda.is_available():
        raise ChatError("--device cuda: no CUDA GPU is available here")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        return device, "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return device, DTYPES[dtype]


def main(argv: Sequence[str] | None = None, *, prog: str = "chat.py", description: str = "") -> int:
    args = build_parser(prog, description).parse_args(argv)
    try:
        device, dtype = resolve_device(args.device, args.dtype)
    except ChatError as error:
        report_error(str(error))
        return 2
    from transformers.utils import logging as transformers_logging

    quiet_libraries()
    transformers_logging.set_verbosity_error()  # the answers, not the loaders' notes, on a chat's terminal
    try:
        trained = load_trained(args.model, dtype=dtype)
        if not has_chat_template(trained.tokenizer) and not trained.trained_here:
            raise ChatError(f"{args.model}: the tokenizer has no chat template, and no run of scripts/finetune.py "
                            "left this model (its runs use the Alpaca prompt without one): nothing says how to prompt it")
    except ValueError as error:  # ServeError, ModelLoadError, RunRecordError, ChatError: one line each
        report_error(str(error))
        return 1
    trained.model.to(device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    settings = generation_settings(trained.model, trained.tokenizer, sample=args.sample,
                                   max_new_tokens=args.max_new_tokens)
    if args.prompt:
        return answer_prompts(trained, args.prompt, settings)
    return converse(trained, settings, banner(trained, device, dtype, args.sample))


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def answer_prompts(trained: TrainedModel, prompts: Sequence[str], settings: Any) -> int:
    """Each prompt answered on its own, answers separated by a blank line."""
    for index, message in enumerate(prompts):
        try:
            ids, room = fit(Conversation(trained.tokenizer), message, settings.max_new_tokens, context_length(trained.model))
        except ChatError as error:
            report_error(f"--prompt {index + 1}: {error}")
            return 1
        if index:
            write_out("\n")
        answer(trained, ids, _capped(settings, room), write_out)
        write_out("\n")
    return 0


def _capped(settings: Any, max_new_tokens: int) -> Any:
    capped = copy.deepcopy(settings)
    capped.max_new_tokens = max_new_tokens
    return capped


def banner(trained: TrainedModel, device: str, dtype: str, sample: bool) -> str:
    prompt = "the chat template" if has_chat_template(trained.tokenizer) else "the Alpaca prompt"
    decoding = "sampling (generation_config)" if sample else "greedy"
    commands = ", ".join(f"{name} {what}" for name, what in COMMANDS.items())
    return f"{trained.source}: {trained.summary()}; {prompt}, {decoding}, {device} {dtype}\n{commands}"


def converse(trained: TrainedModel, settings: Any, heading: str) -> int:
    """The interactive loop: a line on stdin is a message; /reset, /exit; Ctrl-D leaves, Ctrl-C stops an answer."""
    print(heading, file=sys.stderr, flush=True)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and recall for input())
        except ImportError:  # not on every platform
            pass
    conversation = Conversation(trained.tokenizer)
    while True:
        try:
            message = input(INPUT_PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            write_out("\n")
            return 0
        if not message:
            continue
        if message == "/exit":
            return 0
        if message == "/reset":
            conversation.turns.clear()
            print("(conversation forgotten)", file=sys.stderr, flush=True)
            continue
        if re.fullmatch(r"/\w+", message):
            print(f"unknown command {message}: {', '.join(COMMANDS)}", file=sys.stderr, flush=True)
            continue
        try:
            ids, room = fit(conversation, message, settings.max_new_tokens, context_length(trained.model))
        except ChatError as error:
            report_error(str(error))
            continue
        try:
            text, answer_ids, ended = answer(trained, ids, _capped(settings, room), write_out)
        except KeyboardInterrupt:
            write_out("\n")
            print("(answer stopped; not kept in the conversation)", file=sys.stderr, flush=True)
            continue
        write_out("\n")
        conversation.add(message, text, answer_ids, ended)
