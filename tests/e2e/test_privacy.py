"""Text goes to W&B only for shipped, unchanged data or on the user's own opt-in."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_script
from omegaconf import OmegaConf

from clintune.privacy import OPT_IN_KEY, SHIPPED_DATA_DIR, read_manifest, text_policy
from clintune.wandb_files import find_offline_runs, read_run

SHIPPED_TASKS = ("classification", "triage", "reasoning", "summarization")
SPLITS = ("train", "val", "test")
QUICK = [
    "method=sft",
    "method.train.max_steps=2",
    "method.train.batch_size=4",
    "subsample.train=8",
    "subsample.val=4",
    "eval.limit=6",
    "eval.bootstrap.samples=20",
    "eval.progress_bar=false",
]


def _shipped_data(task: str = "classification") -> dict[str, object]:
    return {s: str(SHIPPED_DATA_DIR / task / f"{s}.jsonl") for s in SPLITS} | {"hub": None}


# Real public data sets judged non-sensitive (data/real/prepare.py's PROVENANCE says why;
# tests/unit/test_real_data.py checks that manifest against it).
REAL_NON_SENSITIVE = ("mts_dialog", "pubmedqa", "medqa")


def test_the_manifest_lists_every_shipped_split() -> None:
    manifest = read_manifest()
    synthetic = {f"{task}/{split}.jsonl" for task in SHIPPED_TASKS for split in SPLITS}
    real = {f"real/{name}/{split}.jsonl" for name in REAL_NON_SENSITIVE for split in SPLITS}
    assert set(manifest) == synthetic | real


def test_shipped_real_data_may_show_text_and_an_edited_copy_may_not(tmp_path: Path) -> None:
    for name in REAL_NON_SENSITIVE:
        data = {s: str(SHIPPED_DATA_DIR / "real" / name / f"{s}.jsonl") for s in SPLITS}
        assert text_policy({**data, "hub": None}, SPLITS).may_log_text
    data_dir = tmp_path / "data"
    shutil.copytree(SHIPPED_DATA_DIR / "real" / "pubmedqa", data_dir / "real" / "pubmedqa")
    shutil.copyfile(SHIPPED_DATA_DIR / "real" / "shipped.sha256", data_dir / "real/shipped.sha256")
    data = {s: str(data_dir / "real" / "pubmedqa" / f"{s}.jsonl") for s in SPLITS}
    assert text_policy(data, SPLITS, data_dir).may_log_text
    with open(data["test"], "a", encoding="utf-8") as handle:
        handle.write("\n")
    policy = text_policy(data, SPLITS, data_dir)
    assert set(policy.sensitive_splits) == {"test"}
    assert "differs from the shipped file" in policy.sensitive_splits["test"]


def test_shipped_files_at_their_paths_may_show_text() -> None:
    for task in SHIPPED_TASKS:
        policy = text_policy(_shipped_data(task), SPLITS)
        assert policy.may_log_text, policy.sensitive_splits


def test_a_copy_of_shipped_data_elsewhere_is_sensitive(tmp_path: Path) -> None:
    data = {}
    for split in SPLITS:
        copy = tmp_path / f"{split}.jsonl"
        shutil.copyfile(SHIPPED_DATA_DIR / "classification" / f"{split}.jsonl", copy)
        data[split] = str(copy)
    policy = text_policy(data, SPLITS)
    assert not policy.may_log_text
    assert set(policy.sensitive_splits) == set(SPLITS)
    assert OPT_IN_KEY in policy.withheld_message()


def test_one_sensitive_split_withholds_text_for_the_whole_run(tmp_path: Path) -> None:
    data = _shipped_data()
    own_test = tmp_path / "test.jsonl"
    shutil.copyfile(str(data["test"]), own_test)
    data["test"] = str(own_test)
    policy = text_policy(data, SPLITS)
    assert not policy.may_log_text
    assert list(policy.sensitive_splits) == ["test"]


def test_a_shipped_file_edited_in_place_is_sensitive(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(SHIPPED_DATA_DIR / "classification", data_dir / "classification")
    shutil.copyfile(SHIPPED_DATA_DIR / "shipped.sha256", data_dir / "shipped.sha256")
    data = {s: str(data_dir / "classification" / f"{s}.jsonl") for s in SPLITS}
    assert text_policy(data, SPLITS, data_dir).may_log_text
    with open(data["val"], "a", encoding="utf-8") as handle:
        handle.write('{"id": "mine", "text": "my patient", "label": "yes"}\n')
    policy = text_policy(data, SPLITS, data_dir)
    assert not policy.may_log_text
    assert "differs from the shipped file" in policy.sensitive_splits["val"]


def test_the_users_explicit_flag_decides() -> None:
    copies = {s: f"/elsewhere/{s}.jsonl" for s in SPLITS}
    assert text_policy({**copies, "contains_sensitive_text": False}, SPLITS).may_log_text
    shipped = _shipped_data()
    assert not text_policy({**shipped, "contains_sensitive_text": True}, SPLITS).may_log_text


def test_hub_data_counts_only_for_the_data_set_its_config_names() -> None:
    hub = {"dataset": "gretelai/symptom_to_diagnosis"}
    declared = {**hub, "non_sensitive_dataset": "gretelai/symptom_to_diagnosis"}
    assert text_policy({"hub": declared}, SPLITS).may_log_text
    assert not text_policy({"hub": hub}, SPLITS).may_log_text
    # A user who points a shipped hub config at their own data set inherits nothing.
    mine = {**declared, "dataset": "me/private-notes"}
    assert not text_policy({"hub": mine}, SPLITS).may_log_text


def test_no_shipped_config_opts_in_on_the_users_behalf() -> None:
    """false is the user's switch; a shipped file that sets it would hand it to everyone who
    composes that file with their own data."""
    offenders = []
    for path in sorted((REPO / "conf").rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        loaded = OmegaConf.create(yaml.safe_load(text) or {})
        for key in ("data.contains_sensitive_text", "task.data.contains_sensitive_text"):
            if OmegaConf.select(loaded, key) is False:
                offenders.append(f"{path.relative_to(REPO)}: {key}")
        if "contains_sensitive_text=false" in text.replace(" ", ""):
            offenders.append(f"{path.relative_to(REPO)}: override")
    assert offenders == []


# ---- real train.py runs, scanning every byte W&B wrote -------------------------------------


def _texts_of(run_dir: Path, test_file: Path) -> list[str]:
    """Every long string of the evaluated test records and their predictions: inputs,
    options, targets, outputs, judge outputs. Short ones ("yes") also occur in the config."""
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").open()]
    evaluated = {row["id"] for row in predictions}
    records = [json.loads(line) for line in test_file.open()]
    texts: list[str] = []
    for row in [r for r in records if r["id"] in evaluated] + predictions:
        for key, value in row.items():
            values = value if isinstance(value, list) else [value]
            texts += [v for v in values if key != "id" and isinstance(v, str) and len(v) >= 24]
    return texts


def _needles(text: str) -> set[bytes]:
    """Slices from the start, middle and end, raw and JSON-escaped: a string split across
    the .wandb file's 32 KiB blocks still leaves some slice whole."""
    middle = len(text) // 2 - 12
    slices = {text[:24], text[middle : middle + 24], text[-24:]}
    needles: set[bytes] = set()
    for piece in slices:
        needles.add(piece.encode())
        needles.add(json.dumps(piece)[1:-1].encode())
        needles.add(json.dumps(piece, ensure_ascii=False)[1:-1].encode())
    return needles


def _wandb_bytes(run_dir: Path) -> list[tuple[Path, bytes]]:
    files = [path for path in (run_dir / "wandb").rglob("*") if path.is_file()]
    assert files, "the run wrote no W&B files"
    return [(path, path.read_bytes()) for path in files]


def _texts_found_in_wandb(run_dir: Path, test_file: Path) -> list[str]:
    texts = _texts_of(run_dir, test_file)
    assert texts, "nothing to look for"
    contents = _wandb_bytes(run_dir)
    return [
        f"{path.name}: {text[:40]!r}"
        for text in texts
        for path, content in contents
        if any(needle in content for needle in _needles(text))
    ]


def _readme_csv_example(dest: Path) -> list[str]:
    """README's bring-your-own-data example as written: CSV files with their own columns."""
    for split in SPLITS:
        rows = [
            json.loads(line)
            for line in (SHIPPED_DATA_DIR / "classification" / f"{split}.jsonl").open()
        ]
        with open(dest / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["note_id", "note", "verdict"])
            writer.writerows([row["id"], row["text"], row["label"]] for row in rows)
    return [
        "task=classification",
        *(f"task.data.{split}={dest / f'{split}.csv'}" for split in SPLITS),
        "task.data.field_map={note_id: id, note: text, verdict: label}",
    ]


def _copy_task_data(task: str, dest: Path) -> list[str]:
    dest.mkdir(parents=True)
    if task == "classification":
        return _readme_csv_example(dest)
    overrides = [f"task={task}"]
    for split in SPLITS:
        shutil.copyfile(SHIPPED_DATA_DIR / task / f"{split}.jsonl", dest / f"{split}.jsonl")
        overrides.append(f"task.data.{split}={dest / f'{split}.jsonl'}")
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("task", SHIPPED_TASKS)  # classification: README's CSV example as written
def test_own_copy_of_a_shipped_task_keeps_all_text_out_of_wandb(
    task: str, tmp_path: Path, run_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    paths = _copy_task_data(task, tmp_path / "my")
    result = run_script("train.py", [*paths, *QUICK, f"hydra.run.dir={run_dir}"], run_env)
    shipped_test = SHIPPED_DATA_DIR / task / "test.jsonl"  # the same records as the copies
    assert _texts_found_in_wandb(run_dir, shipped_test) == []
    (run_file,) = find_offline_runs(run_dir / "wandb")
    run = read_run(run_file)
    assert run.tables == []
    assert run.exit_code == 0
    assert any(key.startswith("test/") for key in run.summary)  # numbers still go
    assert OPT_IN_KEY in result.stdout + result.stderr  # the one line that says how to allow it


@pytest.mark.slow
def test_explicit_opt_in_puts_the_table_back(tmp_path: Path, run_env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    paths = _copy_task_data("triage", tmp_path / "my")
    run_script(
        "train.py",
        [*paths, *QUICK, OPT_IN_KEY, f"hydra.run.dir={run_dir}"],
        run_env,
    )
    assert read_run(find_offline_runs(run_dir / "wandb")[0]).tables != []
    assert _texts_found_in_wandb(run_dir, tmp_path / "my" / "test.jsonl") != []


@pytest.mark.slow
def test_shipped_data_at_its_shipped_path_keeps_its_table(
    tmp_path: Path, run_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    run_script("train.py", ["task=triage", *QUICK, f"hydra.run.dir={run_dir}"], run_env)
    assert read_run(find_offline_runs(run_dir / "wandb")[0]).tables != []
    found = _texts_found_in_wandb(run_dir, SHIPPED_DATA_DIR / "triage" / "test.jsonl")
    assert found != []  # the scan sees text where text was allowed
