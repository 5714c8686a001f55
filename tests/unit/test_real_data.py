"""data/real/prepare.py: every quirk that ../shared/realdata/README.md lists, on small raw
files written here (so these run without the raw data), and the committed JSONL through the
real task configs. The full rebuild (--check) runs only where the raw files are."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import pytest
from helpers import REPO, compose_train

from clintune.pipeline import check_leakage
from clintune.privacy import read_manifest

REAL = REPO / "data" / "real"
SCRIPT = REAL / "prepare.py"


def _load_prepare() -> Any:
    spec = importlib.util.spec_from_file_location("clintune_real_prepare", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


prep = _load_prepare()
RAW = prep.DEFAULT_RAW
needs_raw = pytest.mark.skipif(
    not all((RAW / name).is_dir() for name in prep.DATASETS),
    reason=f"the raw files are not at {RAW} (they are not part of the repository)",
)


# --------------------------------------------------------------------------- MTS-Dialog


def _write_csv(path: Path, rows: list[dict[str, str]], row_end: str) -> None:
    """A CSV as the MTS-Dialog files are: quoted multi-line cells, rows ended by ``row_end``."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(
            handle, ["ID", "section_header", "section_text", "dialogue"], lineterminator=row_end
        )
        writer.writeheader()
        writer.writerows(rows)


def _row(row_id: int, dialogue: str, summary: str = "The patient has a mild cough.") -> dict:
    return {
        "ID": str(row_id),
        "section_header": "CC",
        "section_text": summary,
        "dialogue": dialogue,
    }


def test_crlf_inside_cells_and_trailing_spaces(tmp_path: Path) -> None:
    # The training file: CRLF for rows and inside cells; 60% of lines end in a space.
    dialogue = "Doctor: How are you? \r\nPatient: I have a cough.  \r\n Doctor: Since when? "
    _write_csv(tmp_path / "t.csv", [_row(0, dialogue)], "\r\n")
    [row] = prep.read_csv_rows(tmp_path / "t.csv")
    text, removed = prep.clean_dialogue(row["dialogue"])
    assert text == "Doctor: How are you?\nPatient: I have a cough.\nDoctor: Since when?"
    assert "\r" not in text and not removed


def test_bare_lf_inside_cells_with_crlf_rows(tmp_path: Path) -> None:
    _write_csv(tmp_path / "v.csv", [_row(0, "Doctor: Hi.\nPatient: Hello."), _row(1, "x")], "\r\n")
    rows = prep.read_csv_rows(tmp_path / "v.csv")
    assert [r["ID"] for r in rows] == ["0", "1"]  # a reader line by line would see 3 rows
    assert prep.clean_dialogue(rows[0]["dialogue"])[0] == "Doctor: Hi.\nPatient: Hello."


@pytest.mark.parametrize(
    ("raw", "expected", "removed"),
    [
        # train-307: "Sp 3" after a blank line
        ("Doctor: Hi.\r\nPatient: Hi.\r\n\r\nSp 3", "Doctor: Hi.\nPatient: Hi.", "stray_blocks"),
        # train-1114: a fragment of three turns, a blank line, then the dialogue
        (
            "Patient: Um.\r\nDoctor: Yes?\r\n\r\nDoctor: Hello.\r\nPatient: Hi.\r\n"
            "Doctor: Why?\r\nPatient: Pain.",
            "Doctor: Hello.\nPatient: Hi.\nDoctor: Why?\nPatient: Pain.",
            "stray_blocks",
        ),
        # test1-102: a lone "." line at the end
        ("Doctor: Oops!\nPatient: Hm.\n.", "Doctor: Oops!\nPatient: Hm.", "punctuation_only_lines"),
        # test1-194: the cell wrapped in literal double quotes
        ('"Doctor: Married?\nPatient: No."', "Doctor: Married?\nPatient: No.", "wrapping_quotes"),
    ],
)  # fmt: skip
def test_stray_content_is_removed_and_counted(raw: str, expected: str, removed: str) -> None:
    text, counts = prep.clean_dialogue(raw)
    assert text == expected
    assert counts[removed] == 1


def test_quotes_inside_a_dialogue_are_kept() -> None:
    raw = 'Doctor: Did he say "soon"?\nPatient: He said "tomorrow".'
    assert prep.clean_dialogue(raw)[0] == raw


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Guest_family: Hi.", "Guest_family: Hi."),
        ("Guest_clinician: Hi.", "Guest_clinician: Hi."),
        ("Doctor_2: Hi.", "Doctor_2: Hi."),
        ("Guest_family_1: Hi.", "Guest_family_1: Hi."),
        ("Guest_family_2: Hi.", "Guest_family_2: Hi."),
        ("Guest_family2: Hi.", "Guest_family_2: Hi."),
        ("Guest_clinican: Hi.", "Guest_clinician: Hi."),
        ("Gest_family: Hi.", "Guest_family: Hi."),
        ("Docotr_2: Hi.", "Doctor_2: Hi."),
        ("Guest_family. Hello. I'm his wife.", "Guest_family: Hello. I'm his wife."),  # train-1156
        ("Okay. Thanks.", "Okay. Thanks."),  # a sentence, not a speaker
        ("Note: the patient left.", "Note: the patient left."),  # an unknown tag stays as it is
    ],
)
def test_speaker_tags_get_one_spelling(line: str, expected: str) -> None:
    assert prep.canonical_turn(line)[0] == expected


def test_non_ascii_punctuation_is_folded() -> None:
    # train-1066 uses U+201A as a comma; curly quotes and the ellipsis occur in train too.
    text = prep.fold_unicode("Well\u201a I am \u201cfine\u201d\u2026 it\u2019s ok \u2014 really")
    assert text == 'Well, I am "fine"... it\'s ok \u2014 really'


def _mts_raw(tmp_path: Path, files: dict[str, list[dict[str, str]]]) -> Path:
    raw = tmp_path / "mts_dialog"
    raw.mkdir()
    for key, name in prep.MTS_FILES.items():
        _write_csv(raw / name, files.get(key, []), "\r\n")
    return raw


def test_ids_repeat_across_files_and_get_the_files_name(tmp_path: Path) -> None:
    files = {key: [_row(0, f"Doctor: Visit {key}.\nPatient: Yes.")] for key in prep.MTS_FILES}
    splits, _ = prep.build_mts_dialog(_mts_raw(tmp_path, files))
    ids = [r["id"] for split in prep.SPLITS for r in splits[split]]
    assert sorted(ids) == ["mts-test1-0", "mts-test2-0", "mts-train-0", "mts-val-0"]


def test_duplicate_dialogues_are_kept_once_in_the_held_out_split(tmp_path: Path) -> None:
    shared = "Doctor: Any allergies? \r\nPatient: None."
    files = {
        # train-56 = val-58 (the train copy with other whitespace), train-256 = train-1109
        "train": [
            _row(56, "Doctor:  Any allergies?\r\nPatient: None. "),
            _row(256, "Doctor: Smoke?\nPatient: No."),
            _row(1109, "Doctor: Smoke?\nPatient: No."),
            _row(7, "Doctor: Pain?\nPatient: Yes."),
        ],
        "val": [_row(58, shared)],
        # test2-59 = test2-153
        "test2": [
            _row(59, "Doctor: Fever?\nPatient: No."),
            _row(153, "Doctor: Fever?\nPatient: No."),
        ],
    }
    splits, counts = prep.build_mts_dialog(_mts_raw(tmp_path, files))
    assert [r["id"] for r in splits["val"]] == ["mts-val-58"]
    assert [r["id"] for r in splits["train"]] == ["mts-train-256", "mts-train-7"]
    assert [r["id"] for r in splits["test"]] == ["mts-test2-59"]
    assert counts["train/dropped_duplicate_across_splits"] == 1
    assert counts["train/dropped_duplicate_within_splits"] == 1
    assert counts["test/dropped_duplicate_within_splits"] == 1


def test_summary_length_filter_section_line_and_boilerplate_count(tmp_path: Path) -> None:
    boilerplate = "He has no known drug allergies."
    files = {
        "train": [_row(0, "Doctor: Allergies?\nPatient: No.", boilerplate)],
        "val": [_row(0, "Doctor: A?\nPatient: B.", "Too short.")],
        "test1": [
            _row(0, "Doctor: Any allergy?\nPatient: None.", boilerplate),
            _row(1, "Doctor: C?\nPatient: D.", " ".join(["word"] * 61)),
        ],
    }
    splits, counts = prep.build_mts_dialog(_mts_raw(tmp_path, files))
    assert counts["val/dropped_summary_length"] == 1 and counts["test/dropped_summary_length"] == 1
    # The dialogues differ, so a common summary is not leakage: kept, and counted.
    assert counts["test/summary_equals_a_train_summary"] == 1
    [record] = splits["test"]
    assert record["text"].endswith("\n\nSection to write: chief complaint")
    assert record["summary"] == boilerplate and record["section_header"] == "CC"


def test_an_unknown_section_header_stops_the_conversion(tmp_path: Path) -> None:
    row = {**_row(3, "Doctor: Hi.\nPatient: Hi."), "section_header": "NEWSECTION"}
    with pytest.raises(ValueError, match="train-3: unknown section header 'NEWSECTION'"):
        prep.build_mts_dialog(_mts_raw(tmp_path, {"train": [row]}))


# --------------------------------------------------------------------------- PubMedQA


def _pubmedqa_raw(tmp_path: Path, items: dict[str, dict], test: dict[str, str]) -> Path:
    raw = tmp_path / "pubmedqa"
    raw.mkdir()
    (raw / "ori_pqal.json").write_text(json.dumps(items), encoding="utf-8")
    (raw / "test_ground_truth.json").write_text(json.dumps(test), encoding="utf-8")
    return raw


def _pqal(question: str, decision: str, contexts: list[str] | None = None) -> dict:
    contexts = contexts or ["We studied it.", "It worked."]
    return {
        "QUESTION": question,
        "CONTEXTS": contexts,
        "LABELS": ["BACKGROUND", "MATERIALS AND METHODS"][: len(contexts)],
        "LONG_ANSWER": "The conclusion that gives the answer away.",
        "final_decision": decision,
    }


def test_pubmedqa_unicode_spaces_inside_numbers_and_middle_dot_decimals() -> None:
    # pqal-22227642 "p\u2009=\u20090.01"; NBSP, hair, narrow NBSP and U+2005 elsewhere;
    # pqal-23794696 writes decimals with a middle dot.
    raw = "p\u2009=\u20090.01, 6.0\u00a0mm, n\u200a=\u200a12, 5\u202f%, a\u2005b, AUC 0\u00b7718"
    assert prep.fold_unicode(raw) == "p = 0.01, 6.0 mm, n = 12, 5 %, a b, AUC 0.718"


def test_pubmedqa_text_labels_question_last_maybe_dropped_official_test(tmp_path: Path) -> None:
    items = {
        "1": _pqal("Does X help?", "yes", ["Aim\u2009of it.", "Found\u00a0it."]),
        "2": _pqal("Does Y help?", "no"),
        "3": _pqal("Does Z help?", "maybe"),
        **{str(i): _pqal(f"Question {i}?", "yes" if i % 2 else "no") for i in range(10, 120)},
    }
    raw = _pubmedqa_raw(tmp_path, items, {"1": "yes", "3": "maybe"})
    splits, counts = prep.build_pubmedqa(raw)
    [test] = splits["test"]
    assert test == {
        "id": "pqal-1",
        "text": "BACKGROUND: Aim of it.\nMATERIALS AND METHODS: Found it.\n\n"
        "Question: Does X help?",
        "label": "yes",
    }
    assert "give the answer away" not in json.dumps(splits)  # LONG_ANSWER is left out
    assert counts["test/dropped_maybe"] == 1
    assert len(splits["val"]) == prep.PUBMEDQA_VAL and len(splits["train"]) == 111 - 100


def test_pubmedqa_refuses_a_test_label_that_disagrees(tmp_path: Path) -> None:
    raw = _pubmedqa_raw(tmp_path, {"1": _pqal("Q?", "yes")}, {"1": "no"})
    with pytest.raises(ValueError, match="pubmedqa 1: test label 'no'"):
        prep.build_pubmedqa(raw)


# --------------------------------------------------------------------------- MedQA


def _medqa_item(question: str, options: dict[str, str], answer: str) -> dict:
    return {
        "question": question,
        "answer": options[answer],
        "options": options,
        "meta_info": "step1",
        "answer_idx": answer,
    }


FIVE = {"A": "Alpha", "B": "Beta", "C": "Gamma", "D": "Delta", "E": "Epsilon"}


def test_medqa_reads_a_file_without_a_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "dev.jsonl"
    rows = [_medqa_item("Q1?", FIVE, "A"), _medqa_item("Q2?", FIVE, "B")]
    path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    assert [row["question"] for row in prep.read_jsonl(path)] == ["Q1?", "Q2?"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # lab tables span lines (dev line 4): kept, each line stripped
        ("Labs:\nNa+: 140  \nK+: 4.0 mEq/L\nWhich?", "Labs:\nNa+: 140\nK+: 4.0 mEq/L\nWhich?"),
        # a stray closing quote (67 dev, 69 test questions) goes; a quoted phrase stays
        ('Which is most likely?"', "Which is most likely?"),
        ('He said "I am tired." Which is it?"', 'He said "I am tired." Which is it?'),
        ('He says "I am tired." Which?', 'He says "I am tired." Which?'),
        # spaces and newlines at the ends
        ("  Which?\n", "Which?"),
        # Cyrillic look-alikes (test line 41 "А 43-уеаr-old") and the kasra before dev-25
        ("\u0410 43-\u0443\u0435\u0430r-old man", "A 43-year-old man"),
        ("\u0650A 62-year-old", "A 62-year-old"),
        # µ and μ, ℃ and °C: one spelling each
        ("5 \u00b5g and 5 \u03bcg at 38\u2103", "5 \u03bcg and 5 \u03bcg at 38\u00b0C"),
        # source typos are the source's: left alone (dev-0)
        ("mechanism of action of action", "mechanism of action of action"),
    ],
)  # fmt: skip
def test_medqa_question_cleaning(raw: str, expected: str) -> None:
    assert prep.clean_question(raw, "test") == expected


def test_an_unknown_cyrillic_letter_stops_the_conversion() -> None:
    with pytest.raises(ValueError, match="Cyrillic letters without a Latin look-alike"):
        prep.fold_unicode("\u0416 is not a Latin letter", "medqa dev-1")


def test_medqa_record_strips_options_flags_missing_figures_and_keeps_the_answer() -> None:
    options = {**FIVE, "A": "Exposure to nitrosamines  ", "B": "\u0410\u03b2 amyloid"}
    question = "A photograph of the lesion is shown. Which is the cause?"
    record = prep.medqa_record(_medqa_item(question, options, "B"), "medqa-dev-9", "dev-9")
    assert record["answer_text"] == "A\u03b2 amyloid" == record["options"][record["answer"]]
    assert "Exposure to nitrosamines" in record["options"].values()  # dev-342: ends stripped
    assert len(record["options"]) == 4 and record["mentions_missing_figure"] is True
    plain = prep.medqa_record(_medqa_item("Which?", FIVE, "A"), "medqa-dev-1", "dev-1")
    assert plain["mentions_missing_figure"] is False


def test_medqa_refuses_an_answer_that_is_not_its_option() -> None:
    item = {**_medqa_item("Q?", FIVE, "A"), "answer": "Beta"}
    with pytest.raises(ValueError, match="dev-3: answer 'Beta' is not option A"):
        prep.medqa_record(item, "medqa-dev-3", "dev-3")


def test_dropping_one_wrong_option_keeps_the_answer_and_the_order() -> None:
    for seed in range(40):
        answer = "ABCDE"[seed % 5]
        options, letter = prep.drop_one_wrong_option(FIVE, answer, random.Random(seed))
        assert sorted(options) == ["A", "B", "C", "D"]
        assert options[letter] == FIVE[answer]
        kept = list(options.values())
        assert kept == [text for text in FIVE.values() if text in kept]  # order kept


def _drop_last_wrong(options: dict[str, str], answer: str) -> str:
    """The tempting shortcut: always drop the last wrong option."""
    dropped = [letter for letter in sorted(options) if letter != answer][-1]
    kept = [letter for letter in sorted(options) if letter != dropped]
    return "ABCD"[kept.index(answer)]


def test_random_drop_keeps_answer_letters_balanced_where_dropping_the_last_does_not() -> None:
    rng = random.Random(7)
    answers = ["ABCDE"[rng.randrange(5)] for _ in range(4000)]
    ours = Counter(
        prep.drop_one_wrong_option(FIVE, answer, prep.item_rng("medqa", str(i)))[1]
        for i, answer in enumerate(answers)
    )
    last = Counter(_drop_last_wrong(FIVE, answer) for answer in answers)
    for letter in "ABCD":
        assert 0.23 < ours[letter] / len(answers) < 0.27, ours
    assert last["D"] / len(answers) > 0.37  # D gets the E answers too


def test_official_four_options_are_four_of_the_five() -> None:
    five = _medqa_item("Q?", FIVE, "C")
    four = _medqa_item("Q?", {k: FIVE[k] for k in "ABCE"}, "C")
    prep.check_official_four_options({**four, "answer": five["answer"]}, five, "t")
    wrong = {**four, "options": {**four["options"], "A": "Omega"}}
    with pytest.raises(ValueError, match="not 4 of the 5"):
        prep.check_official_four_options(wrong, five, "t")


# --------------------------------------------------------------------------- committed files


@pytest.fixture(scope="module")
def real_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cache = tmp_path_factory.mktemp("cache")
    loaded = {}
    for name in prep.DATASETS:
        task = hydra.utils.instantiate(
            compose_train([f"task={name}"], cache).task, _convert_="partial"
        )
        loaded[name] = (task, {split: task.load_split(split) for split in prep.SPLITS})
    return loaded


SIZES = {
    "mts_dialog": {"train": 669, "val": 61, "test": 240},
    "pubmedqa": {"train": 345, "val": 100, "test": 445},
    "medqa": {"train": 1072, "val": 200, "test": 300},
}


@pytest.mark.parametrize("name", prep.DATASETS)
def test_committed_splits_validate_through_their_task_without_leakage(
    real_tasks: dict[str, Any], name: str
) -> None:
    task, splits = real_tasks[name]
    assert task.name == name
    assert {split: len(records) for split, records in splits.items()} == SIZES[name]
    assert check_leakage(task, splits) == []  # no shared id or input text across splits
    ids = [r["id"] for records in splits.values() for r in records]
    assert len(ids) == len(set(ids))
    for records in splits.values():
        for record in records:
            target = task.target_text(record)
            assert task.parse(target, record) == task.gold(record)  # targets round-trip


@pytest.mark.parametrize("split", prep.SPLITS)
def test_committed_medqa_answer_letters_are_balanced(
    real_tasks: dict[str, Any], split: str
) -> None:
    _, splits = real_tasks["medqa"]
    letters = Counter(record["answer"] for record in splits[split])
    shares = {letter: letters[letter] / len(splits[split]) for letter in "ABCD"}
    # The source's own spread (dev has fewer E answers): every letter near a quarter, and D
    # nowhere near the 40% that dropping the last wrong option gives.
    assert all(0.18 < share < 0.31 for share in shares.values()), shares


def test_licences_attributions_and_the_privacy_manifest() -> None:
    manifest = read_manifest()
    for name in prep.DATASETS:
        provenance = prep.PROVENANCE[name]
        assert (REAL / name / provenance.licence_file).stat().st_size > 500
        assert (REAL / name / "ATTRIBUTION.txt").read_text() == provenance.attribution + "\n"
        listed = {f"real/{name}/{split}.jsonl" for split in prep.SPLITS} <= set(manifest)
        # Listed (text may go to W&B) exactly when the set is judged non-sensitive.
        assert listed is not provenance.sensitive
    readme = (REAL / "README.md").read_text()
    for name in prep.DATASETS:
        assert prep.PROVENANCE[name].why in readme  # the reason is written down


@needs_raw
def test_check_passes_on_the_committed_files() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@needs_raw
def test_check_finds_an_edited_file(tmp_path: Path) -> None:
    out = tmp_path / "real"
    assert prep.main(["--out", str(out)]) == 0
    assert prep.main(["--check", "--out", str(out)]) == 0
    with (out / "medqa" / "val.jsonl").open("a", encoding="utf-8") as handle:
        handle.write("\n")
    shutil.copyfile(REAL / "medqa" / "LICENSE", out / "pubmedqa" / "LICENSE")
    assert prep.main(["--check", "--out", str(out)]) == 1


def test_a_missing_raw_directory_is_one_clear_error(tmp_path: Path, capsys) -> None:
    assert prep.main(["--raw", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "raw data not found" in capsys.readouterr().err
