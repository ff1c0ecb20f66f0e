"""Checkpoints that are complete or absent, and how to tell which.

A checkpoint is written under a hidden staging name (``.partial-checkpoint-N/checkpoint-N``) and moved to
``checkpoint-N`` by one rename once every process has written its part, so a crash mid-save leaves no
folder that transformers' ``get_last_checkpoint`` (or ``latest`` here) would take for a checkpoint.
Folders written by a run that crashed before this existed (``checkpoint-N`` without its trainer state,
with a 0-byte or truncated file) are recognised by ``missing_parts`` and skipped.

Before the rename, the main process lists every file of the checkpoint with its size and checksum in
``checkpoint_manifest.json`` (``write_manifest``); ``verify`` compares the files with it, so a resume and
``latest`` catch bytes overwritten or cut off after the save. A checkpoint without a manifest (plain
transformers, or dualadam_hf before manifests) is judged by ``missing_parts`` alone.

A save the operating system refuses (disk full, file-size limit, read-only or forbidden folder) becomes one
``SaveError`` line, and what it had written is removed (``save_failures_in_one_line``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import xxhash

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_PREFIX = ".partial-"
TRAINER_STATE = "trainer_state.json"
# Each engine's model weights and optimizer state, as the Trainer lays them out in a checkpoint.
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin",
           "pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")
OPTIMIZER_STATES = ("optimizer.pt", "optimizer_0", "optimizer.bin")
FINISHED_RUN_FILES = ("trainer_state.json", "model.safetensors", "adapter_model.safetensors", "run_config.json",
                      "all_results.json")
MANIFEST = "checkpoint_manifest.json"
# xxh3_128 hashes a checkpoint about as fast as it is read back from the page cache (11 GB/s on one core: 1.2 s
# for a 1B-shape checkpoint of 14 GB, against 7.6 s for sha256: docs/reliability.md); 128 bits leave no chance
# of a damaged file matching by accident. It catches corruption, not tampering: it is not a cryptographic hash.
CHECKSUM = "xxh3_128"
READ_CHUNK = 16 * 2**20
INCOMPLETE = "incomplete"  # why latest_complete skipped a checkpoint that lacks a part (missing_parts)
# torch.save to a path writes through a C++ stream that keeps no errno: a full disk or a file-size limit reads
# "[enforce fail at inline_container.cc] unexpected pos ...", chained to "basic_ios::clear: iostream error"
TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter", "iostream error", "cannot be opened")
# Optimizer state per trained parameter, by the state format the optim name says: codes of one byte (8-bit) or
# half a byte (4-bit) for each of the two moments, plus one fp32 scale per block of torchao's default size;
# any other name is taken for two fp32 moments (DualAdam, AdamW): 8 bytes.
STATE_BYTES = {"8bit": 2 + 2 * 4 / 256, "4bit": 1 + 2 * 4 / 128}
FP32_MOMENTS = 8


class SaveError(RuntimeError):
    """A save the operating system refused; the message is one line: the folder, the OS error, the free space."""


def staging_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"{PARTIAL_PREFIX}checkpoint-{step}"


def _deepspeed_tag(checkpoint: Path) -> Path | None:
    latest = checkpoint / "latest"
    if not latest.is_file():
        return None
    tag = checkpoint / latest.read_text().strip()
    return tag if tag.is_dir() else None


def missing_parts(checkpoint: Path, *, optimizer: bool = True) -> list[str]:
    """What a checkpoint folder lacks to resume from ([] when nothing): its trainer state (present and
    readable JSON), its model weights (non-empty) and, when ``optimizer``, the optimizer state."""
    missing = []
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        missing.append(f"a readable {TRAINER_STATE}")
    deepspeed = _deepspeed_tag(checkpoint)
    weights = [checkpoint / name for name in WEIGHTS if (checkpoint / name).exists()]
    if not deepspeed and not any(path.is_dir() or path.stat().st_size > 0 for path in weights):
        missing.append("model weights")
    if optimizer and not deepspeed and not any((checkpoint / name).exists() for name in OPTIMIZER_STATES):
        missing.append("optimizer state (optimizer.pt)")
    return missing


def checkpoints_in(run_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a run directory, newest (highest N) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [path for path in run_dir.iterdir() if path.is_dir() and CHECKPOINT.match(path.name)]
    return sorted(found, key=lambda path: int(CHECKPOINT.match(path.name).group(1)), reverse=True)


def latest_complete(run_dir: str | Path) -> tuple[Path | None, dict[Path, str]]:
    """The newest checkpoint that has everything to resume from and matches its manifest, and why each newer one
    was skipped: ``INCOMPLETE``, or how its files differ from its manifest."""
    skipped = {}
    for checkpoint in checkpoints_in(run_dir):
        if missing_parts(checkpoint):
            skipped[checkpoint] = INCOMPLETE
        elif problems := verify(checkpoint):
            skipped[checkpoint] = "; ".join(problems)
        else:
            return checkpoint, skipped
    return None, skipped


def skipped_note(skipped: dict[Path, str]) -> str:
    """What ``latest_complete`` skipped, in words: "skipped incomplete checkpoint-8; skipped checkpoint-6, ..."."""
    incomplete = [path.name for path, why in skipped.items() if why == INCOMPLETE]
    notes = [f"skipped incomplete {', '.join(incomplete)}"] if incomplete else []
    notes += [f"skipped {path.name}, which fails its {MANIFEST} ({why})" for path, why in skipped.items()
              if why != INCOMPLETE]
    return "; ".join(notes)


# ---- manifests ----

def checksum(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with path.open("rb") as file:
        while chunk := file.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(checkpoint: Path) -> Path:
    """List every file of a fully written checkpoint (relative path, size, checksum) in its ``MANIFEST``."""
    files = [
        {"path": path.relative_to(checkpoint).as_posix(), "size": path.stat().st_size, "checksum": checksum(path)}
        for path in sorted(checkpoint.rglob("*")) if path.is_file() and path != checkpoint / MANIFEST
    ]
    manifest = checkpoint / MANIFEST
    manifest.write_text(json.dumps({"algorithm": CHECKSUM, "files": files}, indent=1) + "\n")
    return manifest


def verify(checkpoint: Path, *, optimizer: bool = True) -> list[str]:
    """How a checkpoint's files differ from its manifest ([] when they match, or when it has no manifest). Sizes
    first: a file is read for its checksum only when its size matches. Files the manifest does not list are not
    judged. Without ``optimizer``, the optimizer state is not checked (a weights-only resume does not read it)."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        algorithm = manifest["algorithm"]
        files = [(entry["path"], int(entry["size"]), entry["checksum"]) for entry in manifest["files"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"{MANIFEST} is unreadable ({type(error).__name__}: {error})"]
    if algorithm != CHECKSUM:
        return [f"{MANIFEST} uses the checksum {algorithm!r}, this version reads {CHECKSUM}"]
    problems, same_size = [], []
    for name, size, digest in files:
        if not optimizer and PurePosixPath(name).parts[0] in OPTIMIZER_STATES:
            continue
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, its manifest {size}")
        else:
            same_size.append((name, digest))
    problems += [f"{name} does not match its {CHECKSUM} checksum" for name, digest in same_size
                 if checksum(checkpoint / name) != digest]
    return problems


def partial_dirs(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    return sorted(run_dir.glob(f"{PARTIAL_PREFIX}checkpoint-*")) if run_dir.is_dir() else []


def publish(run_dir: str | Path, step: int) -> Path:
    """Move a fully written staged checkpoint into place (one rename) and drop its staging folder."""
    staging = staging_dir(run_dir, step)
    final = Path(run_dir) / f"checkpoint-{step}"
    if final.exists():  # the same step saved again (a resumed run re-saving its own step)
        shutil.rmtree(final)
    (staging / final.name).rename(final)
    shutil.rmtree(staging)
    return final


# ---- saves the operating system refuses ----

@contextmanager
def save_failures_in_one_line(target: Path, *, partial: Path | None = None, kept: str) -> Iterator[None]:
    """Turn a save the OS refuses into ``SaveError`` (one line: ``target``, the OS error, the free space, and
    ``kept``: what is left), once what the save wrote is removed: ``partial`` (a staging folder), or else the files
    it created or changed directly in ``target``. Any other failure goes through untouched, ``partial`` kept."""
    before = {} if partial else _file_stamps(target)
    try:
        yield
    except Exception as error:
        written = [partial] if partial else [path for path, stamp in _file_stamps(target).items()
                                             if before.get(path) != stamp]
        os_error = _os_error(error, written)
        if os_error is None:
            raise
        for path in written:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        free = shutil.disk_usage(_existing(target)).free
        raise SaveError(f"could not save {target}: {os_error}; {human_size(free)} free there; the partial save is "
                        f"removed, {kept}") from error


def _file_stamps(folder: Path) -> dict[Path, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir() if path.is_file()}


def _existing(path: Path) -> Path:
    return next(candidate for candidate in (path, *path.parents) if candidate.exists())


def _named(code: int) -> str:
    return f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"


def _os_error(error: BaseException, written: list[Path]) -> str | None:
    """The OS error behind a failed write, in words; None when ``error`` is no write failure. Python's own writes
    chain an OSError and safetensors says "(os error N)"; torch.save's C++ stream keeps no errno, so for it the
    conditions that make each error are looked up."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for cause in chain:
        if isinstance(cause, OSError) and cause.errno:
            return _named(cause.errno) + (f" writing {cause.filename}" if cause.filename else "")
        if found := re.search(r"\(os error (\d+)\)", str(cause)):
            return _named(int(found.group(1)))
    if not any(marker in str(cause) for cause in chain for marker in TORCH_WRITE_FAILURES):
        return None
    files = [file for path in written for file in ([path] if path.is_file() else path.rglob("*")) if file.is_file()]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and (full := [file for file in files if file.stat().st_size >= limit]):
        # the write that failed stopped at the limit exactly; a larger file is another process's (no limit there)
        full.sort(key=lambda file: file.stat().st_size != limit)
        return f"{_named(errno.EFBIG)} writing {full[0]}: the file-size limit (ulimit -f) is {limit} bytes"
    folder = _existing(written[0]) if written else Path.cwd()
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return _named(errno.EROFS)
    if not os.access(folder, os.W_OK):
        return _named(errno.EACCES)
    if shutil.disk_usage(folder).free < 2**20:
        return _named(errno.ENOSPC)
    return f"torch.save failed ({str(chain[0]).splitlines()[0]})"


def human_size(count: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{int(count)} B"


# ---- will a checkpoint fit ----

def checkpoint_bytes(model: Any, optim: str) -> tuple[int, int]:
    """Estimated bytes of (the weights a save writes, the optimizer state a checkpoint adds) for ``model`` trained
    with the optimizer named ``optim``: weights at their dtype, only the trained ones (the adapter) for a PEFT
    model; optimizer state for the trained parameters, by the format in ``STATE_BYTES``."""
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    saved = trained if getattr(model, "peft_config", None) else list(model.parameters())
    per_parameter = next((size for kind, size in STATE_BYTES.items() if kind in optim), FP32_MOMENTS)
    return (sum(parameter.numel() * parameter.element_size() for parameter in saved),
            round(per_parameter * sum(parameter.numel() for parameter in trained)))


def free_space_warning(args: Any, model: Any) -> str | None:
    """Why ``args.output_dir``'s disk may not hold one checkpoint plus the final model; None when it can."""
    weights, state = checkpoint_bytes(model, str(getattr(args.optim, "value", args.optim)))
    state = 0 if args.save_only_model else state
    checkpoint = 0 if args.save_strategy == "no" else weights + state
    free = shutil.disk_usage(_existing(Path(args.output_dir))).free
    if free >= checkpoint + weights:
        return None
    needed = [f"one checkpoint ({human_size(checkpoint)}: weights {human_size(weights)} + optimizer state "
              f"{human_size(state)})"] if checkpoint else []
    needed.append(f"the final model ({human_size(weights)})")
    return (f"{human_size(free)} free for {args.output_dir}, less than {' plus '.join(needed)}; a save that runs out "
            "of space stops the run")
