#!/usr/bin/env python3
"""Convert three public medical NLP data sets into clintune's task schemas.

The raw files (MTS-Dialog, PubMedQA, MedQA; provenance, licences and every known quirk in
``<raw>/README.md``) are read unchanged, cleaned by the small functions below, and written
as JSON Lines under ``data/real/<name>/{train,val,test}.jsonl``, with each data set's licence
copied beside them and an attribution line in ``ATTRIBUTION.txt``.

Usage (from the repository root)::

    python data/real/prepare.py                  # read ../shared/realdata, write data/real/
    python data/real/prepare.py --raw DIR        # the raw files are somewhere else
    python data/real/prepare.py --check          # rebuild in a temp dir; exit 1 if anything
                                                 # committed differs (files, licences, manifest,
                                                 # the stats block of data/real/README.md)

Only the Python standard library is used, and every random choice has a fixed seed, so the
output is byte-identical across runs and platforms.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REAL_DIR = Path(__file__).resolve().parent
REPO = REAL_DIR.parents[1]
# The raw files live beside the repository (they are not shipped); --raw overrides this.
DEFAULT_RAW = REPO.parent / "shared" / "realdata"
README_PATH = REAL_DIR / "README.md"

DATASETS = ("mts_dialog", "pubmedqa", "medqa")
SPLITS = ("train", "val", "test")
SEED = 20261202

Record = dict[str, Any]

# --------------------------------------------------------------------------- licences, privacy


@dataclass(frozen=True)
class Provenance:
    licence_file: str  # in the raw directory; copied under the same name
    attribution: str  # one line, written to ATTRIBUTION.txt
    # Whether the text counts as sensitive (clintune.privacy): False lists the files in
    # data/real/shipped.sha256, so their text may go to W&B like the synthetic demo data.
    sensitive: bool
    why: str


PROVENANCE: dict[str, Provenance] = {
    "mts_dialog": Provenance(
        licence_file="LICENSE.txt",
        attribution=(
            "MTS-Dialog by Asma Ben Abacha, Wen-wai Yim, Yadan Fan and Thomas Lin "
            "(EACL 2023), github.com/abachaa/MTS-Dialog at commit "
            "3ff0801933608d6f570468c13125125fb5cabdea, CC BY 4.0; converted (cleaned, "
            "filtered, deduplicated) by data/real/prepare.py."
        ),
        sensitive=False,
        why=(
            "CC BY 4.0 allows anyone to copy and redistribute it, and it is already public; "
            "the conversations are de-identified role-play written for the data set, not "
            "recordings or records of a real patient"
        ),
    ),
    "pubmedqa": Provenance(
        licence_file="LICENSE",
        attribution=(
            "PubMedQA (PQA-L) by Qiao Jin, Bhuwan Dhingra, Zhengping Liu, William Cohen and "
            "Xinghua Lu (EMNLP 2019), github.com/pubmedqa/pubmedqa at commit "
            "1cbae8e92f72f20c8d3747cbb3bf5bc53554d997, MIT; converted by data/real/prepare.py."
        ),
        sensitive=False,
        why="MIT-licensed, and the text is published research abstracts: no patient record",
    ),
    "medqa": Provenance(
        licence_file="LICENSE",
        attribution=(
            "MedQA (US) by Di Jin, Eileen Pan, Nassim Oufattole, Wei-Hung Weng, Hanyi Fang and "
            "Peter Szolovits (arXiv:2009.13081), github.com/jind11/MedQA, MIT; dev split as "
            "re-hosted at github.com/MJWade96/RAG-Version-2 (2bc69b5), test split from "
            "github.com/xk-huang/medagents-benchmark (56ca11e); converted by "
            "data/real/prepare.py."
        ),
        sensitive=False,
        why="MIT-licensed exam questions with invented vignettes: no patient record",
    ),
}

MANIFEST_NAME = "shipped.sha256"
ATTRIBUTION_NAME = "ATTRIBUTION.txt"

# --------------------------------------------------------------------------- text cleaning

# Unicode spaces (thin, hair, no-break, narrow no-break, en/em/four-per-em, …) → a space.
_ODD_SPACES = (
    "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u202f\u205f\u3000"
)
# Invisible characters that carry nothing: zero-width space/joiners, BOM, soft hyphen.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
# Cyrillic letters that look like Latin ones, found inside English words ("А 43-уеаr-old",
# "Аβ amyloid"). An English source has no Cyrillic words, so each is the Latin letter.
CYRILLIC_LOOKALIKES = {
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C",
    "Т": "T", "Х": "X", "У": "Y", "І": "I", "Ј": "J", "Ѕ": "S",
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "к": "k", "і": "i",
    "ј": "j", "ѕ": "s", "һ": "h", "ԁ": "d", "ԛ": "q", "ԝ": "w",
}  # fmt: skip
_FOLD = str.maketrans(
    {
        **dict.fromkeys(_ODD_SPACES, " "),
        **dict.fromkeys(_INVISIBLE, ""),
        **CYRILLIC_LOOKALIKES,
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201a": ",",  # a low single quote used as a comma (MTS-Dialog train-1066)
        "\u2026": "...",
        "\u00b5": "\u03bc",  # micro sign → Greek mu: one letter for "µg" and "μg"
        "\u2103": "\u00b0C",
        "\u2109": "\u00b0F",
    }
)
# Arabic vowel marks: one (kasra, U+0650) sits before MedQA dev-25's first letter.
_ARABIC_MARKS = re.compile("[\u0610-\u061a\u064b-\u065f\u0670]")
_CYRILLIC = re.compile("[\u0400-\u04ff\u0500-\u052f]")
# A middle dot between digits is a decimal point in some abstracts ("0·718").
_MIDDLE_DOT_DECIMAL = re.compile(r"(?<=\d)\u00b7(?=\d)")
_HORIZONTAL_SPACE = re.compile(r"[ \t\f\v]+")


def fold_unicode(text: str, where: str = "") -> str:
    """Odd spaces to spaces, invisible characters dropped, typographic quotes and the ellipsis
    to ASCII, look-alike Cyrillic letters to Latin, µ to μ, ℃/℉ to °C/°F, a middle-dot decimal
    point to a full stop. A Cyrillic letter with no Latin look-alike is an error: it would be a
    quirk nobody has looked at."""
    folded = _MIDDLE_DOT_DECIMAL.sub(".", _ARABIC_MARKS.sub("", text.translate(_FOLD)))
    unknown = sorted(set(_CYRILLIC.findall(folded)))
    if unknown:
        raise ValueError(f"{where}: Cyrillic letters without a Latin look-alike: {unknown}")
    return folded


def newlines_to_lf(text: str) -> str:
    """CRLF (MTS-Dialog's training file, inside cells too) and bare CR to LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def clean_lines(text: str) -> str:
    """Each line's runs of spaces collapsed and its ends stripped, blank lines dropped."""
    lines = (_HORIZONTAL_SPACE.sub(" ", line).strip() for line in newlines_to_lf(text).split("\n"))
    return "\n".join(line for line in lines if line)


def one_line(text: str) -> str:
    """All whitespace, newlines included, collapsed to single spaces."""
    return " ".join(text.split())


def normalised_key(text: str) -> str:
    """The form two texts are compared in for duplicates (clintune's leakage check uses the
    same: lower case, whitespace collapsed)."""
    return " ".join(text.lower().split())


def word_count(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------- MTS-Dialog

MTS_FILES = {
    "train": "MTS-Dialog-TrainingSet.csv",
    "val": "MTS-Dialog-ValidationSet.csv",
    "test1": "MTS-Dialog-TestSet-1-MEDIQA-Chat-2023.csv",
    "test2": "MTS-Dialog-TestSet-2-MEDIQA-Sum-2023.csv",
}
MTS_SPLIT_OF = {"train": "train", "val": "val", "test1": "test", "test2": "test"}
MTS_SUMMARY_WORDS = (5, 60)  # one- or two-sentence section texts
# Readable names of the section codes: the prompt says which section to write.
MTS_SECTIONS = {
    "GENHX": "history of present illness",
    "CC": "chief complaint",
    "FAM/SOCHX": "family and social history",
    "PASTMEDICALHX": "past medical history",
    "ROS": "review of systems",
    "PASTSURGICAL": "past surgical history",
    "ALLERGY": "allergies",
    "MEDICATIONS": "medications",
    "ASSESSMENT": "assessment",
    "EXAM": "physical examination",
    "DIAGNOSIS": "diagnosis",
    "DISPOSITION": "disposition",
    "PLAN": "plan",
    "EDCOURSE": "emergency department course",
    "IMMUNIZATIONS": "immunizations",
    "IMAGING": "imaging",
    "GYNHX": "gynaecological history",
    "OTHER_HISTORY": "other history",
    "PROCEDURES": "procedures",
    "LABS": "laboratory results",
}
# Speaker tags as written (lower case) → the one spelling used; typos and variants included.
SPEAKER_TAGS = {
    "doctor": "Doctor",
    "patient": "Patient",
    "doctor_2": "Doctor_2",
    "docotr_2": "Doctor_2",
    "guest_family": "Guest_family",
    "gest_family": "Guest_family",
    "guest_family_1": "Guest_family_1",
    "guest_family_2": "Guest_family_2",
    "guest_family2": "Guest_family_2",
    "guest_clinician": "Guest_clinician",
    "guest_clinican": "Guest_clinician",
}
# "Guest_family. Hello." (train-1156) has a full stop where the colon belongs: accepted for a
# known tag only, so an ordinary sentence is never taken for a speaker.
_SPEAKER = re.compile(r"^([A-Za-z]+(?:_?[A-Za-z0-9]+)*)\s*([:.])\s*(.*)$")


def canonical_turn(line: str) -> tuple[str, bool]:
    """A dialogue line with its speaker tag spelt one way; whether the line has a tag."""
    match = _SPEAKER.match(line)
    if match is None:
        return line, False
    tag = SPEAKER_TAGS.get(match.group(1).lower())
    if tag is None or (match.group(2) == "." and not match.group(3)):
        return line, False
    return f"{tag}: {match.group(3)}".rstrip(), True


def clean_dialogue(raw: str, where: str = "") -> tuple[str, Counter[str]]:
    """One dialogue cell as ``Tag: utterance`` lines, and what was removed.

    - line endings unified, Unicode folded, each line stripped (60% end in a space);
    - a cell wrapped in literal double quotes is unwrapped (test1-194);
    - blank lines split the cell into blocks; only the block with the most speaker turns is
      the dialogue, the others are strays ("Sp 3" after train-307, the fragment before
      train-1114);
    - a line with no letter or digit is dropped (the lone "." ending test1-102);
    - speaker tags get one spelling ("Gest_family" → "Guest_family", "Guest_family." →
      "Guest_family:").
    """
    removed: Counter[str] = Counter()
    text = fold_unicode(newlines_to_lf(raw), where).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"' and text.count('"') == 2:
        text = text[1:-1].strip()
        removed["wrapping_quotes"] += 1
    blocks = [block for block in re.split(r"\n[ \t]*\n", text) if block.strip()]

    def turns(block: str) -> int:
        return sum(canonical_turn(line.strip())[1] for line in block.split("\n"))

    if len(blocks) > 1:
        keep = max(range(len(blocks)), key=lambda i: (turns(blocks[i]), -i))
        removed["stray_blocks"] += len(blocks) - 1
        blocks = [blocks[keep]]
    lines = []
    for line in clean_lines(blocks[0] if blocks else "").split("\n"):
        if not re.search(r"\w", line):
            if line:
                removed["punctuation_only_lines"] += 1
            continue
        turn, tagged = canonical_turn(line)
        speaker = turn.split(":", 1)[0]
        if tagged and not line.startswith(f"{speaker}:"):
            removed["respelt_speaker_tags"] += 1
        lines.append(turn)
    return "\n".join(lines), removed


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV whose cells span lines: read with the csv module, never line by line."""
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def mts_record(file_key: str, row: dict[str, str], counts: Counter[str]) -> Record | None:
    where = f"mts_dialog {file_key}-{row['ID']}"
    header = row["section_header"].strip()
    if header not in MTS_SECTIONS:
        raise ValueError(f"{where}: unknown section header {header!r}")
    summary = one_line(fold_unicode(row["section_text"], where))
    low, high = MTS_SUMMARY_WORDS
    if not low <= word_count(summary) <= high:
        counts[f"{MTS_SPLIT_OF[file_key]}/dropped_summary_length"] += 1
        return None
    dialogue, removed = clean_dialogue(row["dialogue"], where)
    for name, number in removed.items():
        counts[f"{MTS_SPLIT_OF[file_key]}/{name}"] += number
    section = MTS_SECTIONS[header]
    return {
        # Each file numbers its rows from 0: the file's name keeps the ids apart.
        "id": f"mts-{file_key}-{row['ID'].strip()}",
        # The section to write goes last: a long prompt loses its start, never this line.
        "text": f"{dialogue}\n\nSection to write: {section}",
        "summary": summary,
        "section_header": header,
    }


def build_mts_dialog(raw: Path) -> tuple[dict[str, list[Record]], Counter[str]]:
    counts: Counter[str] = Counter()
    splits: dict[str, list[Record]] = {split: [] for split in SPLITS}
    dialogues: dict[str, str] = {}  # id → dialogue, for deduplication
    for file_key, name in MTS_FILES.items():
        for row in read_csv_rows(raw / name):
            record = mts_record(file_key, row, counts)
            if record is not None:
                splits[MTS_SPLIT_OF[file_key]].append(record)
                dialogues[record["id"]] = record["text"].rsplit("\n\nSection to write:", 1)[0]
    deduplicated = deduplicate(splits, lambda r: dialogues[r["id"]], counts)
    train_summaries = {normalised_key(r["summary"]) for r in deduplicated["train"]}
    counts["test/summary_equals_a_train_summary"] = sum(
        normalised_key(r["summary"]) in train_summaries for r in deduplicated["test"]
    )
    return deduplicated, counts


def deduplicate(
    splits: dict[str, list[Record]], key_of: Any, counts: Counter[str]
) -> dict[str, list[Record]]:
    """Each input once: test keeps its copy first, then val, then train (a held-out example
    is never given up for a training one); later copies are dropped and counted."""
    seen: dict[str, str] = {}
    kept: dict[str, list[Record]] = {}
    for split in ("test", "val", "train"):
        kept[split] = []
        for record in splits[split]:
            key = normalised_key(key_of(record))
            if key in seen:
                where = "within" if seen[key] == split else "across"
                counts[f"{split}/dropped_duplicate_{where}_splits"] += 1
                continue
            seen[key] = split
            kept[split].append(record)
    return {split: kept[split] for split in SPLITS}


# --------------------------------------------------------------------------- PubMedQA

PUBMEDQA_VAL = 100


def pubmedqa_text(item: dict[str, Any], where: str) -> str:
    """The abstract's labelled sections, then the question (last, so that a long abstract
    loses its start rather than the question). LONG_ANSWER is left out: it is the abstract's
    conclusion and gives the answer away."""
    contexts, labels = item["CONTEXTS"], item["LABELS"]
    if len(contexts) != len(labels):
        raise ValueError(f"{where}: {len(contexts)} contexts but {len(labels)} labels")
    # Section labels are free text (140 distinct names): shown as written, never mapped.
    sections = [
        f"{one_line(fold_unicode(label, where))}: {one_line(fold_unicode(context, where))}"
        for label, context in zip(labels, contexts, strict=True)
    ]
    question = one_line(fold_unicode(item["QUESTION"], where))
    return "\n".join(sections) + f"\n\nQuestion: {question}"


def build_pubmedqa(raw: Path) -> tuple[dict[str, list[Record]], Counter[str]]:
    items = json.loads((raw / "ori_pqal.json").read_text(encoding="utf-8"))
    official_test = json.loads((raw / "test_ground_truth.json").read_text(encoding="utf-8"))
    counts: Counter[str] = Counter()
    records: dict[str, Record] = {}
    for pmid in sorted(items):
        item = items[pmid]
        decision = item["final_decision"]
        split = "test" if pmid in official_test else "train+val"
        if pmid in official_test and official_test[pmid] != decision:
            raise ValueError(f"pubmedqa {pmid}: test label {official_test[pmid]!r} != {decision!r}")
        if decision == "maybe":
            counts[f"{split}/dropped_maybe"] += 1
            continue
        if decision not in ("yes", "no"):
            raise ValueError(f"pubmedqa {pmid}: final_decision {decision!r}")
        where = f"pubmedqa {pmid}"
        records[pmid] = {
            "id": f"pqal-{pmid}",
            "text": pubmedqa_text(item, where),
            "label": decision,
        }
    missing = sorted(set(official_test) - set(items))
    if missing:
        raise ValueError(f"pubmedqa: test PMIDs not in ori_pqal.json: {missing[:5]}")
    rest = sorted(pmid for pmid in records if pmid not in official_test)
    random.Random(SEED).shuffle(rest)
    splits = {
        "test": [records[p] for p in sorted(records) if p in official_test],
        "val": [records[p] for p in sorted(rest[:PUBMEDQA_VAL])],
        "train": [records[p] for p in sorted(rest[PUBMEDQA_VAL:])],
    }
    return deduplicate(splits, lambda r: r["text"], counts), counts


# --------------------------------------------------------------------------- MedQA

MEDQA_VAL = 200
MEDQA_TEST = 300
LETTERS = ("A", "B", "C", "D")
# "A photograph … is shown", "The ECG is shown": the figure is not in the data set.
_MISSING_FIGURE = re.compile(
    r"\b(?:photograph|photomicrograph|micrograph|image|figure|picture|illustration)s?\b"
    r"|\b(?:is|are)\s+(?:shown|depicted|illustrated)\b",
    re.IGNORECASE,
)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON Lines file; the last line needs no newline (dev_5options.jsonl
    has none)."""
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def clean_question(text: str, where: str) -> str:
    """Unicode folded, lines (lab tables span several) stripped and kept, and a stray double
    quote at the end (an odd number of quotes in all, so nothing opened it) removed."""
    question = clean_lines(fold_unicode(text, where))
    if question.endswith('"') and question.count('"') % 2 == 1:
        question = question[:-1].rstrip()
    return question


def item_rng(name: str, item_id: str) -> random.Random:
    # One generator per item: an item's choice does not change when others are added.
    digest = hashlib.sha256(f"{SEED}:{name}:{item_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def drop_one_wrong_option(
    options: dict[str, str], answer: str, rng: random.Random
) -> tuple[dict[str, str], str]:
    """Four options from five: one wrong option, drawn at random, is removed and the rest are
    relettered A–D in their order. Always dropping the last wrong option would make D the
    answer twice as often as A; a random one keeps the letters as balanced as the source."""
    letters = sorted(options)
    wrong = [letter for letter in letters if letter != answer]
    dropped = rng.choice(wrong)
    kept = [letter for letter in letters if letter != dropped]
    relettered = {LETTERS[i]: options[old] for i, old in enumerate(kept)}
    return relettered, LETTERS[kept.index(answer)]


def medqa_record(item: dict[str, Any], item_id: str, where: str) -> Record:
    options = {key: one_line(fold_unicode(value, where)) for key, value in item["options"].items()}
    answer = item["answer_idx"]
    if item["options"].get(answer) != item["answer"]:
        raise ValueError(f"{where}: answer {item['answer']!r} is not option {answer}")
    if len(options) == 5:
        options, answer = drop_one_wrong_option(options, answer, item_rng("medqa", item_id))
    if sorted(options) != list(LETTERS):
        raise ValueError(f"{where}: options {sorted(options)}, expected A-D")
    question = clean_question(item["question"], where)
    return {
        "id": item_id,
        "question": question,
        "options": options,
        "answer": answer,
        "answer_text": options[answer],
        "step": item["meta_info"],
        "mentions_missing_figure": bool(_MISSING_FIGURE.search(question)),
    }


def check_official_four_options(four: dict[str, Any], five: dict[str, Any], where: str) -> None:
    """The official 4-option item is its 5-option form minus one wrong option."""
    if four["question"] != five["question"] or four["answer"] != five["answer"]:
        raise ValueError(f"{where}: 4- and 5-option files disagree on question or answer")
    if not set(four["options"].values()) < set(five["options"].values()):
        raise ValueError(f"{where}: the 4 options are not 4 of the 5")


def build_medqa(raw: Path) -> tuple[dict[str, list[Record]], Counter[str]]:
    counts: Counter[str] = Counter()
    dev = [
        medqa_record(item, f"medqa-dev-{i}", f"medqa dev-{i}")
        for i, item in enumerate(read_jsonl(raw / "dev_5options.jsonl"))
    ]
    order = list(range(len(dev)))
    random.Random(SEED).shuffle(order)
    test_four = read_jsonl(raw / "test_4options.jsonl")
    test_five = read_jsonl(raw / "test_5options.jsonl")
    if len(test_four) != len(test_five):
        raise ValueError("medqa: the 4- and 5-option test files differ in length")
    sample = sorted(random.Random(SEED).sample(range(len(test_four)), MEDQA_TEST))
    for i in sample:
        check_official_four_options(test_four[i], test_five[i], f"medqa test-{i}")
    splits = {
        "train": [dev[i] for i in sorted(order[MEDQA_VAL:])],
        "val": [dev[i] for i in sorted(order[:MEDQA_VAL])],
        "test": [medqa_record(test_four[i], f"medqa-test-{i}", f"medqa test-{i}") for i in sample],
    }
    for split, records in splits.items():
        counts[f"{split}/mentions_missing_figure"] = sum(
            r["mentions_missing_figure"] for r in records
        )
    return deduplicate(splits, lambda r: r["question"], counts), counts


BUILDERS = {"mts_dialog": build_mts_dialog, "pubmedqa": build_pubmedqa, "medqa": build_medqa}

# --------------------------------------------------------------------------- output


@dataclass
class Built:
    splits: dict[str, dict[str, list[Record]]] = field(default_factory=dict)
    counts: dict[str, Counter[str]] = field(default_factory=dict)


def build_all(raw: Path) -> Built:
    missing = [name for name in DATASETS if not (raw / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"raw data not found: {', '.join(str(raw / m) for m in missing)} "
            "(pass --raw DIR, the directory that holds mts_dialog/, pubmedqa/ and medqa/)"
        )
    built = Built()
    for name in DATASETS:
        built.splits[name], built.counts[name] = BUILDERS[name](raw / name)
    return built


def serialise(records: Iterable[Record]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def manifest_text(out_dir: Path) -> str:
    lines = [
        "# SHA-256 of the shipped real data whose text counts as non-sensitive",
        "# (python data/real/prepare.py writes this file; data/real/README.md says why).",
        "# Text from these files, unchanged and at these paths, may go to W&B.",
    ]
    for name in DATASETS:
        if PROVENANCE[name].sensitive:
            continue
        for split in SPLITS:
            relative = f"{name}/{split}.jsonl"
            digest = hashlib.sha256((out_dir / relative).read_bytes()).hexdigest()
            lines.append(f"{digest}  {relative}")
    return "\n".join(lines) + "\n"


def write_all(built: Built, raw: Path, out_dir: Path) -> list[Path]:
    written: list[Path] = []
    for name in DATASETS:
        target = out_dir / name
        target.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            path = target / f"{split}.jsonl"
            with path.open("w", encoding="utf-8", newline="\n") as handle:
                handle.write(serialise(built.splits[name][split]))
            written.append(path)
        provenance = PROVENANCE[name]
        shutil.copyfile(raw / name / provenance.licence_file, target / provenance.licence_file)
        (target / ATTRIBUTION_NAME).write_text(
            provenance.attribution + "\n", encoding="utf-8", newline="\n"
        )
        written += [target / provenance.licence_file, target / ATTRIBUTION_NAME]
    (out_dir / MANIFEST_NAME).write_text(manifest_text(out_dir), encoding="utf-8", newline="\n")
    written.append(out_dir / MANIFEST_NAME)
    return written


STATS_BEGIN = "<!-- BEGIN GENERATED STATS (python data/real/prepare.py) -->"
STATS_END = "<!-- END GENERATED STATS -->"
_STATS_RE = re.compile(re.escape(STATS_BEGIN) + r".*?" + re.escape(STATS_END), re.DOTALL)
_LABEL_FIELD = {"pubmedqa": "label", "medqa": "answer"}


def render_stats(built: Built, out_dir: Path) -> str:
    lines = [STATS_BEGIN, "", "| data set | train | val | test | size | sensitive |"]
    lines.append("|---|---|---|---|---|---|")
    for name in DATASETS:
        sizes = " | ".join(str(len(built.splits[name][split])) for split in SPLITS)
        size = sum((out_dir / name / f"{split}.jsonl").stat().st_size for split in SPLITS)
        sensitive = "yes" if PROVENANCE[name].sensitive else "no"
        lines.append(f"| {name} | {sizes} | {size / 1e6:.2f} MB | {sensitive} |")
    lines.append("")
    lines.append("Sensitivity (clintune.privacy), decided per data set in `PROVENANCE`:")
    lines.append("")
    for name in DATASETS:
        provenance = PROVENANCE[name]
        verdict = "sensitive" if provenance.sensitive else "not sensitive"
        lines.append(f"- {name}: {verdict}: {provenance.why}.")
    lines.append("")
    for name, field_name in _LABEL_FIELD.items():
        lines.append(f"**{name} / `{field_name}`** (count, % of split)")
        lines.append("")
        lines.append("| value | train | val | test |")
        lines.append("|---|---|---|---|")
        values = sorted({r[field_name] for s in SPLITS for r in built.splits[name][s]})
        for value in values:
            cells = []
            for split in SPLITS:
                records = built.splits[name][split]
                number = sum(r[field_name] == value for r in records)
                cells.append(f"{number} ({100 * number / len(records):.1f}%)")
            lines.append(f"| {value} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("What the conversion removed, changed or counted (per split):")
    lines.append("")
    for name in DATASETS:
        counts = built.counts[name]
        shown = ", ".join(f"{key} {counts[key]}" for key in sorted(counts) if counts[key])
        lines.append(f"- {name}: {shown or 'nothing'}")
    lines += ["", STATS_END]
    return "\n".join(lines)


def readme_with_stats(readme: str, stats: str) -> str:
    if not _STATS_RE.search(readme):
        raise ValueError("README is missing the generated-stats markers")
    return _STATS_RE.sub(lambda _match: stats, readme, count=1)


def check(raw: Path, target: Path, readme: Path | None) -> list[str]:
    """Problems with the committed files (empty when they match a fresh conversion)."""
    problems: list[str] = []
    built = build_all(raw)
    with tempfile.TemporaryDirectory() as tmp:
        fresh_dir = Path(tmp)
        for path in write_all(built, raw, fresh_dir):
            relative = path.relative_to(fresh_dir)
            committed = target / relative
            if not committed.is_file():
                problems.append(f"missing: {committed}")
            elif committed.read_bytes() != path.read_bytes():
                problems.append(f"differs: {committed}")
        if readme is not None:
            if not readme.is_file():
                problems.append(f"missing: {readme}")
            else:
                text = readme.read_text(encoding="utf-8")
                try:
                    if readme_with_stats(text, render_stats(built, fresh_dir)) != text:
                        problems.append(f"stale stats block: {readme}")
                except ValueError as error:
                    problems.append(f"{readme}: {error}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW, help=f"default {DEFAULT_RAW}")
    parser.add_argument("--out", type=Path, default=None, help="default: data/real/")
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed files differ")
    args = parser.parse_args(argv)
    target = args.out if args.out is not None else REAL_DIR
    readme = README_PATH if args.out is None else None
    try:
        if args.check:
            problems = check(args.raw, target, readme)
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                print(
                    "real data is out of date: run `python data/real/prepare.py`", file=sys.stderr
                )
                return 1
            print(f"OK: {target} matches data/real/prepare.py output from {args.raw}")
            return 0
        built = build_all(args.raw)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = write_all(built, args.raw, target)
    if readme is not None and readme.is_file():
        text = readme.read_text(encoding="utf-8")
        updated = readme_with_stats(text, render_stats(built, target))
        if updated != text:
            readme.write_text(updated, encoding="utf-8", newline="\n")
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files ({total / 1e6:.2f} MB) under {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
