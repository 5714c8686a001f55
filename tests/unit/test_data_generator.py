"""Tests for the synthetic data generator in data/generate.py and the committed data."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

# One worker runs this module under -n: its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("data_generator")

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
SCRIPT = DATA / "generate.py"


def _load_generator():
    spec = importlib.util.spec_from_file_location("clintune_data_generate", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = _load_generator()

REQUIRED_FIELDS = {
    "classification": {"id", "text", "label", "synthetic"},
    "triage": {"id", "text", "provider", "urgency", "synthetic"},
    "reasoning": {"id", "question", "options", "answer", "answer_text", "synonyms", "synthetic"},
    "summarization": {"id", "text", "summary", "synthetic"},
}


@pytest.fixture(scope="module")
def generated():
    """In-memory generation: {task: {split: [(record, meta), ...]}}."""
    return gen.generate_all()


@pytest.fixture(scope="module")
def committed():
    """The committed JSONL files: {task: {split: [record, ...]}}."""
    out = {}
    for task in gen.TASKS:
        out[task] = {}
        for split in gen.SPLITS:
            path = DATA / task / f"{split}.jsonl"
            with open(path, encoding="utf-8") as fh:
                out[task][split] = [json.loads(line) for line in fh]
    return out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        f"{task}/{split}.jsonl": (root / task / f"{split}.jsonl").read_bytes()
        for task in gen.TASKS
        for split in gen.SPLITS
    }


# --------------------------------------------------------------------------- determinism


def test_two_runs_are_byte_identical_and_match_committed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    gen.write_all(a)  # each call regenerates from scratch
    gen.write_all(b)
    bytes_a, bytes_b = _tree_bytes(a), _tree_bytes(b)
    assert bytes_a == bytes_b
    assert bytes_a == _tree_bytes(DATA), "committed data is stale: run python data/generate.py"
    for content in bytes_a.values():
        assert content.endswith(b"\n")
        assert b"\r" not in content


def test_cli_out_and_check(tmp_path):
    out = tmp_path / "d"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert _tree_bytes(out) == _tree_bytes(DATA)

    ok = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(out)], capture_output=True
    )
    assert ok.returncode == 0

    # Tamper with one line: --check must fail.
    victim = out / "triage" / "test.jsonl"
    lines = victim.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[3] = lines[3].replace('"synthetic": true', '"synthetic": false')
    victim.write_text("".join(lines), encoding="utf-8")
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(out)], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert "triage" in bad.stderr

    # A missing file must fail too.
    shutil.rmtree(out / "reasoning")
    missing = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(out)], capture_output=True
    )
    assert missing.returncode == 1


def test_default_check_passes_including_readme_stats():
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO
    )
    assert run.returncode == 0, run.stderr


def test_readme_stats_block_is_current(generated):
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    stats = gen.render_stats(generated)
    assert stats in readme
    assert "synthetic" in readme.lower()
    assert gen.CLASSIFICATION_RULE.split(" AND ")[0][:60] in readme.replace("\n> ", " ")


def test_total_size_is_small():
    total = sum(len(b) for b in _tree_bytes(DATA).values())
    assert total < 3_000_000


# --------------------------------------------------------------------------- schema


def test_split_sizes(committed):
    for task, sizes in gen.SPLIT_SIZES.items():
        for split, n in sizes.items():
            assert len(committed[task][split]) == n, (task, split)


def test_ids_unique_and_well_formed(committed):
    for task in gen.TASKS:
        ids = [r["id"] for split in gen.SPLITS for r in committed[task][split]]
        assert len(ids) == len(set(ids)), task
        for split in gen.SPLITS:
            for r in committed[task][split]:
                assert isinstance(r["id"], str)
                assert re.fullmatch(rf"{gen.ID_PREFIX[task]}-{split}-\d{{5}}", r["id"]), r["id"]


def _words(s: str) -> int:
    return len(s.split())


def test_schema_and_allowed_values(committed):
    for task in gen.TASKS:
        lo, hi = gen.WORD_LIMITS[task]
        for split in gen.SPLITS:
            for r in committed[task][split]:
                assert set(r) == REQUIRED_FIELDS[task], (task, r["id"])
                assert r["synthetic"] is True
                text = r["question"] if task == "reasoning" else r["text"]
                assert isinstance(text, str) and text.strip() == text
                assert lo <= _words(text) <= hi, (r["id"], _words(text))
                if task == "classification":
                    assert r["label"] in ("yes", "no")
                elif task == "triage":
                    assert r["provider"] in ("physician", "nurse", "pharmacist", "admin")
                    assert r["urgency"] in ("routine", "soon", "urgent", "emergent")
                elif task == "reasoning":
                    assert list(r["options"]) == ["A", "B", "C", "D"]
                    assert all(isinstance(v, str) and v for v in r["options"].values())
                    assert len(set(r["options"].values())) == 4
                    assert r["answer"] in ("A", "B", "C", "D")
                    assert r["answer_text"] == r["options"][r["answer"]]
                    assert isinstance(r["synonyms"], list)
                    assert all(isinstance(s, str) for s in r["synonyms"])
                    assert r["synonyms"] == gen.KNOWLEDGE_BASE[r["answer_text"]]["synonyms"]
                    assert r["question"].endswith("?")
                elif task == "summarization":
                    assert isinstance(r["summary"], str)
                    assert 8 <= _words(r["summary"]) <= 20, r["id"]
                    assert re.match(
                        r"^\d+-year-old (man|woman) with .+, diagnosed with .+; .+\.$", r["summary"]
                    ), r["summary"]


# --------------------------------------------------------------------------- splits


def test_no_text_overlap_between_splits(committed):
    for task in gen.TASKS:
        field = gen.TEXT_FIELD[task]
        norm = {
            split: {gen.normalise(r[field]) for r in committed[task][split]} for split in gen.SPLITS
        }
        assert not norm["train"] & norm["test"], task
        assert not norm["train"] & norm["val"], task
        assert not norm["val"] & norm["test"], task
        # and no duplicates inside a split either
        for split in gen.SPLITS:
            assert len(norm[split]) == len(committed[task][split]), (task, split)


def test_normalise():
    assert gen.normalise("  Denies   DYSURIA.\n UA:\tneg ") == "denies dysuria. ua: neg"


# --------------------------------------------------------------------------- classification


def _findings(present=(), negated=(), nitrite=None, le=None, wbc=None):
    return {
        "symptoms_present": list(present),
        "symptoms_negated": list(negated),
        "nitrite": nitrite,
        "leukocyte_esterase": le,
        "urine_wbc_per_hpf": wbc,
    }


@pytest.mark.parametrize(
    ("findings", "expected"),
    [
        (_findings(present=["dysuria"], nitrite="positive"), "yes"),
        (_findings(present=["suprapubic pain"], le="positive", nitrite="negative"), "yes"),
        (_findings(present=["urinary urgency"], wbc=11), "yes"),
        (_findings(present=["urinary urgency"], wbc=10), "no"),  # threshold is strict: > 10
        (_findings(present=["dysuria"], nitrite="negative", le="negative", wbc=3), "no"),
        (_findings(present=["urinary frequency"]), "no"),  # labs absent/pending
        (_findings(negated=["dysuria"], nitrite="positive", le="positive", wbc=40), "no"),
        (_findings(negated=list(gen.UTI_SYMPTOMS)), "no"),
    ],
)
def test_classification_rule_unit(findings, expected):
    assert gen.classification_rule(findings) == expected


def test_classification_labels_follow_rule_on_val_test(generated, committed):
    for split in ("val", "test"):
        for (record, meta), on_disk in zip(
            generated["classification"][split], committed["classification"][split], strict=True
        ):
            assert record == on_disk
            assert not meta["noised"]
            assert gen.classification_rule(meta["findings"]) == record["label"], record["id"]


# Polarity cues of a symptom sentence, owned by the test (not read from the generator's
# templates), so a generator that writes "Denies dysuria." for a present finding is caught.
DENIED_CUE = re.compile(r"^(?:(?:specifically )?denies|no|negative for)\b", re.IGNORECASE)
PRESENT_CUE = re.compile(
    r"^(?:reports|endorses|complains of|positive for|notes|has had)\b", re.IGNORECASE
)


def _documented_symptoms(text: str) -> dict[str, set[str]]:
    """{"present": symptoms, "denied": symptoms} as the note's sentences state them."""
    documented: dict[str, set[str]] = {"present": set(), "denied": set()}
    # Sentences end in ". " ("T 37.2 C" and "1.020" have no space after their dot).
    for sentence in re.split(r"(?<=\.)\s+", text):
        mentioned = {
            symptom
            for symptom, phrases in gen._SYMPTOM_PHRASES.items()
            if any(re.search(rf"\b{re.escape(p)}\b", sentence) for p in phrases)
        }
        if not mentioned:
            continue
        denied, present = DENIED_CUE.match(sentence), PRESENT_CUE.match(sentence)
        assert bool(denied) != bool(present), f"no clear polarity: {sentence!r} in {text!r}"
        documented["denied" if denied else "present"] |= mentioned
    return documented


def test_symptom_templates_have_the_polarity_of_their_list():
    for template in gen._PRESENT_TEMPLATES:
        assert PRESENT_CUE.match(template) and not DENIED_CUE.match(template), template
    for template in gen._NEGATED_TEMPLATES:
        assert DENIED_CUE.match(template) and not PRESENT_CUE.match(template), template


def test_classification_findings_are_consistent_with_text(generated):
    # The surface text must actually document the findings the label was derived from, each
    # symptom with its polarity: a present one only in a positive phrasing ("Reports
    # dysuria."), a negated one only in a denial ("Denies dysuria."), and no other symptom.
    for split in gen.SPLITS:
        for record, meta in generated["classification"][split]:
            f, text = meta["findings"], record["text"]
            assert not set(f["symptoms_present"]) & set(f["symptoms_negated"])
            documented = _documented_symptoms(text)
            assert documented["present"] == set(f["symptoms_present"]), (f, text)
            assert documented["denied"] == set(f["symptoms_negated"]), (f, text)
            wbc = f["urine_wbc_per_hpf"]
            if wbc is None:
                assert "WBC" not in text, text
            else:
                assert any(p.format(n=wbc) in text for p in gen._WBC_PHRASES), text
            for lab, marker in (("nitrite", "nitrite"), ("leukocyte_esterase", "LE")):
                status = f[lab]
                if status is None:
                    assert marker not in text.replace("leukocyte esterase", "LE"), text
                else:
                    assert any(p in text for p in gen._LAB_PHRASES[(lab, status)]), text


def test_classification_train_noise_rate(generated, committed):
    train = generated["classification"]["train"]
    mismatches = [r for r, m in train if gen.classification_rule(m["findings"]) != r["label"]]
    noised = [r for r, m in train if m["noised"]]
    assert mismatches == noised
    rate = len(noised) / len(train)
    assert 0.015 <= rate <= 0.05, rate
    # noise is invisible in the data
    assert [r for r, _ in train] == committed["classification"]["train"]


def test_classification_balance_and_keyword_hardness(generated):
    for split in gen.SPLITS:
        labels = Counter(r["label"] for r, _ in generated["classification"][split])
        share = labels["yes"] / sum(labels.values())
        assert 0.40 <= share <= 0.60, (split, share)

    test = generated["classification"]["test"]
    no_with_dysuria = [r for r, _ in test if r["label"] == "no" and "dysuria" in r["text"].lower()]
    assert len(no_with_dysuria) >= 15  # the keyword appears (mostly negated) in "no" notes
    wbcs = [m["findings"]["urine_wbc_per_hpf"] for _, m in test]
    assert any(v in (9, 10) for v in wbcs) and any(v in (11, 12) for v in wbcs)
    # a single keyword heuristic must not be near-perfect
    keyword_acc = sum(
        ("dysuria" in r["text"].lower()) == (r["label"] == "yes") for r, _ in test
    ) / len(test)
    assert keyword_acc < 0.75, keyword_acc


# --------------------------------------------------------------------------- triage

EMERGENT_CUES = re.compile(
    r"chest pain|chest feels tight|trouble breathing|can't catch my breath|short of breath"
    r"|fainted|passed out|suicidal|ending my life",
    re.IGNORECASE,
)


def test_triage_label_coverage_and_noise(generated):
    for split in ("val", "test"):
        for record, meta in generated["triage"][split]:
            assert not meta["noised"]
            assert (record["provider"], record["urgency"]) == (meta["provider"], meta["urgency"])
    test = [r for r, _ in generated["triage"]["test"]]
    for field, values in (("provider", gen.TRIAGE_PROVIDERS), ("urgency", gen.TRIAGE_URGENCIES)):
        counts = Counter(r[field] for r in test)
        for v in values:
            assert counts[v] / len(test) >= 0.08, (field, v, counts)
    train = generated["triage"]["train"]
    noised = [r for r, m in train if (r["provider"], r["urgency"]) != (m["provider"], m["urgency"])]
    assert noised == [r for r, m in train if m["noised"]]
    assert 0.015 <= len(noised) / len(train) <= 0.05


def test_triage_rules_hold_on_clean_splits(committed):
    for split in ("val", "test"):
        for r in committed["triage"][split]:
            if r["urgency"] == "emergent":
                assert r["provider"] == "physician", r
                assert EMERGENT_CUES.search(r["text"]), r["text"]
            else:
                assert not re.search(r"suicidal|fainted|passed out|ending my life", r["text"])
            if r["provider"] == "admin":
                assert r["urgency"] in ("routine", "soon")
            if r["urgency"] == "urgent":
                # The urgent cue may come from either concern: a high fever, worsening pain,
                # or a critical medication running out.
                temps = [float(t) for t in re.findall(r"(\d\d\.\d)C", r["text"])]
                assert (
                    any(t > 39 for t in temps)
                    or "worse" in r["text"]
                    or any(med in r["text"] for med in gen._CRITICAL_MEDS)
                ), r["text"]


def test_triage_two_concerns_follow_the_priority_rule(generated):
    for split in gen.SPLITS:
        items = generated["triage"][split]
        two = [(r, m) for r, m in items if len(m["concerns"]) == 2]
        assert 0.28 <= len(two) / len(items) <= 0.42, (split, len(two))
        decided_by_second = 0
        for record, meta in two:
            first, second = meta["concerns"]
            assert first != second
            assert [first[0], second[0]].count("physician") <= 1
            provider = min((first[0], second[0]), key=gen.TRIAGE_PROVIDERS.index)
            urgency = max((first[1], second[1]), key=gen.TRIAGE_URGENCIES.index)
            assert (meta["provider"], meta["urgency"]) == (provider, urgency)
            if not meta["noised"]:
                assert (record["provider"], record["urgency"]) == (provider, urgency)
            decided_by_second += second[0] == provider != first[0]
        # The deciding concern is not always the first one mentioned.
        assert 0.2 <= decided_by_second / len(two) <= 0.8, (split, decided_by_second, len(two))
        single = [m for _, m in items if len(m["concerns"]) == 1]
        assert all((m["provider"], m["urgency"]) == m["concerns"][0] for m in single)


# --------------------------------------------------------------------------- reasoning


def test_reasoning_answers_balanced_and_vignettes_use_kb(generated):
    for split in gen.SPLITS:
        items = generated["reasoning"][split]
        counts = Counter(r["answer"] for r, _ in items)
        assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)
        for record, meta in items:
            assert meta["diagnosis"] == record["answer_text"]
            assert all(f.lower() in record["question"].lower() for f in meta["findings"])
            assert record["answer_text"] in gen.KNOWLEDGE_BASE
            assert all(o in gen.KNOWLEDGE_BASE for o in record["options"].values())
    diagnoses = Counter(r["answer_text"] for r, _ in generated["reasoning"]["test"])
    assert len(diagnoses) >= 20


def test_reasoning_answer_is_the_best_supported_diagnosis_despite_red_herrings(generated):
    for split in gen.SPLITS:
        for record, meta in generated["reasoning"][split]:
            question = record["question"].lower()
            herrings = meta["red_herring_findings"]
            assert meta["red_herring"] in record["options"].values()
            assert meta["red_herring"] != record["answer_text"]
            assert len(herrings) == len(meta["findings"]) - 1
            assert all(f.lower() in question for f in herrings)
            support = gen._support(record["question"])
            (first, top), *rest = support.most_common()
            assert first == record["answer_text"], (record["question"], support)
            assert not rest or rest[0][1] < top, (record["question"], support)


# --------------------------------------------------------------------------- summarization


def test_summaries_match_note(generated):
    for split in gen.SPLITS:
        for record, meta in generated["summarization"][split]:
            assert meta["diagnosis"] in record["text"]
            assert meta["diagnosis"] in record["summary"]
            assert meta["chief_complaint"] in record["summary"]
            age = record["summary"].split("-year-old")[0]
            assert age in record["text"]
