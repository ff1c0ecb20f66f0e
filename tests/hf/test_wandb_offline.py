"""W&B, proven offline: a run with ``report_to: wandb`` under ``WANDB_MODE=offline`` writes eval_ppl, eval_gen_gap,
dualadam_alpha and the table of generation samples into its local run files, read back here record by record."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = 3


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` run file: W&B's header (``:W&B``, magic, version), then a LevelDB-style log of
    32 KiB blocks whose records (crc32, length, type: full, first, middle, last) hold ``wandb.proto`` Records.
    wandb >= 0.2x writes it from its Go core and no longer ships a Python reader."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path}: not a W&B run file"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        payload = data[position + 7 : position + 7 + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad record at {position}"
        position += 7 + length
        pending += payload
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history(records: list) -> list[dict]:
    """Each logged step's values by key; a media value (a table) is a dict of its fields (W&B stores them under
    nested keys)."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            *parents, last = list(item.nested_key) or [item.key]
            target = row
            for key in parents:
                target = target.setdefault(key, {})
            target[last] = json.loads(item.value_json)
        rows.append(row)
    return rows


@pytest.mark.slow
def test_an_offline_wandb_run_holds_the_metrics_and_the_samples_table(tmp_path):
    output_dir = tmp_path / "run"
    environment = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true",
                       HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    environment.pop("WANDB_API_KEY", None)
    result = subprocess.run(
        [sys.executable, "scripts/finetune.py", "recipes/tiny_alpaca.yaml", "--report_to", "wandb",
         "--output_dir", str(output_dir), "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "1",
         "--max_train_samples", "32", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
         "--generation_eval_samples", str(SAMPLES), "--generation_max_new_tokens", "8", "--disable_tqdm", "true"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (run_folder,) = (tmp_path / "wandb").glob("offline-run-*")
    (run_file,) = run_folder.glob("run-*.wandb")
    rows = history(wandb_records(run_file))

    trained = [row for row in rows if "train/loss" in row]
    assert [row["train/global_step"] for row in trained] == [1, 2, 3, 4]
    assert all(0.0 <= row["train/dualadam_alpha"] <= 1.0 for row in trained) and trained[0]["train/dualadam_alpha"] > 0

    log_history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in log_history if "eval_ppl" in entry]
    evaluated = [row for row in rows if "eval/ppl" in row]
    assert [row["train/global_step"] for row in evaluated] == [entry["step"] for entry in evaluations] == [2, 4]
    for row, entry in zip(evaluated, evaluations):
        assert row["eval/ppl"] == pytest.approx(entry["eval_ppl"]) and row["eval/gen_gap"] == pytest.approx(entry["eval_gen_gap"])
        # the samples table, logged with the evaluation's metrics: its file holds the samples the run wrote
        table = row["eval/generations"]
        assert table["_type"] == "table-file" and table["nrows"] == SAMPLES and table["ncols"] == 3
        content = json.loads((run_folder / "files" / table["path"]).read_text(encoding="utf-8"))
        written = [json.loads(line) for line in (output_dir / "generations" / f"step_{entry['step']}.jsonl").read_text(
            encoding="utf-8").splitlines()]
        assert content["columns"] == ["prompt", "reference", "answer"]
        assert content["data"] == [[sample["prompt"], sample["reference"], sample["answer"]] for sample in written]
