"""Export a fine-tuned model as a standalone checkpoint for the tools that serve models.

``main`` is ``scripts/export.py``. The model is loaded as the run recorded it (``trained``); a LoRA adapter is
merged into its base in fp32 (``merge_and_unload``), then the weights are cast to ``--dtype`` and written as
safetensors shards with the tokenizer, the generation config and a model card (``README.md``). Two formats:

* ``openpangu`` (openPangu-Embedded runs): the published on-disk layout. ``config.json`` keeps ``model_type:
  PanguEmbedded``, ``bias`` and the published keys (``torch_dtype``, ``rope_theta``, and ``auto_map`` with the
  remote-code files when the base checkpoint has them); the tokenizer is the published ``tokenizer.model``,
  ``tokenizer_config.json`` and ``special_tokens_map.json`` (taken from the base checkpoint, checked against the
  run's vocabulary), with the run's ``tokenizer.json`` beside them. llama.cpp's converter (which registers
  ``PanguEmbeddedForCausalLM`` and reads ``tokenizer.model``) and vLLM take it as they take the original.
* ``llama`` (openPangu-Embedded and Llama runs): ``LlamaForCausalLM``, with ``attention_bias: true`` for
  openPangu (a bias on q, k, v and o, none on the MLP: the published modelling code's layers), and a plain
  ``tokenizer.json`` whose ``tokenizer_class`` is ``PreTrainedTokenizerFast``: stock transformers loads it
  without this package, with the same logits and the same token ids.

Nothing is written into a non-empty ``--out`` without ``--overwrite`` (and never over a folder that is not a
model); the files are written into a staging folder beside ``--out`` and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dualadam_hf.models.openpangu import MODEL_TYPE as OPENPANGU
from dualadam_hf.models.tiny import is_builtin
from dualadam_hf.serve.trained import TrainedModel, load_trained, quiet_libraries
from dualadam_hf.train.cli import report_error

FORMATS = {OPENPANGU: "openpangu", "llama": "llama"}
"""model_type -> its default format."""
ACCEPTS = {"openpangu": (OPENPANGU,), "llama": (OPENPANGU, "llama")}
"""format -> the model types it can write."""
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}
PUBLISHED_TOKENIZER = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
PLAIN_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # tokenizer.json as it is, in transformers 4.x and 5.x
MODEL_CARD = "README.md"


class ExportError(ValueError):
    """An export that cannot be made as asked; one line naming the culprit."""


class UsageError(ExportError):
    """A command-line mistake (``--out``, ``--format``): exit status 2, as argparse's own."""


def check_out(out: Path, folder: Path | None, overwrite: bool) -> None:
    """Refuse, before anything is loaded, an ``--out`` that is a file, the run itself, or a non-empty folder
    without ``--overwrite`` (or with it, one that holds no model: a typo must not delete a home folder)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: a file, not a folder")
    if folder is not None and (out.resolve() == folder.resolve() or out.resolve() in folder.resolve().parents):
        raise UsageError(f"--out {out}: would replace the run it exports ({folder})")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out}: not empty (pass --overwrite to replace it)")
        if not (out / "config.json").is_file():
            raise UsageError(f"--out {out}: not empty and holds no config.json (not a model folder): refusing to "
                              "replace it, even with --overwrite")


def choose_format(model_type: str, requested: str | None, source: str) -> str:
    chosen = requested or FORMATS.get(model_type)
    if chosen is None:
        raise UsageError(f"{source}: model type {model_type!r} has no export format here (openpangu takes "
                         f"{OPENPANGU} models, llama takes llama and {OPENPANGU} models)")
    if model_type not in ACCEPTS[chosen]:
        raise UsageError(f"--format {chosen}: takes {' and '.join(ACCEPTS[chosen])} models; {source} is {model_type!r}")
    return chosen


def merged_model(trained: TrainedModel, dtype: torch.dtype | None) -> tuple[Any, torch.dtype]:
    """The model with any adapter merged into its weights (in fp32), cast to ``dtype`` (None: as stored)."""
    model = trained.model
    stored = next(model.parameters()).dtype
    if trained.base is not None:
        model = model.to(torch.float32).merge_and_unload()
    target = dtype or stored
    return model.to(target), target


def locate(source: str, name: str) -> Path | None:
    """``name`` in a model folder, or in the local Hugging Face cache of a Hub id (never downloaded)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    if is_builtin(source) or source.count("/") > 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id=source, filename=name)
    except ValueError:  # not a valid repo id
        return None
    return Path(cached) if isinstance(cached, str) else None


def published_files(trained: TrainedModel) -> dict[str, Path]:
    """The published tokenizer files and remote-code files, from the first of (the folder given, the base
    checkpoint) that holds ``tokenizer.model``: a fine-tuning run saves only ``tokenizer.json``."""
    base = trained.base or (trained.record.detail("model", None) if trained.record is not None else None)
    sources = [str(source) for source in (trained.folder, base) if source is not None]
    for source in sources:
        found = {name: locate(source, name) for name in (*PUBLISHED_TOKENIZER, "config.json")}
        if found["tokenizer.model"] is None:
            continue
        files = {name: path for name, path in found.items() if path is not None}
        code = {module + ".py" for module in _remote_modules(files)}
        located = {name: locate(source, name) for name in code}
        if code and all(located.values()):
            files.update(located)
        return files
    raise ExportError(
        f"--format openpangu: the published tokenizer.model (the vocabulary llama.cpp and vLLM read; a fine-tuning run "
        f"saves only tokenizer.json) is in none of {', '.join(sources)} (Hub ids: in the local cache); download the "
        "base checkpoint, or use --format llama"
    )


def _remote_modules(files: dict[str, Path]) -> set[str]:
    """The Python modules ``auto_map`` names in config.json and tokenizer_config.json (same-repository ones)."""
    modules = set()
    for name in ("config.json", "tokenizer_config.json"):
        if name in files:
            for value in json.loads(files[name].read_text(encoding="utf-8")).get("auto_map", {}).values():
                for reference in value if isinstance(value, list) else [value]:
                    if isinstance(reference, str) and "--" not in reference:
                        modules.add(reference.rsplit(".", 1)[0])
    return modules


def check_vocabulary(tokenizer_model: Path, tokenizer: Any) -> None:
    """The published sentencepiece file must hold the run's vocabulary, piece for piece."""
    try:
        import sentencepiece
    except ImportError:
        raise ExportError("--format openpangu checks tokenizer.model against the run's vocabulary with sentencepiece: "
                          "pip install sentencepiece") from None
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    vocabulary = tokenizer.get_vocab()
    if processor.get_piece_size() != len(vocabulary):
        raise ExportError(f"{tokenizer_model}: {processor.get_piece_size()} pieces, the run's tokenizer has "
                          f"{len(vocabulary)}: not the vocabulary the run was trained with")
    for piece, index in vocabulary.items():
        if processor.id_to_piece(index) != piece:
            raise ExportError(f"{tokenizer_model}: id {index} is {processor.id_to_piece(index)!r}, the run's tokenizer "
                              f"has {piece!r}: not the vocabulary the run was trained with")


def _edit_json(path: Path, change: Any) -> None:
    content = json.loads(path.read_text(encoding="utf-8"))
    content = change(content) or content
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_openpangu(staging: Path, tokenizer: Any, published: dict[str, Path], dtype: torch.dtype) -> None:
    for name in PUBLISHED_TOKENIZER + tuple(name for name in published if name.endswith(".py")):
        if name in published:
            shutil.copyfile(published[name], staging / name)
    template = staging / "chat_template.jinja"
    if template.is_file():  # the published layout keeps the template in tokenizer_config.json
        template.unlink()
    code_copied = any(name.endswith(".py") for name in published)

    def tokenizer_config(config: dict) -> None:
        if tokenizer.chat_template:
            config["chat_template"] = tokenizer.chat_template
        if not code_copied:
            config.pop("auto_map", None)

    _edit_json(staging / "tokenizer_config.json", tokenizer_config)
    published_config = json.loads(published["config.json"].read_text(encoding="utf-8")) if "config.json" in published else {}

    def model_config(config: dict) -> None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")  # the published key, beside transformers 5's dtype
        if code_copied and "auto_map" in published_config:
            config["auto_map"] = published_config["auto_map"]

    _edit_json(staging / "config.json", model_config)


def write_llama(staging: Path, model_type: str) -> None:
    from transformers import LlamaConfig

    if model_type == OPENPANGU:  # the same layers under Llama's name: attention_bias carries `bias` (q, k, v, o)
        config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
        kept = {key: value for key, value in config.items()
                if key not in ("bias", "model_type", "architectures", "auto_map", "transformers_version")}
        llama = LlamaConfig.from_dict(kept)
        llama.architectures = ["LlamaForCausalLM"]
        llama.save_pretrained(staging)

    def model_config(config: dict) -> None:
        # the key older readers (transformers 4.x, llama.cpp, vLLM) take the RoPE base from
        config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))

    _edit_json(staging / "config.json", model_config)

    added = json.loads((staging / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])

    def tokenizer_config(settings: dict) -> None:
        settings["tokenizer_class"] = PLAIN_TOKENIZER_CLASS
        settings.pop("auto_map", None)
        # Every added special token named as one: llama.cpp's converter marks as CONTROL only the tokenizer's
        # named special tokens, and llama.cpp parses only those as one token in text, so the chat template's
        # [unused9] would otherwise be split into plain pieces (transformers matches it as one token either way).
        extra = settings.get("extra_special_tokens") or []
        if isinstance(extra, list):
            named = {settings.get(key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")} | set(extra)
            settings["extra_special_tokens"] = extra + [
                token["content"] for token in added if token.get("special") and token["content"] not in named
            ]

    _edit_json(staging / "tokenizer_config.json", tokenizer_config)


def evaluations(folder: Path | None) -> tuple[dict | None, dict | None]:
    """The last and the best (lowest eval_ppl) evaluation in the folder's trainer_state.json."""
    path = folder / "trainer_state.json" if folder is not None else None
    if path is None or not path.is_file():
        return None, None
    entries = [entry for entry in json.loads(path.read_text()).get("log_history", []) if "eval_ppl" in entry]
    if not entries:
        return None, None
    return entries[-1], min(entries, key=lambda entry: entry["eval_ppl"])


def _evaluation_line(entry: dict | None) -> str:
    if entry is None:
        return "not recorded"
    gap = f", eval_gen_gap {entry['eval_gen_gap']:.4f}" if "eval_gen_gap" in entry else ""
    return f"eval_ppl {entry['eval_ppl']:.4g}{gap} (step {entry.get('step', '?')})"


def model_card(trained: TrainedModel, fmt: str, dtype: torch.dtype, command: str, architecture: str) -> str:
    record = trained.record
    base = trained.base or (record.detail("model", None) if record is not None else None)
    rows = [("base model", f"`{base}`" if base else "not recorded")]
    if record is not None:
        validation = (f"split `{record.detail('validation_split')}`" if record.detail("validation_split", None)
                      else f"{record.detail('validation_fraction', '?')} of the training split held out "
                      f"(seed {record.detail('split_seed', '?')})")
        rows.append(("data", f"`{record.detail('dataset', '?')}`, split `{record.detail('train_split', '?')}`, "
                     f"validation: {validation}, max_seq_length {record.detail('max_seq_length', '?')}"))
    if trained.base is not None:
        lora = next(iter(trained.model.peft_config.values()))
        rows.append(("fine-tuning", f"LoRA r={lora.r} alpha={lora.lora_alpha}, merged into the weights"))
    elif record is not None:
        rows.append(("fine-tuning", "all weights"))
    if record is not None:
        rows.append(("optimizer", f"`{record.optim}`" + (f" (`{record.optim_args}`)" if record.optim_args else "")
                     + f", learning rate {record.learning_rate:g}, weight decay {record.weight_decay:g}, seed {record.seed}"))
    final, best = evaluations(trained.folder)
    rows += [("final evaluation", _evaluation_line(final)), ("best evaluation", _evaluation_line(best)),
             ("format", f"{fmt}: `{architecture}`, {str(dtype).removeprefix('torch.')} safetensors"),
             ("made by", f"`{command}`")]
    trained_with = record.detail("command", None) if record is not None else None
    if trained_with:
        processes = record.detail("processes", 1)
        rows.insert(-2, ("trained with", f"`python {trained_with}`" + (f" on {processes} processes" if processes > 1 else "")))
    front = ["---", "library_name: transformers", "tags:", "- dualadam_hf", f"- {'lora-merged' if trained.base else 'fine-tuned'}"]
    if base and not is_builtin(base) and not Path(base).expanduser().exists() and base.count("/") == 1:
        front.append(f"base_model: {base}")  # the Hub takes only Hub ids here
    front.append("---")
    how = ("`import dualadam_hf` registers the model type with transformers' Auto classes; tools that read the "
           "published openPangu-Embedded format read this folder as they read the original checkpoint."
           if fmt == "openpangu" else
           "Stock transformers loads it (`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained`), "
           "without dualadam_hf.")
    table = ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    return "\n".join([*front, "", f"# {trained.summary()}", "", *table, "", how, ""])


def export(source: str, out: Path, *, fmt: str | None, dtype: str, overwrite: bool, max_shard_size: str,
           command: str) -> tuple[TrainedModel, str, torch.dtype]:
    """Write the export of ``source`` to ``out``; returns what was loaded, the format and the dtype."""
    folder = Path(source).expanduser()
    check_out(out, folder if folder.is_dir() else None, overwrite)
    trained = load_trained(source, dtype="auto")
    config = trained.model.get_base_model().config if trained.base is not None else trained.model.config
    fmt = choose_format(config.model_type, fmt, source)
    published = published_files(trained) if fmt == "openpangu" else {}
    if published:
        check_vocabulary(published["tokenizer.model"], trained.tokenizer)
    model, target = merged_model(trained, DTYPES[dtype])
    model.config.use_cache = True  # a run may have saved false (packing, activation checkpointing); serving wants it
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        trained.tokenizer.save_pretrained(staging)
        if fmt == "openpangu":
            write_openpangu(staging, trained.tokenizer, published, target)
        else:
            write_llama(staging, config.model_type)
        architecture = json.loads((staging / "config.json").read_text())["architectures"][0]
        (staging / MODEL_CARD).write_text(model_card(trained, fmt, target, command, architecture), encoding="utf-8")
        replace(staging, out)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):  # a full disk, a folder it may not write: one line, nothing left behind
            raise ExportError(f"--out {out}: writing the export failed: {error.strerror or error}") from None
        raise
    return trained, fmt, target


def replace(staging: Path, out: Path) -> None:
    """Move the finished export into place; an existing ``out`` is moved aside first and removed after."""
    if not out.exists():
        staging.rename(out)
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    out.rename(previous / out.name)
    staging.rename(out)
    shutil.rmtree(previous)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="RUN_DIR",
                        help="a run's output_dir (full weights or a LoRA adapter, merged into the base model its "
                        "run_config.json names), one of its checkpoint-N folders, a model folder or a Hub id")
    parser.add_argument("--out", type=Path, required=True,
                        help="the folder to write; must not exist or be empty, unless --overwrite")
    parser.add_argument("--format", dest="fmt", choices=tuple(ACCEPTS), default=None,
                        help="openpangu: the published openPangu-Embedded layout (default for openPangu runs); "
                        "llama: LlamaForCausalLM and a plain tokenizer.json, loadable by stock transformers (default "
                        "for Llama runs)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="auto",
                        help="weights' dtype (auto: as the run stored them; a LoRA run: as its base). An adapter is "
                        "merged in fp32 first")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="largest safetensors file; bigger models are split into shards with an index (default 5GB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out (only one that holds a model: a config.json)")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "export.py", description: str = "") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog, description).parse_args(argv)
    quiet_libraries()
    # the export runs on the CPU; DeepSpeed, which accelerate imports when saving if it is installed, would print
    # its guess of the accelerator to stdout
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    command = shlex.join(["python", f"scripts/{prog}", *argv])
    try:
        trained, fmt, dtype = export(args.model, args.out, fmt=args.fmt, dtype=args.dtype, overwrite=args.overwrite,
                                     max_shard_size=args.max_shard_size, command=command)
    except ValueError as error:  # ExportError, ServeError, ModelLoadError, RunRecordError: one line each
        report_error(str(error))
        return 2 if isinstance(error, UsageError) else 1
    files = sorted(path.name for path in args.out.iterdir())
    print(f"exported {args.model} ({trained.summary()}) to {args.out}")
    print(f"format:  {fmt}, {str(dtype).removeprefix('torch.')}")
    print(f"files:   {', '.join(files)}")
    return 0
