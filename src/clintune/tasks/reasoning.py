"""MedQA-style clinical reasoning: a vignette → the most likely diagnosis, either picked from
lettered options (``with_options: true``, the answer is a letter) or written out as free text
(``with_options: false``, the answer is the diagnosis name)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from clintune.tasks.base import Task
from clintune.tasks.data import FieldSpec

DEFAULT_LETTERS = ("A", "B", "C", "D")

_ARTICLES = frozenset({"a", "an", "the"})
# Characters folded before tokenising: Unicode spaces to a space; the minus sign, en dash and
# their look-alikes to "-"; the micro sign to mu; the middle dot some sources use as a
# decimal point ("0·718") to a full stop only between digits (below).
_FOLD = str.maketrans(
    {
        **dict.fromkeys("\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008", " "),
        **dict.fromkeys("\u2009\u200a\u202f\u205f\u3000", " "),
        **dict.fromkeys("\u2212\u2010\u2011\u2012\u2013\ufe63\uff0d", "-"),
        "\u00b5": "\u03bc",
        "\u2103": "\u00b0c",
        "\u2019": "'",
    }
)
# What an answer keeps, in this order; everything else (other punctuation, quotes, brackets)
# separates tokens. Signs and decimal points carry meaning: "-0.45" is not "0.45", and
# "(+) stranded" is not "(-) stranded".
_ANSWER_TOKEN = re.compile(
    r"""
      \(\s*[-+±]\s*\)                                # a bracketed sign: "(+)", "(-)"
    | (?<![\w.])[-+±]?\d+(?:[.,]\d+)*                 # a number, with its sign: "-0.45", "1,000"
    | (?<![\w.])[-+±]?\.\d+                          # ".5"
    | [^\W_]+(?:[-+](?![\w]))?                       # a word, with a trailing sign: "cd4+", "rh-"
    | [+±<>≤≥%↑↓←→↔]                                 # a plus, comparison or arrow means something
    """,
    re.VERBOSE,
)
_DECIMAL_DOT = re.compile(r"(?<=\d)\u00b7(?=\d)")
# Lead-ins a model may put before a free-text answer; removed so "Diagnosis: gout" scores.
_FREE_TEXT_LEAD_IN = re.compile(
    r"^(?:(?:the\s+)?(?:most\s+likely\s+|final\s+|correct\s+)?"
    r"(?:answer|diagnosis)(?:\s+is)?\s*[:=\-]?\s*)+",
)


@dataclass(frozen=True)
class CheckedFieldSpec(FieldSpec):
    """A FieldSpec with one more check, run once the type and emptiness checks pass."""

    extra_check: Callable[[Any], str | None] | None = None

    def check(self, value: Any) -> str | None:
        reason = super().check(value)
        if reason is None and self.extra_check is not None:
            reason = self.extra_check(value)
        return reason


def normalise_answer(text: str) -> str:
    """Lowercase, articles dropped, punctuation that only separates words (hyphens between
    words, quotes, full stops) made a space, whitespace collapsed: "The Graves' disease." →
    "graves disease", "iron-deficiency" → "iron deficiency".

    Punctuation that carries meaning is kept: a number's sign and decimal point ("-0.45",
    "−0.45" → "-0.45", never "0.45"), a bracketed sign ("Naked (+) stranded" → "naked (+)
    stranded"), a sign after a word ("CD4+", "Rh-"), comparisons and arrows ("↑ ↓" is not
    "↓ ↑")."""
    folded = _DECIMAL_DOT.sub(".", text.translate(_FOLD).lower())
    tokens = [re.sub(r"\s+", "", token) for token in _ANSWER_TOKEN.findall(folded)]
    return " ".join(token for token in tokens if token not in _ARTICLES)


def parse_free_text(output: str) -> str | None:
    """The normalised first sentence of a free-text answer, or None when it is empty.

    Only the first line/sentence counts: a model that goes on after its answer is judged on
    the answer, not on the explanation. A lead-in such as "The most likely diagnosis is" is
    dropped; nothing else is, so a hedge ("pneumonia or asthma") stays a wrong answer.
    """
    first = re.split(r"\n|[.!?;](?:\s|$)", output.strip(), maxsplit=1)[0]
    first = _FREE_TEXT_LEAD_IN.sub("", first.strip().lower())
    normalised = normalise_answer(first)
    return normalised or None


def _letter_stands_alone(letter: str, bracketed: bool, rest: str, option: str | None) -> bool:
    """Whether a letter found where an answer would be is the answer, not a word."""
    # Closing emphasis or quotes may follow the letter: "**C**", "'B'".
    if bracketed or re.match(r"[*_\"'`’]*\s*(?:[).\]:,]|$)", rest):
        return True
    if not rest[:1].isspace() or letter.islower():
        return False  # "b pneumonia" or "Ab…" is text, not a letter answer
    # "A …" is usually the article; it is the letter only when the option's text follows.
    if letter == "A":
        return bool(option) and normalise_answer(rest).startswith(normalise_answer(option))
    return True


def parse_letter(
    output: str,
    letters: Sequence[str] = DEFAULT_LETTERS,
    options: Mapping[str, str] | None = None,
) -> str | None:
    """The option letter an answer gives, or None.

    In order, the first that applies: a letter leading the answer ("B", "b)", "(B)",
    "B. Pneumonia", "**C**"); a letter after "answer/option/choice (is)" anywhere ("The
    answer is B"); and, when ``options`` are given and no letter is, text that equals exactly
    one option's text after normalisation ("Pneumonia."). A leading letter wins over a later
    one and over a contradicting option text ("B. Asthma" is B), as the label parser's leading
    answer does. A lowercase letter or "A" followed by more words counts only where it cannot
    be a word ("a pneumonia" is not A); a bare letter mid-sentence is never an answer.
    """
    by_upper = {letter.upper(): letter for letter in letters}
    letter_class = "".join(re.escape(c) for c in by_upper) + "".join(
        re.escape(c.lower()) for c in by_upper
    )
    option_text = {key.upper(): value for key, value in (options or {}).items()}
    text = output.strip()
    candidates = [re.match(rf"[\s*_\"'`]*([(\[])?([{letter_class}])(?![\w-])", text)]
    candidates += re.finditer(
        rf"(?<![\w-])(?i:answer|option|choice)(?![\w-])[\s*_:=\-]*(?:(?i:is)\b)?[\s*_:=\-]*"
        rf"([(\[])?([{letter_class}])(?![\w-])",
        text,
    )
    for match in candidates:
        if match is None:
            continue
        letter = match.group(2)
        rest = text[match.end() :]
        if _letter_stands_alone(letter, bool(match.group(1)), rest, option_text.get(letter)):
            return by_upper[letter.upper()]
    if options:
        said = normalise_answer(text)
        found = [key for key, value in options.items() if normalise_answer(value) == said]
        if len(found) == 1 and found[0].upper() in by_upper:
            return by_upper[found[0].upper()]
    return None


def check_options(letters: Sequence[str]) -> Callable[[Any], str | None]:
    def check(options: Any) -> str | None:
        keys = list(options)
        if sorted(keys) != sorted(letters):
            return f"expected keys {list(letters)}, got {keys!r:.60}"
        for key, value in options.items():
            if not isinstance(value, str) or not value.strip():
                return f"option {key}: expected a non-empty string, got {value!r:.60}"
        # Identical option texts would make a text answer ambiguous and the question unfair.
        if len({normalise_answer(value) for value in options.values()}) < len(keys):
            return "expected distinct option texts"
        return None

    return check


def _check_synonyms(synonyms: Any) -> str | None:
    for synonym in synonyms:
        if not isinstance(synonym, str) or not synonym.strip():
            return f"expected non-empty strings, got {synonym!r:.60}"
    return None


class ReasoningTask(Task):
    headline_metric: ClassVar[str] = "accuracy"
    count_metrics: ClassVar[frozenset[str]] = frozenset({"n_correct"})

    def __init__(
        self,
        *,
        with_options: bool = True,
        option_letters: Sequence[str] = DEFAULT_LETTERS,
        options_format: str = "Answer with the letter of the correct option only.",
        free_text_format: str = "Answer with the name of the diagnosis only.",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.with_options = bool(with_options)
        self.option_letters = tuple(str(letter).upper() for letter in option_letters)
        if len(set(self.option_letters)) < 2 or not all(
            len(letter) == 1 and letter.isalpha() for letter in self.option_letters
        ):
            raise ValueError(
                f"task '{self.name}': option_letters must be two or more distinct single "
                f"letters, got {list(option_letters)}"
            )
        answer_format = options_format if self.with_options else free_text_format
        # The answer format is part of the prompt, so one YAML serves both modes.
        self.instruction = f"{self.instruction} {answer_format.strip()}".strip()

    def schema(self) -> dict[str, FieldSpec]:
        # Free-text data need not carry options; when it does they are still checked.
        needs_options = self.with_options
        return {
            "question": FieldSpec(str, description="the clinical vignette and its question"),
            "options": CheckedFieldSpec(
                dict,
                required=needs_options,
                description="option letter → option text",
                extra_check=check_options(self.option_letters),
            ),
            "answer": FieldSpec(
                str,
                allowed=self.option_letters,
                required=needs_options,
                description="the correct option's letter",
            ),
            "answer_text": FieldSpec(str, description="the correct diagnosis, written out"),
            "synonyms": CheckedFieldSpec(
                list,
                required=False,
                nonempty=False,
                description="other accepted names for the diagnosis",
                extra_check=_check_synonyms,
            ),
        }

    def check_record(self, record: dict[str, Any]) -> list[str]:
        options, answer = record.get("options"), record.get("answer")
        if not (isinstance(options, dict) and answer in options):
            return []
        if normalise_answer(options[answer]) != normalise_answer(record["answer_text"]):
            return [
                f"field 'answer_text': expected the text of option {answer} "
                f"({options[answer]!r}), got {record['answer_text']!r}"
            ]
        return []

    def format_options(self, options: Mapping[str, str]) -> str:
        return "\n".join(f"{letter}. {options[letter]}" for letter in self.option_letters)

    def input_text(self, example: dict[str, Any]) -> str:
        if self.with_options:
            return f"{example['question']}\n\n{self.format_options(example['options'])}"
        return example["question"]

    def target_text(self, example: dict[str, Any]) -> str:
        return example["answer"] if self.with_options else example["answer_text"]

    def wrong_answers(self, example: dict[str, Any]) -> list[str]:
        options = example.get("options") or {}
        if self.with_options:
            return [letter for letter in self.option_letters if letter != example["answer"]]
        accepted = {normalise_answer(example["answer_text"])}
        accepted.update(normalise_answer(s) for s in example.get("synonyms") or [])
        return [text for text in options.values() if normalise_answer(text) not in accepted]

    def gold(self, example: dict[str, Any]) -> str | dict[str, Any]:
        if self.with_options:
            return example["answer"]
        return {
            "answer": normalise_answer(example["answer_text"]),
            "synonyms": [normalise_answer(s) for s in example.get("synonyms") or []],
        }

    def parse(self, output: str, example: dict[str, Any] | None = None) -> str | None:
        # With the example, an answer written as an option's text (not its letter) counts too.
        if self.with_options:
            options = example.get("options") if example else None
            return parse_letter(output, self.option_letters, options)
        return parse_free_text(output)

    def score_examples(
        self, examples: list[dict[str, Any]], predictions: list[Any | None], golds: list[Any]
    ) -> list[dict[str, Any]]:
        scores = []
        for prediction, gold in zip(predictions, golds, strict=True):
            if self.with_options:
                correct = prediction is not None and prediction == gold
            else:
                correct = prediction is not None and prediction in {
                    gold["answer"],
                    *gold["synonyms"],
                }
            scores.append({"correct": correct})
        return scores

    def aggregate(
        self, predictions: list[Any | None], golds: list[Any], scores: list[dict[str, Any]]
    ) -> dict[str, float]:
        if not scores:
            raise ValueError("no examples to score")
        n_correct = sum(bool(score["correct"]) for score in scores)
        return {"accuracy": n_correct / len(scores), "n_correct": float(n_correct)}
