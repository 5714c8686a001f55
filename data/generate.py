#!/usr/bin/env python3
"""Deterministic generator for the SYNTHETIC clintune demo data sets.

Everything this script writes is invented from templates and a small hand-written
knowledge base. It contains no real patient data.

Usage (from the repository root)::

    python data/generate.py            # (re)write data/<task>/{train,val,test}.jsonl
    python data/generate.py --check    # regenerate into a temp dir; exit 1 if files differ
    python data/generate.py --out DIR  # write into DIR instead of data/

Only the Python standard library is used. Each (task, split) has its own fixed seed
for ``random.Random``, so the output is byte-identical across runs and platforms.

Splits are generated in the order test -> val -> train and every example text is
checked against all texts already produced for the task (after lower-casing and
collapsing whitespace); duplicates are skipped deterministically. Hence no example
text appears in more than one split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent
README_PATH = DATA_DIR / "README.md"

TASKS = ("classification", "reasoning", "summarization", "triage")
SPLITS = ("train", "val", "test")
# Generation order: test first, so that the held-out split is never starved by train.
GENERATION_ORDER = ("test", "val", "train")

SPLIT_SIZES: dict[str, dict[str, int]] = {
    "classification": {"train": 1600, "val": 150, "test": 250},
    "triage": {"train": 1600, "val": 150, "test": 250},
    "reasoning": {"train": 1600, "val": 150, "test": 250},
    "summarization": {"train": 1200, "val": 100, "test": 150},
}

BASE_SEEDS = {"classification": 11000, "triage": 22000, "reasoning": 33000, "summarization": 44000}
SPLIT_SEED_OFFSET = {"test": 1, "val": 2, "train": 3}

ID_PREFIX = {"classification": "cls", "triage": "tri", "reasoning": "rsn", "summarization": "sum"}

# Label noise (flipped/replaced labels) is applied to the train split only.
LABEL_NOISE = {"classification": 0.03, "triage": 0.03, "reasoning": 0.0, "summarization": 0.0}

# Word-count limits on the main text of each task (inclusive).
WORD_LIMITS = {
    "classification": (25, 60),
    "triage": (15, 75),
    "reasoning": (30, 70),
    "summarization": (40, 80),
}
SUMMARY_WORD_LIMITS = (8, 20)

# The text field that must not be shared between splits.
TEXT_FIELD = {
    "classification": "text",
    "triage": "text",
    "reasoning": "question",
    "summarization": "text",
}

MAX_ATTEMPTS_PER_RECORD = 50
# Labels/findings are sampled first; only the surface text is re-drawn (up to this many
# times) when it is too long/short or a duplicate, so length limits and de-duplication
# do not skew the label distribution.
SURFACE_RETRIES = 50

Record = dict[str, Any]
Meta = dict[str, Any]
Accept = Callable[[Record], bool]


def normalise(text: str) -> str:
    """Lower-case and collapse whitespace (the normalisation used for overlap checks)."""
    return " ".join(text.lower().split())


def word_count(text: str) -> int:
    return len(text.split())


def join_list(items: list[str], conj: str = "and") -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# ---------------------------------------------------------------------------
# 1. Classification: does the note meet criteria for a urinary tract infection?
# ---------------------------------------------------------------------------

CLASSIFICATION_RULE = (
    "UTI criteria met (label 'yes') if and only if the note documents at least one "
    "urinary symptom as PRESENT among {dysuria, urinary frequency, urinary urgency, "
    "suprapubic pain} AND at least one POSITIVE urine lab among {positive nitrite, "
    "positive leukocyte esterase, urine WBC > 10/hpf}. Negated symptoms, negative labs, "
    "urine WBC <= 10/hpf, pending/absent labs and all other findings (fever, flank pain, "
    "hematuria, history of UTI, cough, vitals, ...) do not count. Otherwise label 'no'."
)

UTI_SYMPTOMS = ("dysuria", "urinary frequency", "urinary urgency", "suprapubic pain")
URINE_WBC_THRESHOLD = 10  # strictly greater than this is positive

_SYMPTOM_PHRASES = {
    "dysuria": ["dysuria", "dysuria", "burning with urination", "painful urination"],
    "urinary frequency": ["urinary frequency", "frequent urination", "increased frequency"],
    "urinary urgency": ["urinary urgency", "urgency", "sudden urges to urinate"],
    "suprapubic pain": ["suprapubic pain", "suprapubic discomfort", "pain above the pubic bone"],
}
_PRESENT_TEMPLATES = [
    "Reports {x}.",
    "Endorses {x}.",
    "Complains of {x} for {d} days.",
    "Positive for {x}.",
    "Notes {x} since {dow}.",
    "Has had {x} for {d} days.",
]
_NEGATED_TEMPLATES = [
    "Denies {x}.",
    "No {x}.",
    "Negative for {x}.",
    "Denies any {x}.",
    "Specifically denies {x}.",
]
_LAB_PHRASES = {
    ("nitrite", "positive"): ["nitrite positive", "positive nitrite", "nitrites +"],
    ("nitrite", "negative"): ["nitrite negative", "negative nitrite", "nitrites neg"],
    ("leukocyte_esterase", "positive"): [
        "leukocyte esterase positive",
        "positive leukocyte esterase",
        "LE +",
    ],
    ("leukocyte_esterase", "negative"): [
        "leukocyte esterase negative",
        "negative leukocyte esterase",
        "LE neg",
    ],
}
_WBC_PHRASES = ["urine WBC {n}/hpf", "{n} WBC/hpf", "WBC {n} per hpf", "urine WBC of {n}/hpf"]
_UA_INTROS = [
    "UA:",
    "Urinalysis:",
    "Urinalysis shows",
    "Dipstick and microscopy:",
    "Urine studies:",
]
_UA_EXTRAS = [
    "specific gravity 1.020",
    "trace protein",
    "small blood",
    "glucose negative",
    "pH 6.0",
]
_NO_UA = ["Urinalysis pending.", "No urinalysis obtained today.", "UA not yet resulted."]
_CLS_REASONS = [
    "follow-up",
    "a routine visit",
    "cough",
    "fatigue",
    "a pre-operative check",
    "urinary concerns",
    "lower back discomfort",
    "headache",
    "medication review",
    "abdominal discomfort",
]
_CLS_OPENERS = [
    "{age}-year-old {sex} seen for {reason}.",
    "Pt is a {age} yo {sexabbr} presenting for {reason}.",
    "{age} y/o {sex} here for {reason}.",
    "{cap_sex}, age {age}, seen today for {reason}.",
]
_CLS_DISTRACTORS = [
    "Mild dry cough for a week.",
    "Intermittent headache, relieved by acetaminophen.",
    "VITALS",
    "History of hypertension.",
    "History of type 2 diabetes.",
    "History of UTI last year.",
    "History of kidney stones.",
    "Takes lisinopril daily.",
    "No known drug allergies.",
    "Allergic to penicillin.",
    "Reports mild fatigue.",
    "No flank pain.",
    "Mild left flank discomfort.",
    "No nausea or vomiting.",
    "Nonsmoker.",
    "Lungs clear.",
    "Abdomen soft.",
    "Reports occasional heartburn.",
    "Subjective fevers at home.",
    "Drinks plenty of water.",
]
_DAYS_OF_WEEK = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def classification_rule(findings: Meta) -> str:
    """Apply CLASSIFICATION_RULE to ground-truth findings; returns 'yes' or 'no'."""
    symptom = any(s in UTI_SYMPTOMS for s in findings["symptoms_present"])
    wbc = findings["urine_wbc_per_hpf"]
    lab = (
        findings["nitrite"] == "positive"
        or findings["leukocyte_esterase"] == "positive"
        or (wbc is not None and wbc > URINE_WBC_THRESHOLD)
    )
    return "yes" if symptom and lab else "no"


def _sex(rng: random.Random, p_female: float = 0.5) -> str:
    return "F" if rng.random() < p_female else "M"


def _sample_wbc(rng: random.Random, positive: bool) -> int:
    near = rng.random() < 0.6
    if positive:
        return rng.randint(11, 15) if near else rng.randint(16, 50)
    return rng.randint(6, 10) if near else rng.randint(0, 5)


def _vitals(rng: random.Random) -> str:
    t = rng.choice([36.4, 36.6, 36.8, 37.0, 37.2, 37.5, 37.9, 38.2])
    return f"T {t} C, HR {rng.randint(62, 104)}, BP {rng.randint(104, 152)}/{rng.randint(60, 94)}."


def _cls_findings(rng: random.Random) -> tuple[Meta, str]:
    """Sample ground-truth findings (what the note documents) and the scenario name."""
    scenario_roll = rng.random()
    # ~50% criteria met; the rest split across the three ways of not meeting criteria.
    if scenario_roll < 0.5:
        scenario = "symptom+lab"
    elif scenario_roll < 0.7:
        scenario = "symptom_only"
    elif scenario_roll < 0.85:
        scenario = "lab_only"
    else:
        scenario = "neither"

    symptoms = list(UTI_SYMPTOMS)
    rng.shuffle(symptoms)
    n_present = rng.choice([1, 1, 2, 2, 3]) if scenario in ("symptom+lab", "symptom_only") else 0
    present = symptoms[:n_present]
    rest = symptoms[n_present:]
    # Negated symptoms: "no" notes often negate dysuria explicitly.
    n_neg = rng.choice([0, 1, 1, 2, 2]) if present else rng.choice([1, 1, 2, 2, 3])
    negated = rest[:n_neg]
    if not present and "dysuria" in rest and "dysuria" not in negated and rng.random() < 0.6:
        negated = ["dysuria", *negated[: max(0, n_neg - 1)]]

    # Labs: status per lab in {"positive", "negative", None(=not mentioned)}.
    labs: dict[str, str | None] = {"nitrite": None, "leukocyte_esterase": None, "wbc": None}
    lab_names = ["nitrite", "leukocyte_esterase", "wbc"]
    if scenario in ("symptom+lab", "lab_only"):
        order = lab_names[:]
        rng.shuffle(order)
        n_pos = rng.choice([1, 1, 2, 2, 3])
        for i, name in enumerate(order):
            if i < n_pos:
                labs[name] = "positive"
            else:
                labs[name] = rng.choice(["negative", "negative", None])
    elif rng.random() >= 0.15:  # otherwise: no urinalysis documented (pending / not done)
        for name in lab_names:
            labs[name] = rng.choice(["negative", "negative", "negative", None])
        if all(v is None for v in labs.values()):
            labs[rng.choice(lab_names)] = "negative"

    wbc_value = None
    if labs["wbc"] is not None:
        wbc_value = _sample_wbc(rng, labs["wbc"] == "positive")

    findings = {
        "symptoms_present": sorted(present, key=UTI_SYMPTOMS.index),
        "symptoms_negated": sorted(negated, key=UTI_SYMPTOMS.index),
        "nitrite": labs["nitrite"],
        "leukocyte_esterase": labs["leukocyte_esterase"],
        "urine_wbc_per_hpf": wbc_value,
    }

    return findings, scenario


def _cls_text(rng: random.Random, findings: Meta) -> str:
    """Render findings into a note with varied phrasing/order plus distractors."""
    present = findings["symptoms_present"]
    negated = findings["symptoms_negated"]
    labs = {
        "nitrite": findings["nitrite"],
        "leukocyte_esterase": findings["leukocyte_esterase"],
        "wbc": None if findings["urine_wbc_per_hpf"] is None else "mentioned",
    }
    wbc_value = findings["urine_wbc_per_hpf"]
    lab_names = ["nitrite", "leukocyte_esterase", "wbc"]
    ua_done = any(v is not None for v in labs.values())
    sex = _sex(rng, p_female=0.65)
    age = rng.randint(18, 90)
    sex_word = rng.choice(["woman", "female"] if sex == "F" else ["man", "male"])
    opener = rng.choice(_CLS_OPENERS).format(
        age=age,
        sex=sex_word,
        sexabbr=sex,
        cap_sex=cap(sex_word),
        reason=rng.choice(_CLS_REASONS),
    )
    sentences: list[str] = []
    if present:
        phrases = [rng.choice(_SYMPTOM_PHRASES[s]) for s in present]
        if rng.random() < 0.5 or len(phrases) == 1:
            sentences.append(
                rng.choice(_PRESENT_TEMPLATES).format(
                    x=join_list(phrases), d=rng.randint(1, 6), dow=rng.choice(_DAYS_OF_WEEK)
                )
            )
        else:
            for p in phrases:
                sentences.append(
                    rng.choice(_PRESENT_TEMPLATES).format(
                        x=p, d=rng.randint(1, 6), dow=rng.choice(_DAYS_OF_WEEK)
                    )
                )
    if negated:
        phrases = [rng.choice(_SYMPTOM_PHRASES[s]) for s in negated]
        conj = rng.choice(["or", "and"])
        sentences.append(rng.choice(_NEGATED_TEMPLATES).format(x=join_list(phrases, conj)))

    if ua_done:
        items: list[str] = []
        for name in lab_names:
            status = labs[name]
            if status is None:
                continue
            if name == "wbc":
                items.append(rng.choice(_WBC_PHRASES).format(n=wbc_value))
            else:
                items.append(rng.choice(_LAB_PHRASES[(name, status)]))
        if rng.random() < 0.4:
            items.append(rng.choice(_UA_EXTRAS))
        rng.shuffle(items)
        sentences.append(f"{rng.choice(_UA_INTROS)} {', '.join(items)}.")
        if rng.random() < 0.2:
            sentences.append("Urine culture sent.")
    else:
        sentences.append(rng.choice(_NO_UA))

    n_distr = rng.choice([1, 2, 2, 3, 3, 4])
    for d in rng.sample(_CLS_DISTRACTORS, n_distr):
        sentences.append(_vitals(rng) if d == "VITALS" else d)
    rng.shuffle(sentences)
    return " ".join([opener, *sentences])


def gen_classification(rng: random.Random, accept: Accept) -> tuple[Record, Meta] | None:
    findings, scenario = _cls_findings(rng)
    label = classification_rule(findings)
    for _ in range(SURFACE_RETRIES):
        record = {"text": _cls_text(rng, findings), "label": label}
        if accept(record):
            return record, {"findings": findings, "scenario": scenario}
    return None


def noise_classification(rng: random.Random, record: Record) -> None:
    record["label"] = "no" if record["label"] == "yes" else "yes"


# ---------------------------------------------------------------------------
# 2. Triage: patient portal message -> provider and urgency
# ---------------------------------------------------------------------------

TRIAGE_PROVIDERS = ("physician", "nurse", "pharmacist", "admin")
TRIAGE_URGENCIES = ("routine", "soon", "urgent", "emergent")

TRIAGE_RULES = {
    "provider": {
        "pharmacist": "medication refills, mild side effects, drug interactions, dosing questions",
        "admin": "billing, appointments (scheduling/rescheduling), forms, records, insurance",
        "nurse": "wound/incision care, vaccine questions, mild symptom home-care advice, "
        "device or how-to questions (glucometer, CPAP, inhaler, BP cuff)",
        "physician": "new or worsening symptoms, test result interpretation, diagnosis "
        "questions, and any message with an emergent cue",
    },
    "urgency": {
        "emergent": "chest pain, trouble breathing, fainting/passing out, suicidal thoughts",
        "urgent": "fever over 39C, pain getting worse, running out of a critical medication "
        "(insulin, anticoagulant, anti-seizure, transplant, beta-blocker) today",
        "soon": "symptoms present for several days, refill needed within about a week, "
        "paperwork or appointment changes needed this week",
        "routine": "paperwork, billing, general questions, non-urgent refills, result questions",
    },
}

_MEDS = [
    "atorvastatin",
    "lisinopril",
    "metformin",
    "sertraline",
    "omeprazole",
    "levothyroxine",
    "amlodipine",
    "montelukast",
    "losartan",
    "gabapentin",
]
_CRITICAL_MEDS = ["insulin", "levetiracetam", "tacrolimus", "apixaban", "metoprolol", "warfarin"]
_OTC = ["ibuprofen", "a cold medicine", "melatonin", "an antihistamine", "Tylenol", "naproxen"]
_SUPPLEMENTS = ["St. John's wort", "fish oil", "turmeric", "vitamin D", "grapefruit juice"]
_SIDE_EFFECTS = [
    "upset stomach",
    "dry mouth",
    "headache",
    "dizziness when I stand",
    "trouble sleeping",
]
_SITES = ["knee", "abdominal", "shoulder", "hip", "hand", "back"]
_DEVICES = [
    "inhaler",
    "blood pressure cuff",
    "insulin pen",
    "glucometer",
    "nebulizer",
    "CPAP machine",
]
_TESTS = ["cholesterol", "A1c", "thyroid", "blood count", "kidney function", "liver enzyme"]
_FLAGS = ["flagged high", "flagged low", "marked abnormal", "slightly out of range"]
_SYMPTOMS_PT = [
    "a headache",
    "stomach pain",
    "a cough",
    "back pain",
    "diarrhea",
    "dizziness",
    "a sore throat",
    "joint pain",
    "nausea",
    "ear pain",
]
_BODY = ["stomach", "back", "knee", "head", "side", "ear", "foot"]
_COUNTRIES = ["Kenya", "India", "Peru", "Vietnam", "Brazil", "Thailand"]
_CONDITIONS = ["diabetes", "asthma", "thyroid disease", "anemia", "high blood pressure", "IBS"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
_WHEN = ["this morning", "an hour ago", "about 30 minutes ago", "last night", "earlier today"]
_WHO = ["wife", "husband", "daughter", "son", "roommate", "neighbor"]
_ROOMS = ["kitchen", "bathroom", "shower", "garden", "hallway"]
_MONTHS = ["January", "March", "April", "June", "August", "October", "December"]
_GREETINGS = ["", "", "Hi.", "Hello.", "Hi there!", "Good morning.", "Hello doctor.", "Hi team."]
_CLOSINGS = [
    "",
    "",
    "Thanks.",
    "Thank you!",
    "Please let me know.",
    "Appreciate it.",
    "Thanks so much.",
]
_REASSURE = ["No chest pain or trouble breathing.", "No fever.", "I feel okay otherwise."]

# (provider, urgency) -> (weight, templates). Weights give a realistic, skewed mix.
_TRIAGE_TEMPLATES: dict[tuple[str, str], tuple[int, list[str]]] = {
    ("pharmacist", "routine"): (
        8,
        [
            "Can I take {otc} with my {med}? I just want to check before I buy it.",
            "Is it okay to take my {med} at night instead of in the morning?",
            "I still have a month of {med} left, can you send a refill when you get a chance?",
            "Does {med} interact with {supp}? A friend said it might.",
            "Since starting {med} I have mild {side} but it is manageable. Is that normal?",
            "Should I take my {med} with food or on an empty stomach?",
        ],
    ),
    ("pharmacist", "soon"): (
        8,
        [
            "I will run out of {med} in about a week, please send a refill to my pharmacy.",
            "I need a refill of {med}, I have about {pills} pills left.",
            "I have had {side} for {days} days since my {med} dose was increased. "
            "Should I keep taking it?",
            "My {med} refill is due next week and the pharmacy says it needs a new prescription.",
        ],
    ),
    ("pharmacist", "urgent"): (
        5,
        [
            "I am completely out of {crit} today and the pharmacy says the prescription expired. "
            "What do I do?",
            "My last dose of {crit} is today and I can't get a refill. Please help.",
            "I run out of my {crit} tonight and the pharmacy won't fill it without a new script.",
        ],
    ),
    ("admin", "routine"): (
        12,
        [
            "I got a bill for my visit on {weekday} that looks wrong, who can I talk to about it?",
            "Can you send a copy of my medical records from {year} to my new doctor?",
            "I need to reschedule my appointment next month to a later time of day.",
            "Can you fill out the disability parking form I dropped off last {weekday}?",
            "How do I update my insurance information in the portal? I changed jobs.",
            "Could I get an itemized receipt for my visit in {month} for my taxes?",
            "I was charged twice for my {month} visit. Can someone in billing look into it?",
            "Can I get a copy of my vaccination record for my {who}'s school?",
            "I would like to book my yearly physical sometime in {month} if possible.",
            "My insurance changed in {month}. Where do I send the new card details?",
        ],
    ),
    ("admin", "soon"): (
        6,
        [
            "My work needs a form completed by {weekday}, can someone fill it out this week?",
            "I need to move my appointment this {weekday} to next week, please call me back.",
            "My insurance needs a prior authorization form before my procedure next week.",
            "My school needs my physical form signed by {weekday}. Can the office do that?",
            "I have to cancel my appointment this {weekday} because of work, can we rebook?",
        ],
    ),
    ("nurse", "routine"): (
        9,
        [
            "How often should I change the dressing on my {site} incision? It looks clean.",
            "Is it safe to get the flu shot and the COVID booster on the same day?",
            "What vaccines do I need before traveling to {country}?",
            "How do I clean my CPAP mask? The instructions were unclear.",
            "My glucometer shows an error code, how do I fix it?",
            "Can you remind me how to use my {device}? I forgot the steps.",
        ],
    ),
    ("nurse", "soon"): (
        9,
        [
            "I have had a runny nose and sore throat for {days} days. What can I take at home?",
            "My {site} incision has been a little red at the edges for {days} days, no pus. "
            "Should someone look at it?",
            "My arm is still sore {days} days after my vaccine. Is that normal?",
            "I have had a mild itchy rash on my arms for {days} days. Any cream I can use?",
        ],
    ),
    ("nurse", "urgent"): (
        4,
        [
            "My {site} wound is draining pus and I have a fever of {hightemp}C.",
            "The skin around my {site} incision is hot and my temperature is {hightemp}C.",
        ],
    ),
    ("physician", "routine"): (
        9,
        [
            "Can you explain what my {test} results mean? The portal says {flag}.",
            "My {test} test came back {flag}, should I be worried?",
            "Was my diagnosis of {condition} confirmed by the last tests?",
            "Do my {test} numbers mean I have {condition}?",
        ],
    ),
    ("physician", "soon"): (
        10,
        [
            "I have had {symptom} for the past {days} days and it is not going away.",
            "For {days} days now I have noticed {symptom}. Should I be seen?",
            "I have had {symptom} on and off for {days} days. My temperature is {lowtemp}C.",
        ],
    ),
    ("physician", "urgent"): (
        8,
        [
            "I have a fever of {hightemp}C and {symptom} since last night.",
            "My {body} pain is getting worse every hour and the medicine isn't helping.",
            "The {body} pain I told you about is getting worse today.",
        ],
    ),
    ("physician", "emergent"): (
        15,
        [
            "I have had chest pain since {when} and it is spreading to my left arm. "
            "Should I go in?",
            "Since {when} my chest feels tight and heavy and I am sweating a lot.",
            "I am having trouble breathing even when I sit still. It started {when}.",
            "My {who} says my lips look blue and I can't catch my breath since {when}.",
            "I fainted {when} in the {room} and I still feel dizzy and weak.",
            "I passed out {when} while standing in the {room} and hit my head.",
            "I have been having suicidal thoughts since {when} and I don't feel safe at home.",
            "I keep having thoughts of ending my life, it got worse {when} and I am scared.",
            "Having crushing chest pain since {when}, my {who} is with me. What should I do?",
            "I am short of breath and wheezing badly since {when}, my inhaler is not helping.",
        ],
    ),
}

_TRIAGE_KEYS = list(_TRIAGE_TEMPLATES)
_TRIAGE_WEIGHTS = [_TRIAGE_TEMPLATES[k][0] for k in _TRIAGE_KEYS]


#: Share of messages that raise two concerns. Real portal messages often do, and then the
#: answer needs a rule over both rather than a template match: the more clinical provider
#: answers (``TRIAGE_PROVIDERS`` order) and the more urgent concern sets the urgency.
TRIAGE_TWO_CONCERNS = 0.35
_SECOND_KEYS = [key for key in _TRIAGE_KEYS if key[0] != "physician"]
_SECOND_WEIGHTS = [_TRIAGE_TEMPLATES[key][0] for key in _SECOND_KEYS]
_SECOND_CONCERN = ["Also,", "One more thing:", "Separately,", "Another question:", "And"]


def triage_labels(concerns: list[tuple[str, str]]) -> tuple[str, str]:
    """(provider, urgency) of a message raising these (provider, urgency) concerns."""
    provider = min((p for p, _ in concerns), key=TRIAGE_PROVIDERS.index)
    urgency = max((u for _, u in concerns), key=TRIAGE_URGENCIES.index)
    return provider, urgency


def gen_triage(rng: random.Random, accept: Accept) -> tuple[Record, Meta] | None:
    concerns = [rng.choices(_TRIAGE_KEYS, weights=_TRIAGE_WEIGHTS, k=1)[0]]
    if rng.random() < TRIAGE_TWO_CONCERNS:
        # The second concern is not a physician's, so physician messages stay as common as
        # with one concern and the rule decides between the other providers too.
        second = concerns[0]
        while second == concerns[0]:
            second = rng.choices(_SECOND_KEYS, weights=_SECOND_WEIGHTS, k=1)[0]
        concerns.append(second)
        rng.shuffle(concerns)
    provider, urgency = triage_labels(concerns)
    for _ in range(SURFACE_RETRIES):
        record = {"text": _triage_text(rng, concerns), "provider": provider}
        record["urgency"] = urgency
        if accept(record):
            return record, {"provider": provider, "urgency": urgency, "concerns": concerns}
    return None


def _triage_body(rng: random.Random, provider: str, urgency: str) -> str:
    template = rng.choice(_TRIAGE_TEMPLATES[(provider, urgency)][1])
    return template.format(
        otc=rng.choice(_OTC),
        med=rng.choice(_MEDS),
        crit=rng.choice(_CRITICAL_MEDS),
        supp=rng.choice(_SUPPLEMENTS),
        side=rng.choice(_SIDE_EFFECTS),
        pills=rng.randint(4, 8),
        days=rng.randint(3, 6),
        weekday=rng.choice(_WEEKDAYS),
        site=rng.choice(_SITES),
        country=rng.choice(_COUNTRIES),
        device=rng.choice(_DEVICES),
        test=rng.choice(_TESTS),
        flag=rng.choice(_FLAGS),
        condition=rng.choice(_CONDITIONS),
        symptom=rng.choice(_SYMPTOMS_PT),
        body=rng.choice(_BODY),
        hightemp=f"{rng.randint(391, 405) / 10:.1f}",
        lowtemp=f"{rng.randint(372, 386) / 10:.1f}",
        when=rng.choice(_WHEN),
        who=rng.choice(_WHO),
        room=rng.choice(_ROOMS),
        month=rng.choice(_MONTHS),
        year=rng.randint(2015, 2023),
    )


def _second_concern(rng: random.Random, body: str) -> str:
    connector = rng.choice(_SECOND_CONCERN)
    if connector.endswith(":"):
        return f"{connector} {body}"
    # "Also, is it okay ..." reads as one sentence; "I" stays capitalised.
    first_word = body.split(" ", 1)[0]
    lowered = body if first_word in ("I", "I'm") else body[0].lower() + body[1:]
    return f"{connector} {lowered}"


def _triage_text(rng: random.Random, concerns: list[tuple[str, str]]) -> str:
    bodies = [_triage_body(rng, provider, urgency) for provider, urgency in concerns]
    parts = [rng.choice(_GREETINGS), bodies[0], *(_second_concern(rng, b) for b in bodies[1:])]
    # Reassuring negations ("No chest pain ...") appear in non-emergent clinical messages
    # so that a keyword alone does not decide urgency.
    provider, urgency = triage_labels(concerns)
    if (
        provider in ("physician", "nurse")
        and urgency in ("routine", "soon")
        and rng.random() < 0.35
    ):
        parts.append(rng.choice(_REASSURE))
    if rng.random() < 0.3:
        parts.append(
            rng.choice(
                [
                    f"My name is on file, date of birth {rng.randint(1, 12)}/{rng.randint(1, 28)}.",
                    "I can be reached on my cell phone.",
                    "Sorry to bother you.",
                    "I tried calling but the line was busy.",
                ]
            )
        )
    parts.append(rng.choice(_CLOSINGS))
    return " ".join(p for p in parts if p)


def noise_triage(rng: random.Random, record: Record) -> None:
    field, values = (
        ("provider", TRIAGE_PROVIDERS) if rng.random() < 0.5 else ("urgency", TRIAGE_URGENCIES)
    )
    record[field] = rng.choice([v for v in values if v != record[field]])


# ---------------------------------------------------------------------------
# 3. Reasoning: MedQA-style multiple choice diagnosis questions
# ---------------------------------------------------------------------------

# Each finding is (kind, phrase). kinds: sym (symptom), hx (history), exam, test.
KNOWLEDGE_BASE: dict[str, dict[str, Any]] = {
    "pneumonia": {
        "synonyms": ["community-acquired pneumonia"],
        "system": "resp",
        "sex": "any",
        "ages": (20, 85),
        "findings": [
            ("sym", "fever"),
            ("sym", "productive cough"),
            ("sym", "pleuritic chest pain"),
            ("exam", "crackles over the right lower lobe"),
            ("test", "chest x-ray shows lobar consolidation"),
            ("test", "white cell count is elevated"),
        ],
    },
    "acute appendicitis": {
        "synonyms": ["appendicitis"],
        "system": "gi",
        "sex": "any",
        "ages": (12, 45),
        "findings": [
            ("sym", "periumbilical pain migrating to the right lower quadrant"),
            ("sym", "loss of appetite"),
            ("sym", "nausea"),
            ("exam", "rebound tenderness at McBurney's point"),
            ("exam", "a low-grade fever"),
            ("test", "white cell count is elevated"),
        ],
    },
    "acute cholecystitis": {
        "synonyms": ["cholecystitis"],
        "system": "gi",
        "sex": "any",
        "ages": (30, 75),
        "findings": [
            ("sym", "right upper quadrant pain after fatty meals"),
            ("sym", "nausea"),
            ("sym", "fever"),
            ("exam", "a positive Murphy sign"),
            ("test", "ultrasound shows gallbladder wall thickening"),
        ],
    },
    "acute pancreatitis": {
        "synonyms": ["pancreatitis"],
        "system": "gi",
        "sex": "any",
        "ages": (25, 75),
        "findings": [
            ("sym", "epigastric pain radiating to the back"),
            ("sym", "vomiting"),
            ("hx", "heavy alcohol use"),
            ("exam", "epigastric tenderness"),
            ("test", "serum lipase is markedly elevated"),
        ],
    },
    "myocardial infarction": {
        "synonyms": ["heart attack", "STEMI"],
        "system": "cardio",
        "sex": "any",
        "ages": (45, 85),
        "findings": [
            ("sym", "crushing substernal chest pain"),
            ("sym", "pain radiating to the left arm"),
            ("sym", "sweating"),
            ("exam", "diaphoresis"),
            ("test", "ECG shows ST elevation in the inferior leads"),
            ("test", "troponin is elevated"),
        ],
    },
    "stable angina": {
        "synonyms": ["angina pectoris"],
        "system": "cardio",
        "sex": "any",
        "ages": (45, 80),
        "findings": [
            ("sym", "chest pressure with exertion"),
            ("sym", "symptoms that resolve with rest"),
            ("hx", "hypercholesterolemia"),
            ("exam", "normal heart sounds"),
            ("test", "troponin is normal"),
        ],
    },
    "pulmonary embolism": {
        "synonyms": ["PE"],
        "system": "resp",
        "sex": "any",
        "ages": (25, 80),
        "findings": [
            ("sym", "sudden shortness of breath"),
            ("sym", "pleuritic chest pain"),
            ("hx", "a recent long-haul flight"),
            ("exam", "tachycardia"),
            ("exam", "unilateral calf swelling"),
            ("test", "CT angiography shows a filling defect in a pulmonary artery"),
        ],
    },
    "asthma exacerbation": {
        "synonyms": ["acute asthma"],
        "system": "resp",
        "sex": "any",
        "ages": (12, 50),
        "findings": [
            ("sym", "wheezing"),
            ("sym", "chest tightness"),
            ("sym", "shortness of breath"),
            ("hx", "seasonal allergies"),
            ("exam", "prolonged expiration"),
            ("test", "peak flow is reduced"),
        ],
    },
    "COPD exacerbation": {
        "synonyms": ["acute exacerbation of COPD"],
        "system": "resp",
        "sex": "any",
        "ages": (50, 85),
        "findings": [
            ("sym", "increased sputum"),
            ("sym", "shortness of breath"),
            ("sym", "wheezing"),
            ("hx", "a 40 pack-year smoking history"),
            ("exam", "a barrel chest"),
        ],
    },
    "congestive heart failure": {
        "synonyms": ["heart failure", "CHF"],
        "system": "cardio",
        "sex": "any",
        "ages": (50, 90),
        "findings": [
            ("sym", "orthopnea"),
            ("sym", "shortness of breath"),
            ("exam", "bilateral leg edema"),
            ("exam", "jugular venous distension"),
            ("exam", "bibasilar crackles"),
            ("test", "BNP is elevated"),
        ],
    },
    "diabetic ketoacidosis": {
        "synonyms": ["DKA"],
        "system": "endo",
        "sex": "any",
        "ages": (12, 40),
        "findings": [
            ("sym", "polyuria"),
            ("sym", "excessive thirst"),
            ("sym", "abdominal pain"),
            ("exam", "fruity breath"),
            ("test", "glucose is 480 mg/dL with an anion gap acidosis"),
        ],
    },
    "hypothyroidism": {
        "synonyms": ["underactive thyroid"],
        "system": "endo",
        "sex": "any",
        "ages": (30, 80),
        "findings": [
            ("sym", "fatigue"),
            ("sym", "cold intolerance"),
            ("sym", "weight gain"),
            ("sym", "constipation"),
            ("exam", "dry skin"),
            ("test", "TSH is elevated"),
        ],
    },
    "Graves disease": {
        "synonyms": ["hyperthyroidism", "diffuse toxic goiter"],
        "system": "endo",
        "sex": "any",
        "ages": (20, 60),
        "findings": [
            ("sym", "heat intolerance"),
            ("sym", "weight loss"),
            ("sym", "palpitations"),
            ("exam", "a fine tremor"),
            ("exam", "proptosis"),
            ("test", "TSH is suppressed"),
        ],
    },
    "iron deficiency anemia": {
        "synonyms": ["iron-deficiency anaemia"],
        "system": "heme",
        "sex": "F",
        "ages": (18, 70),
        "findings": [
            ("sym", "fatigue"),
            ("hx", "heavy menstrual periods"),
            ("exam", "pallor"),
            ("test", "ferritin is low"),
            ("test", "the blood smear shows microcytic red cells"),
        ],
    },
    "migraine": {
        "synonyms": ["migraine headache"],
        "system": "neuro",
        "sex": "any",
        "ages": (16, 55),
        "findings": [
            ("sym", "unilateral throbbing headache"),
            ("sym", "sensitivity to light"),
            ("sym", "nausea"),
            ("sym", "a visual aura"),
            ("exam", "a normal neurological examination"),
        ],
    },
    "bacterial meningitis": {
        "synonyms": ["meningitis"],
        "system": "neuro",
        "sex": "any",
        "ages": (16, 70),
        "findings": [
            ("sym", "fever"),
            ("sym", "severe headache"),
            ("sym", "sensitivity to light"),
            ("exam", "neck stiffness"),
            ("test", "CSF is cloudy with many neutrophils"),
        ],
    },
    "ischemic stroke": {
        "synonyms": ["cerebrovascular accident", "CVA"],
        "system": "neuro",
        "sex": "any",
        "ages": (55, 90),
        "findings": [
            ("sym", "sudden right-sided weakness"),
            ("sym", "slurred speech"),
            ("hx", "atrial fibrillation"),
            ("exam", "a right facial droop"),
            ("test", "CT of the head shows no bleeding"),
        ],
    },
    "cellulitis": {
        "synonyms": [],
        "system": "skin",
        "sex": "any",
        "ages": (20, 80),
        "findings": [
            ("sym", "a painful red leg"),
            ("sym", "fever"),
            ("exam", "warm, spreading erythema of the shin"),
            ("exam", "poorly demarcated borders"),
            ("test", "white cell count is elevated"),
        ],
    },
    "gout": {
        "synonyms": ["gouty arthritis"],
        "system": "msk",
        "sex": "any",
        "ages": (35, 80),
        "findings": [
            ("sym", "sudden pain in the big toe overnight"),
            ("hx", "heavy beer drinking"),
            ("exam", "a red, swollen first metatarsophalangeal joint"),
            ("test", "joint fluid shows needle-shaped negatively birefringent crystals"),
            ("test", "uric acid is elevated"),
        ],
    },
    "nephrolithiasis": {
        "synonyms": ["kidney stone", "renal colic"],
        "system": "renal",
        "sex": "any",
        "ages": (20, 70),
        "findings": [
            ("sym", "colicky flank pain radiating to the groin"),
            ("sym", "blood in the urine"),
            ("sym", "nausea"),
            ("exam", "restlessness"),
            ("test", "CT shows a 5 mm ureteral stone"),
        ],
    },
    "acute pyelonephritis": {
        "synonyms": ["pyelonephritis", "kidney infection"],
        "system": "renal",
        "sex": "any",
        "ages": (18, 70),
        "findings": [
            ("sym", "fever"),
            ("sym", "flank pain"),
            ("sym", "painful urination"),
            ("exam", "costovertebral angle tenderness"),
            ("test", "urine shows white cell casts"),
        ],
    },
    "deep vein thrombosis": {
        "synonyms": ["DVT"],
        "system": "heme",
        "sex": "any",
        "ages": (25, 85),
        "findings": [
            ("sym", "calf pain"),
            ("hx", "recent knee surgery"),
            ("exam", "unilateral calf swelling"),
            ("exam", "calf tenderness"),
            ("test", "ultrasound shows a noncompressible popliteal vein"),
        ],
    },
    "gastroesophageal reflux disease": {
        "synonyms": ["GERD", "acid reflux"],
        "system": "gi",
        "sex": "any",
        "ages": (25, 75),
        "findings": [
            ("sym", "burning retrosternal pain after meals"),
            ("sym", "a sour taste in the mouth"),
            ("sym", "nighttime cough"),
            ("sym", "symptoms that worsen lying down"),
            ("exam", "a normal abdominal examination"),
        ],
    },
    "peptic ulcer disease": {
        "synonyms": ["peptic ulcer"],
        "system": "gi",
        "sex": "any",
        "ages": (30, 80),
        "findings": [
            ("sym", "gnawing epigastric pain"),
            ("sym", "pain that improves with meals"),
            ("hx", "daily ibuprofen use"),
            ("exam", "epigastric tenderness"),
            ("test", "stool is positive for H. pylori antigen"),
        ],
    },
    "ectopic pregnancy": {
        "synonyms": ["tubal pregnancy"],
        "system": "obgyn",
        "sex": "F",
        "ages": (18, 40),
        "findings": [
            ("sym", "a missed period"),
            ("sym", "lower abdominal pain"),
            ("sym", "vaginal spotting"),
            ("test", "the pregnancy test is positive"),
            ("test", "ultrasound shows no intrauterine pregnancy"),
        ],
    },
    "benign prostatic hyperplasia": {
        "synonyms": ["BPH"],
        "system": "renal",
        "sex": "M",
        "ages": (55, 85),
        "findings": [
            ("sym", "a weak urinary stream"),
            ("sym", "waking at night to urinate"),
            ("sym", "hesitancy"),
            ("exam", "a smooth, enlarged prostate"),
        ],
    },
    "influenza": {
        "synonyms": ["flu"],
        "system": "resp",
        "sex": "any",
        "ages": (16, 80),
        "findings": [
            ("sym", "abrupt fever"),
            ("sym", "body aches"),
            ("sym", "dry cough"),
            ("sym", "headache"),
            ("test", "a rapid antigen test is positive"),
        ],
    },
    "streptococcal pharyngitis": {
        "synonyms": ["strep throat"],
        "system": "ent",
        "sex": "any",
        "ages": (12, 40),
        "findings": [
            ("sym", "sore throat"),
            ("sym", "fever"),
            ("exam", "tonsillar exudates"),
            ("exam", "tender anterior cervical nodes"),
            ("test", "a rapid strep test is positive"),
        ],
    },
}

_DIAGNOSES = list(KNOWLEDGE_BASE)
_RSN_DISTRACTORS = [
    "He has a history of hypertension.",
    "She has a history of hypertension.",
    "Past history includes well-controlled hypothyroidism.",
    "There is a family history of colon cancer.",
    "The patient works as a teacher.",
    "The patient had an appendectomy as a child.",
    "Medications include a daily multivitamin.",
    "The patient drinks two cups of coffee a day.",
    "There is no recent travel.",
    "Vaccinations are up to date.",
]
_RSN_SETTINGS = [
    "presents to the emergency department with",
    "comes to the clinic because of",
    "is evaluated for",
    "presents with",
    "is brought in with",
]
_RSN_QUESTIONS = [
    "Which of the following is the most likely diagnosis?",
    "What is the most likely diagnosis?",
    "Which diagnosis best explains these findings?",
]
LETTERS = ("A", "B", "C", "D")


def _article(age: int) -> str:
    return "An" if age in (8, 11, 18) or 80 <= age <= 89 else "A"


def _shared_findings(a: str, b: str) -> int:
    fa = {p for _, p in KNOWLEDGE_BASE[a]["findings"]}
    fb = {p for _, p in KNOWLEDGE_BASE[b]["findings"]}
    return len(fa & fb)


def gen_reasoning(
    rng: random.Random, accept: Accept, answer_letter: str
) -> tuple[Record, Meta] | None:
    dx = rng.choice(_DIAGNOSES)
    for _ in range(SURFACE_RETRIES):
        record, meta = _reasoning_item(rng, dx, answer_letter)
        if accept(record):
            return record, meta
    return None


def _support(text: str) -> Counter[str]:
    """For each diagnosis, how many of its knowledge-base findings ``text`` shows (a finding
    inside a longer one counts: "a low-grade fever" shows "fever")."""
    lowered = text.lower()
    return Counter(
        dx for dx, kb in KNOWLEDGE_BASE.items() for _, p in kb["findings"] if p.lower() in lowered
    )


def _reasoning_item(rng: random.Random, dx: str, answer_letter: str) -> tuple[Record, Meta]:
    kb = KNOWLEDGE_BASE[dx]
    sex = kb["sex"] if kb["sex"] != "any" else _sex(rng)
    age = rng.randint(*kb["ages"])
    findings = kb["findings"]
    syms = [f for f in findings if f[0] == "sym"]
    others = [f for f in findings if f[0] != "sym"]
    # Distractor options and the red herring: prefer diagnoses sharing findings or a system.
    candidates = [d for d in _DIAGNOSES if d != dx]
    weights = [
        1 + 3 * _shared_findings(dx, d) + 2 * (KNOWLEDGE_BASE[d]["system"] == kb["system"])
        for d in candidates
    ]
    own = {p for _, p in findings}
    person = "man" if sex == "M" else "woman"
    distractors = [d for d in _RSN_DISTRACTORS if not d.startswith("He " if sex == "F" else "She ")]
    for _ in range(SURFACE_RETRIES):
        # 2-3 findings of the answer (at least one symptom), and one fewer red-herring
        # findings of one distractor, so the answer is the diagnosis the most findings
        # support, never the only one any finding supports.
        n_true = rng.randint(2, 3)
        n_sym = rng.randint(1, min(n_true, len(syms)))
        n_other = min(n_true - n_sym, len(others))
        chosen_syms = rng.sample(syms, n_sym)
        chosen_others = rng.sample(others, n_other)
        herring_dx = rng.choices(candidates, weights=weights, k=1)[0]
        herring_pool = [f for f in KNOWLEDGE_BASE[herring_dx]["findings"] if f[1] not in own]
        n_herring = len(chosen_syms) + len(chosen_others) - 1
        if len(herring_pool) < n_herring:
            continue
        herrings = rng.sample(herring_pool, n_herring)
        presenting = [p for _, p in chosen_syms] + [p for k, p in herrings if k == "sym"]
        rng.shuffle(presenting)
        sentences = [
            f"{_article(age)} {age}-year-old {person} {rng.choice(_RSN_SETTINGS)} "
            f"{join_list(presenting)}."
        ]
        for kind, phrase in chosen_others + [f for f in herrings if f[0] != "sym"]:
            if kind == "hx":
                template = rng.choice(["There is a history of {p}.", "History is notable for {p}."])
            elif kind == "exam":
                template = rng.choice(["Examination shows {p}.", "On examination there is {p}."])
            else:
                template = rng.choice(["{P}.", "Workup: {p}."])
            sentences.append(template.format(p=phrase, P=cap(phrase)))
        body = [*sentences[1:], rng.choice(distractors)]
        rng.shuffle(body)
        question = " ".join([sentences[0], *body, rng.choice(_RSN_QUESTIONS)])
        # What the text shows decides: a finding inside another counts for its diagnosis too.
        best = _support(question).most_common(2)
        if best[0][0] == dx and (len(best) == 1 or best[1][1] < best[0][1]):
            break
    else:
        raise RuntimeError(f"no vignette for {dx} whose findings favour it alone")

    # The red herring's diagnosis is always among the wrong options.
    wrong: list[str] = [herring_dx]
    while len(wrong) < 3:
        pick = rng.choices(candidates, weights=weights, k=1)[0]
        if pick not in wrong:
            wrong.append(pick)
    rng.shuffle(wrong)
    answer_idx = LETTERS.index(answer_letter)
    opts = [*wrong[:answer_idx], dx, *wrong[answer_idx:]]
    record = {
        "question": question,
        "options": dict(zip(LETTERS, opts, strict=True)),
        "answer": answer_letter,
        "answer_text": dx,
        "synonyms": list(kb["synonyms"]),
    }
    meta = {
        "diagnosis": dx,
        "findings": [p for _, p in chosen_syms + chosen_others],
        "red_herring": herring_dx,
        "red_herring_findings": [p for _, p in herrings],
    }
    return record, meta


# ---------------------------------------------------------------------------
# 4. Summarization: note -> one-sentence summary
# ---------------------------------------------------------------------------

# plans are (note phrasing, summary phrasing)
SUMMARIZATION_CASES: list[dict[str, Any]] = [
    {
        "cc": "chest pain",
        "dx": "stable angina",
        "sex": "any",
        "ages": (45, 80),
        "hpi": ["pressure-like pain with exertion, relieved by rest", "no pain at rest"],
        "exam": ["heart regular, no murmur", "lungs clear"],
        "tests": ["ECG without acute changes", "troponin negative"],
        "plans": [
            ("start aspirin 81 mg daily", "started aspirin"),
            ("refer to cardiology", "referred to cardiology"),
            ("order exercise stress test", "ordered a stress test"),
        ],
    },
    {
        "cc": "cough and fever",
        "dx": "community-acquired pneumonia",
        "sex": "any",
        "ages": (20, 85),
        "hpi": ["productive cough with yellow sputum", "chills at night"],
        "exam": ["crackles at the right base", "temp 38.6 C"],
        "tests": ["chest x-ray with right lower lobe consolidation"],
        "plans": [
            ("start amoxicillin for 5 days", "started amoxicillin"),
            ("repeat chest x-ray in 6 weeks", "planned a repeat chest x-ray"),
            ("return if short of breath", "given return precautions"),
        ],
    },
    {
        "cc": "burning with urination",
        "dx": "uncomplicated cystitis",
        "sex": "F",
        "ages": (18, 60),
        "hpi": ["urinary frequency", "no fever or flank pain"],
        "exam": ["mild suprapubic tenderness", "no CVA tenderness"],
        "tests": ["UA nitrite positive"],
        "plans": [
            ("start nitrofurantoin for 5 days", "started nitrofurantoin"),
            ("send urine culture", "sent a urine culture"),
        ],
    },
    {
        "cc": "headache",
        "dx": "migraine without aura",
        "sex": "any",
        "ages": (16, 55),
        "hpi": ["throbbing left-sided pain with nausea", "light sensitivity"],
        "exam": ["normal neuro exam", "no papilledema"],
        "tests": [],
        "plans": [
            ("start sumatriptan as needed", "prescribed sumatriptan"),
            ("keep a headache diary", "advised a headache diary"),
        ],
    },
    {
        "cc": "right lower quadrant pain",
        "dx": "acute appendicitis",
        "sex": "any",
        "ages": (12, 45),
        "hpi": ["pain began near the umbilicus", "anorexia and nausea"],
        "exam": ["rebound tenderness in the RLQ", "temp 38.1 C"],
        "tests": ["WBC 14.2", "CT with dilated appendix"],
        "plans": [
            ("surgical consult for appendectomy", "referred for appendectomy"),
            ("keep NPO and start IV fluids", "started IV fluids"),
        ],
    },
    {
        "cc": "shortness of breath",
        "dx": "heart failure exacerbation",
        "sex": "any",
        "ages": (55, 90),
        "hpi": ["orthopnea", "5 lb weight gain this week"],
        "exam": ["bilateral leg edema", "JVD present", "bibasilar crackles"],
        "tests": ["BNP elevated"],
        "plans": [
            ("give IV furosemide", "started IV diuretics"),
            ("daily weights and fluid restriction", "advised fluid restriction"),
        ],
    },
    {
        "cc": "wheezing",
        "dx": "asthma exacerbation",
        "sex": "any",
        "ages": (12, 50),
        "hpi": ["cough worse at night", "ran out of controller inhaler"],
        "exam": ["diffuse expiratory wheeze", "speaking full sentences"],
        "tests": ["peak flow 60% of predicted"],
        "plans": [
            ("give albuterol nebulizers", "treated with albuterol"),
            ("start prednisone for 5 days", "started prednisone"),
            ("restart inhaled steroid", "restarted an inhaled steroid"),
        ],
    },
    {
        "cc": "fatigue",
        "dx": "iron deficiency anemia",
        "sex": "F",
        "ages": (18, 70),
        "hpi": ["worse over two months", "heavy periods"],
        "exam": ["conjunctival pallor", "heart rate 96"],
        "tests": ["hemoglobin 9.8", "ferritin low"],
        "plans": [
            ("start oral iron", "started oral iron"),
            ("recheck CBC in 4 weeks", "planned a repeat blood count"),
        ],
    },
    {
        "cc": "painful swollen big toe",
        "dx": "acute gout",
        "sex": "any",
        "ages": (35, 80),
        "hpi": ["woke with severe pain", "beer with dinner last night"],
        "exam": ["red, hot first MTP joint"],
        "tests": ["uric acid 9.1"],
        "plans": [
            ("start colchicine", "started colchicine"),
            ("limit alcohol and red meat", "advised diet changes"),
        ],
    },
    {
        "cc": "flank pain",
        "dx": "kidney stone",
        "sex": "any",
        "ages": (20, 70),
        "hpi": ["colicky pain radiating to the groin", "pink urine"],
        "exam": ["restless, mild CVA tenderness"],
        "tests": ["CT with 4 mm distal ureteral stone"],
        "plans": [
            ("start tamsulosin and NSAIDs", "started tamsulosin"),
            ("strain urine and push fluids", "advised fluids"),
            ("follow up with urology", "referred to urology"),
        ],
    },
    {
        "cc": "sore throat",
        "dx": "strep pharyngitis",
        "sex": "any",
        "ages": (12, 40),
        "hpi": ["fever at home", "no cough"],
        "exam": ["tonsillar exudates", "tender anterior nodes"],
        "tests": ["rapid strep positive"],
        "plans": [
            ("start penicillin V for 10 days", "started penicillin"),
            ("salt-water gargles and rest", "advised supportive care"),
        ],
    },
    {
        "cc": "leg swelling",
        "dx": "deep vein thrombosis",
        "sex": "any",
        "ages": (25, 85),
        "hpi": ["left calf pain for 3 days", "recent hip surgery"],
        "exam": ["left calf larger than right", "calf tenderness"],
        "tests": ["duplex ultrasound with popliteal clot"],
        "plans": [
            ("start apixaban", "started apixaban"),
            ("recheck in 2 weeks", "arranged follow-up in two weeks"),
        ],
    },
    {
        "cc": "heartburn",
        "dx": "gastroesophageal reflux disease",
        "sex": "any",
        "ages": (25, 75),
        "hpi": ["burning after large meals", "worse lying down"],
        "exam": ["abdomen soft, nontender"],
        "tests": [],
        "plans": [
            ("start omeprazole 20 mg daily", "started omeprazole"),
            ("avoid late meals and raise head of bed", "advised lifestyle changes"),
        ],
    },
    {
        "cc": "high blood sugar",
        "dx": "type 2 diabetes",
        "sex": "any",
        "ages": (35, 80),
        "hpi": ["increased thirst and urination", "weight gain"],
        "exam": ["BMI 33", "acanthosis on neck"],
        "tests": ["A1c 8.1%"],
        "plans": [
            ("start metformin 500 mg twice daily", "started metformin"),
            ("refer to diabetes education", "referred to diabetes education"),
        ],
    },
    {
        "cc": "weakness on one side",
        "dx": "ischemic stroke",
        "sex": "any",
        "ages": (55, 90),
        "hpi": ["sudden right arm weakness", "slurred speech, onset 1 hour ago"],
        "exam": ["right facial droop", "right arm drift"],
        "tests": ["head CT without bleed"],
        "plans": [
            ("give IV thrombolysis", "given thrombolysis"),
            ("admit to stroke unit", "admitted to the stroke unit"),
        ],
    },
    {
        "cc": "red painful leg",
        "dx": "cellulitis",
        "sex": "any",
        "ages": (20, 80),
        "hpi": ["spreading redness over 2 days", "small cut on shin"],
        "exam": ["warm erythema of the left shin", "no fluctuance"],
        "tests": ["WBC 12.5"],
        "plans": [
            ("start cephalexin", "started cephalexin"),
            ("mark borders and recheck in 48 hours", "arranged a recheck in two days"),
        ],
    },
    {
        "cc": "palpitations",
        "dx": "atrial fibrillation",
        "sex": "any",
        "ages": (50, 90),
        "hpi": ["irregular heartbeat for 2 days", "mild dizziness"],
        "exam": ["irregularly irregular pulse, rate 112"],
        "tests": ["ECG with atrial fibrillation"],
        "plans": [
            ("start metoprolol for rate control", "started metoprolol"),
            ("start apixaban", "started anticoagulation"),
            ("refer to cardiology", "referred to cardiology"),
        ],
    },
    {
        "cc": "low back pain",
        "dx": "lumbar strain",
        "sex": "any",
        "ages": (20, 65),
        "hpi": ["pain after lifting boxes", "no leg numbness or weakness"],
        "exam": ["paraspinal tenderness", "normal strength and reflexes"],
        "tests": [],
        "plans": [
            ("ibuprofen and heat", "advised ibuprofen and heat"),
            ("refer to physical therapy", "referred to physical therapy"),
        ],
    },
    {
        "cc": "ear pain",
        "dx": "acute otitis media",
        "sex": "any",
        "ages": (16, 50),
        "hpi": ["recent cold", "muffled hearing"],
        "exam": ["bulging red right tympanic membrane", "temp 38.2 C"],
        "tests": [],
        "plans": [
            ("start amoxicillin", "started amoxicillin"),
            ("acetaminophen for pain", "advised acetaminophen"),
        ],
    },
    {
        "cc": "abdominal pain after meals",
        "dx": "biliary colic",
        "sex": "any",
        "ages": (25, 70),
        "hpi": ["right upper quadrant pain after fatty food", "resolves within hours"],
        "exam": ["mild RUQ tenderness", "negative Murphy sign"],
        "tests": ["ultrasound with gallstones, no wall thickening"],
        "plans": [
            ("refer to general surgery", "referred to surgery"),
            ("low-fat diet", "advised a low-fat diet"),
        ],
    },
    {
        "cc": "low mood",
        "dx": "major depressive disorder",
        "sex": "any",
        "ages": (18, 75),
        "hpi": ["poor sleep and loss of interest for 6 weeks", "denies suicidal thoughts"],
        "exam": ["flat affect", "PHQ-9 score 16"],
        "tests": ["TSH normal"],
        "plans": [
            ("start sertraline 50 mg daily", "started sertraline"),
            ("refer for counseling", "referred for counseling"),
        ],
    },
    {
        "cc": "urinary hesitancy",
        "dx": "benign prostatic hyperplasia",
        "sex": "M",
        "ages": (55, 85),
        "hpi": ["weak stream", "waking twice nightly to void"],
        "exam": ["smooth enlarged prostate"],
        "tests": ["PSA 2.1"],
        "plans": [
            ("start tamsulosin", "started tamsulosin"),
            ("recheck symptoms in 3 months", "planned follow-up in three months"),
        ],
    },
    {
        "cc": "pelvic pain",
        "dx": "ectopic pregnancy",
        "sex": "F",
        "ages": (18, 40),
        "hpi": ["missed period", "vaginal spotting"],
        "exam": ["left adnexal tenderness"],
        "tests": ["hCG positive", "no intrauterine pregnancy on ultrasound"],
        "plans": [
            ("urgent gynecology consult", "referred urgently to gynecology"),
            ("give methotrexate", "treated with methotrexate"),
        ],
    },
    {
        "cc": "high blood pressure",
        "dx": "essential hypertension",
        "sex": "any",
        "ages": (35, 85),
        "hpi": ["home readings around 150/95", "no headache or chest pain"],
        "exam": ["BP 152/96", "normal fundi"],
        "tests": ["creatinine normal"],
        "plans": [
            ("start amlodipine 5 mg daily", "started amlodipine"),
            ("low-salt diet", "advised a low-salt diet"),
        ],
    },
]

_SEX_NOTE = {"F": ["F", "female", "woman"], "M": ["M", "male", "man"]}
_DURATIONS = ["1 day", "2 days", "3 days", "4 days", "5 days", "1 week", "2 weeks", "several days"]
# Filler sentences, grouped so a note never contains two contradictory ones.
_SUM_FILLERS = [
    ["PMH: hypertension.", "PMH: none.", "PMH: asthma as a child."],
    ["Meds: none.", "Meds: lisinopril.", "Meds: multivitamin."],
    ["NKDA.", "Allergic to sulfa."],
    ["Nonsmoker.", "Former smoker.", "Drinks socially."],
    ["ROS otherwise negative."],
    ["Lives with spouse.", "Works as a driver.", "Works from home."],
]
_CC_HEADERS = ["CC: {cc}.", "Chief complaint: {cc}.", "Reason for visit: {cc}."]
_HPI_TEMPLATES = [
    "HPI: {age}{sexabbr} with {cc} x {dur}, {hpi}.",
    "HPI: {age}-year-old {sexword} reports {cc} for {dur}; {hpi}.",
    "{age} yo {sexword} presents with {cc} for {dur}. Notes {hpi}.",
]
_EXAM_TEMPLATES = ["Exam: {x}.", "On exam, {x}.", "PE: {x}."]
_TEST_TEMPLATES = ["Studies: {x}.", "Workup: {x}.", "Results: {x}."]
_ASSESS_TEMPLATES = ["Assessment: {dx}.", "Impression: {dx}.", "A: {dx}.", "Dx: {dx}."]
_PLAN_TEMPLATES = ["Plan: {x}.", "P: {x}.", "Plan - {x}."]
_FOLLOWUP = [
    "Return precautions given.",
    "Follow up in clinic as needed.",
    "Patient agrees with plan.",
]


def gen_summarization(rng: random.Random, accept: Accept) -> tuple[Record, Meta] | None:
    case = rng.choice(SUMMARIZATION_CASES)
    for _ in range(SURFACE_RETRIES):
        record = _summarization_item(rng, case)
        if accept(record):
            return record, {"diagnosis": case["dx"], "chief_complaint": case["cc"]}
    return None


def _summarization_item(rng: random.Random, case: dict[str, Any]) -> Record:
    sex = case["sex"] if case["sex"] != "any" else _sex(rng)
    age = rng.randint(*case["ages"])
    sexword = rng.choice(_SEX_NOTE[sex][1:])
    n_plans = rng.choice([1, 2, 2])
    plans = rng.sample(case["plans"], min(n_plans, len(case["plans"])))
    hpi = rng.sample(case["hpi"], rng.randint(1, len(case["hpi"])))
    exam = rng.sample(case["exam"], rng.randint(1, len(case["exam"])))

    parts = [rng.choice(_CC_HEADERS).format(cc=case["cc"])]
    parts.append(
        rng.choice(_HPI_TEMPLATES).format(
            age=age,
            sexabbr=sex,
            sexword=sexword,
            cc=case["cc"],
            dur=rng.choice(_DURATIONS),
            hpi=", ".join(hpi),
        )
    )
    for group in rng.sample(_SUM_FILLERS, rng.randint(1, 3)):
        parts.append(rng.choice(group))
    parts.append(rng.choice(_EXAM_TEMPLATES).format(x=", ".join(exam)))
    if rng.random() < 0.5:
        parts.append(f"Vitals: {_vitals(rng)}")
    if case["tests"]:
        tests = rng.sample(case["tests"], rng.randint(1, len(case["tests"])))
        parts.append(rng.choice(_TEST_TEMPLATES).format(x=", ".join(tests)))
    parts.append(rng.choice(_ASSESS_TEMPLATES).format(dx=case["dx"]))
    parts.append(rng.choice(_PLAN_TEMPLATES).format(x="; ".join(p for p, _ in plans)))
    if rng.random() < 0.5:
        parts.append(rng.choice(_FOLLOWUP))
    text = " ".join(parts)

    person = "man" if sex == "M" else "woman"
    summary = (
        f"{age}-year-old {person} with {case['cc']}, diagnosed with {case['dx']}; "
        f"{join_list([s for _, s in plans])}."
    )
    return {"text": text, "summary": summary}


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

_GENERATORS: dict[str, Callable[..., tuple[Record, Meta] | None]] = {
    "classification": gen_classification,
    "triage": gen_triage,
    "reasoning": gen_reasoning,
    "summarization": gen_summarization,
}
_NOISERS: dict[str, Callable[[random.Random, Record], None]] = {
    "classification": noise_classification,
    "triage": noise_triage,
}


def split_seed(task: str, split: str) -> int:
    return BASE_SEEDS[task] + SPLIT_SEED_OFFSET[split]


def _length_ok(task: str, record: Record) -> bool:
    lo, hi = WORD_LIMITS[task]
    if not lo <= word_count(record[TEXT_FIELD[task]]) <= hi:
        return False
    if task == "summarization":
        slo, shi = SUMMARY_WORD_LIMITS
        return slo <= word_count(record["summary"]) <= shi
    return True


def generate_task(task: str) -> dict[str, list[tuple[Record, Meta]]]:
    """Generate all splits of one task; returns {split: [(record, meta), ...]}.

    ``meta`` is NOT written to disk; it carries ground truth for tests (e.g. the
    classification findings and whether the label was noised).
    """
    seen: set[str] = set()
    out: dict[str, list[tuple[Record, Meta]]] = {}

    def accept(fields: Record) -> bool:
        # Length limits + never reuse a (normalised) text already used in ANY split.
        return _length_ok(task, fields) and normalise(fields[TEXT_FIELD[task]]) not in seen

    for split in GENERATION_ORDER:
        rng = random.Random(split_seed(task, split))
        n = SPLIT_SIZES[task][split]
        letters: list[str] = []
        if task == "reasoning":
            # Exactly balanced answer letters per split (up to rounding), in random order.
            letters = [LETTERS[i % 4] for i in range(n)]
            rng.shuffle(letters)
        items: list[tuple[Record, Meta]] = []
        attempts = 0
        while len(items) < n:
            attempts += 1
            if attempts > MAX_ATTEMPTS_PER_RECORD * n:
                raise RuntimeError(f"could not generate enough unique {task}/{split} examples")
            extra = (letters[len(items)],) if task == "reasoning" else ()
            result = _GENERATORS[task](rng, accept, *extra)
            if result is None:
                continue
            fields, meta = result
            seen.add(normalise(fields[TEXT_FIELD[task]]))
            meta = {**meta, "noised": False}
            if split == "train" and LABEL_NOISE[task] > 0 and rng.random() < LABEL_NOISE[task]:
                _NOISERS[task](rng, fields)
                meta["noised"] = True
            record = {"id": f"{ID_PREFIX[task]}-{split}-{len(items):05d}", **fields}
            record["synthetic"] = True
            items.append((record, meta))
        out[split] = items
    return {split: out[split] for split in SPLITS}


def generate_all() -> dict[str, dict[str, list[tuple[Record, Meta]]]]:
    return {task: generate_task(task) for task in TASKS}


def serialise(records: list[Record]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_all(out_dir: Path, data: dict | None = None) -> list[Path]:
    data = data if data is not None else generate_all()
    written = []
    for task in TASKS:
        (out_dir / task).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            path = out_dir / task / f"{split}.jsonl"
            content = serialise([r for r, _ in data[task][split]])
            with open(path, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(content)
            written.append(path)
    manifest = out_dir / MANIFEST_NAME
    with open(manifest, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(manifest_text(out_dir))
    return written


# The files listed here, unchanged and at these paths, are the only ones whose text clintune
# may log to W&B without an explicit opt-in (src/clintune/privacy.py). A copy elsewhere or an
# edited file counts as the user's own data.
MANIFEST_NAME = "shipped.sha256"


def manifest_text(data_dir: Path) -> str:
    lines = [
        "# SHA-256 of the shipped synthetic data (python data/generate.py writes this file).",
        "# Text from these files, unchanged and at these paths, may go to W&B; any other data",
        "# is treated as sensitive unless a run sets task.data.contains_sensitive_text=false.",
    ]
    for task in TASKS:
        for split in SPLITS:
            relative = f"{task}/{split}.jsonl"
            digest = hashlib.sha256((data_dir / relative).read_bytes()).hexdigest()
            lines.append(f"{digest}  {relative}")
    return "\n".join(lines) + "\n"


# ---- statistics rendered into data/README.md between markers ----

STATS_BEGIN = "<!-- BEGIN GENERATED STATS (python data/generate.py) -->"
STATS_END = "<!-- END GENERATED STATS -->"

_STAT_FIELDS = {
    "classification": ["label"],
    "triage": ["provider", "urgency"],
    "reasoning": ["answer"],
    "summarization": [],
}
_ALLOWED = {
    "label": ("yes", "no"),
    "provider": TRIAGE_PROVIDERS,
    "urgency": TRIAGE_URGENCIES,
    "answer": LETTERS,
}


def render_stats(data: dict) -> str:
    lines = [STATS_BEGIN, ""]
    lines.append("| task | train | val | test |")
    lines.append("|---|---|---|---|")
    for task in TASKS:
        sizes = " | ".join(str(len(data[task][s])) for s in SPLITS)
        lines.append(f"| {task} | {sizes} |")
    lines.append("")
    for task in TASKS:
        for field in _STAT_FIELDS[task]:
            lines.append(f"**{task} / `{field}`** (count, % of split)")
            lines.append("")
            lines.append("| value | train | val | test |")
            lines.append("|---|---|---|---|")
            counts = {s: Counter(r[field] for r, _ in data[task][s]) for s in SPLITS}
            for value in _ALLOWED[field]:
                cells = []
                for s in SPLITS:
                    c = counts[s][value]
                    cells.append(f"{c} ({100 * c / len(data[task][s]):.1f}%)")
                lines.append(f"| {value} | " + " | ".join(cells) + " |")
            lines.append("")
    noised = {
        task: sum(m["noised"] for _, m in data[task]["train"])
        for task in TASKS
        if LABEL_NOISE[task] > 0
    }
    lines.append(
        "Train examples with injected label noise: "
        + ", ".join(f"{t} {n}/{len(data[t]['train'])}" for t, n in noised.items())
        + " (which ones is not recorded in the data)."
    )
    words = []
    for task in TASKS:
        counts = [word_count(r[TEXT_FIELD[task]]) for s in SPLITS for r, _ in data[task][s]]
        words.append(f"{task} {min(counts)}-{max(counts)} (mean {sum(counts) / len(counts):.1f})")
    lines.append("")
    lines.append("Words per example text: " + "; ".join(words) + ".")
    lines.append("")
    lines.append(STATS_END)
    return "\n".join(lines)


_STATS_RE = re.compile(re.escape(STATS_BEGIN) + r".*?" + re.escape(STATS_END), re.DOTALL)


def readme_with_stats(readme: str, stats: str) -> str:
    if not _STATS_RE.search(readme):
        raise ValueError("README is missing the generated-stats markers")
    return _STATS_RE.sub(lambda _m: stats, readme, count=1)


def check(target_dir: Path, readme_path: Path | None) -> list[str]:
    """Return a list of problems (empty if committed files match a fresh generation)."""
    problems = []
    data = generate_all()
    with tempfile.TemporaryDirectory() as tmp:
        write_all(Path(tmp), data)
        for task in TASKS:
            for split in SPLITS:
                rel = Path(task) / f"{split}.jsonl"
                fresh = (Path(tmp) / rel).read_bytes()
                committed = target_dir / rel
                if not committed.exists():
                    problems.append(f"missing: {committed}")
                elif committed.read_bytes() != fresh:
                    problems.append(f"differs: {committed}")
        committed_manifest = target_dir / MANIFEST_NAME
        if not committed_manifest.exists():
            problems.append(f"missing: {committed_manifest}")
        elif committed_manifest.read_text(encoding="utf-8") != manifest_text(Path(tmp)):
            problems.append(f"differs: {committed_manifest}")
    if readme_path is not None:
        if not readme_path.exists():
            problems.append(f"missing: {readme_path}")
        else:
            text = readme_path.read_text(encoding="utf-8")
            try:
                if readme_with_stats(text, render_stats(data)) != text:
                    problems.append(f"stale stats block: {readme_path}")
            except ValueError as exc:
                problems.append(f"{readme_path}: {exc}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: data/ next to script)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp dir and exit 1 if the files in --out (default data/) differ",
    )
    args = parser.parse_args(argv)
    target = args.out if args.out is not None else DATA_DIR
    # The README stats block is only maintained for the default location.
    readme = README_PATH if args.out is None else None

    if args.check:
        problems = check(target, readme)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("data is out of date: run `python data/generate.py`", file=sys.stderr)
            return 1
        print(f"OK: {target} matches data/generate.py output")
        return 0

    data = generate_all()
    paths = write_all(target, data)
    if readme is not None and readme.exists():
        text = readme.read_text(encoding="utf-8")
        new = readme_with_stats(text, render_stats(data))
        if new != text:
            with open(readme, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(new)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files ({total / 1e6:.2f} MB) under {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
