"""Likert judges for generated summaries: a local causal LM, an OpenAI-compatible endpoint
(off unless clinical text may leave the machine), or none. The rubric and the prompt template
come from config; a judge answer that is not one clear grade is recorded as missing (None)."""

from __future__ import annotations

import gc
import json
import os
import re
import string
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

GRADES = range(1, 6)
TEMPLATE_FIELDS = frozenset({"note", "summary", "reference", "rubric"})

# Mentions of the scale itself ("out of 5", "4/5", "on a 1-5 scale") are not grades; they are
# removed first so that only the judge's own number is left.
_SCALE_MENTIONS = re.compile(
    r"(?:\b(?:out\s+of|of)\s*|/\s*)(?:5(?:\.0)?|five)\b"
    r"|\b(?:1|one)\s*(?:-|–|to)\s*(?:5|five)\b",
    re.IGNORECASE,
)
# A number standing on its own: not inside a word ("T4", "5mg"), and a leading minus or a
# decimal part is kept so that "-1" and "4.5" are rejected rather than read as 1 and 4.
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:[.,]\d+)?(?![\w])")


def parse_grade(text: str) -> int | None:
    """The 1–5 grade in a judge's answer, or None when there is not exactly one.

    Tolerant of wrapping ("Score: 4", "**5**", "4/5", "I would rate this 4 out of 5."), strict
    against ambiguity: two different numbers ("3 or 4"), a number off the scale ("10", "0"),
    a fraction ("4.5") or no number at all give None, never a guessed middle grade.
    """
    cleaned = _SCALE_MENTIONS.sub(" ", text.replace("*", " ").replace("`", " "))
    found = {match.group(0) for match in _NUMBER.finditer(cleaned)}
    if len(found) != 1:
        return None
    value = found.pop()
    if not value.isdigit():
        return None
    grade = int(value)
    return grade if grade in GRADES else None


@dataclass(frozen=True)
class JudgeItem:
    """What the judge sees for one example."""

    note: str
    summary: str
    reference: str


def check_template(template: str) -> None:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(
            f"judge prompt_template uses unknown field(s) {sorted(unknown)}; "
            f"allowed: {sorted(TEMPLATE_FIELDS)} (write a literal brace as {{{{ or }}}})"
        )
    if "summary" not in fields:
        raise ValueError("judge prompt_template must contain {summary}: the text to grade")


def build_prompt(template: str, rubric: str, item: JudgeItem) -> str:
    # format_map fills the template only; braces inside the note or summary stay literal.
    return template.format_map(
        {
            "note": item.note,
            "summary": item.summary,
            "reference": item.reference,
            "rubric": rubric.strip(),
        }
    ).strip()


class Judge(ABC):
    """Grades summaries. ``grade`` never raises for one bad answer: that answer's grade is None
    and its raw text (or the error) is returned for the audit trail."""

    @abstractmethod
    def grade(self, items: Sequence[JudgeItem]) -> tuple[list[int | None], list[str]]:
        """(grades, raw outputs), one of each per item, in order."""

    def close(self) -> None:
        """Release what the judge holds (a local model's memory)."""
        return None  # most judges hold nothing worth freeing


class NoJudge(Judge):
    def grade(self, items: Sequence[JudgeItem]) -> tuple[list[int | None], list[str]]:
        return [None] * len(items), [""] * len(items)


class LocalJudge(Judge):
    """A local Hugging Face causal LM, prompted with its own chat template, decoding greedily."""

    def __init__(
        self,
        model_cfg: DictConfig | Mapping[str, Any],
        cache_dir: str | Path,
        *,
        rubric: str,
        prompt_template: str,
        max_new_tokens: int = 8,
        batch_size: int = 16,
        device: str = "auto",
        show_progress: bool = False,
    ) -> None:
        import torch

        from clintune.models.loading import load_model

        check_template(prompt_template)
        model_cfg = model_cfg if isinstance(model_cfg, DictConfig) else OmegaConf.create(model_cfg)
        self.rubric = rubric
        self.prompt_template = prompt_template
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.show_progress = show_progress
        # max_length bounds prompt plus answer; the answer needs max_new_tokens of it.
        max_length = model_cfg.get("max_length")
        self.max_prompt_length = int(max_length) - self.max_new_tokens if max_length else None
        self.truncated_prompts = 0
        loaded = load_model(model_cfg, cache_dir)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model: Any = loaded.model.to(device)
        self.tokenizer: Any = loaded.tokenizer

    def prompts(self, items: Sequence[JudgeItem]) -> list[list[int]]:
        from clintune.tokenization import encode_prompt

        encoded: list[list[int]] = []
        for item in items:
            text = build_prompt(self.prompt_template, self.rubric, item)
            ids = encode_prompt(self.tokenizer, [{"role": "user", "content": text}])
            if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
                # Keep the end, as the evaluation does: it holds the generation prompt.
                ids = ids[-self.max_prompt_length :]
                self.truncated_prompts += 1
            encoded.append(ids)
        return encoded

    def grade(self, items: Sequence[JudgeItem]) -> tuple[list[int | None], list[str]]:
        from clintune.eval.generation import generate_greedy

        if self.model is None:
            raise RuntimeError("this LocalJudge was closed")
        if not items:
            return [], []
        raw = generate_greedy(
            self.model,
            self.tokenizer,
            self.prompts(items),
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            show_progress=self.show_progress,
        )
        return [parse_grade(text) for text in raw], raw

    def close(self) -> None:
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class JudgeRequestError(RuntimeError):
    """A request that failed after its retries; its message becomes the raw output."""


REMOTE_OPT_IN_MESSAGE = (
    "The OpenAI-compatible judge sends each clinical note, generated summary and reference "
    "summary to {base_url}, i.e. clinical text leaves this machine. It is off by default; "
    "set task.judge.openai.allow_remote_text=true only if the data may be shared with that "
    "service (synthetic data, or a deployment covered by your data agreements)."
)


class OpenAICompatibleJudge(Judge):
    """POSTs each prompt to ``{base_url}/chat/completions`` (standard library only)."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        rubric: str,
        prompt_template: str,
        api_key_env: str | None = None,
        allow_remote_text: bool = False,
        max_new_tokens: int = 8,
        timeout_s: float = 60.0,
        retries: int = 2,
        retry_backoff_s: float = 1.0,
        concurrency: int = 1,
    ) -> None:
        if allow_remote_text is not True:
            raise ValueError(REMOTE_OPT_IN_MESSAGE.format(base_url=base_url))
        if not base_url or not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"judge base_url must be an http(s) URL, got {base_url!r}")
        if not model:
            raise ValueError("the OpenAI-compatible judge needs the remote model's name (model)")
        check_template(prompt_template)
        self.api_key: str | None = None
        if api_key_env:
            # Read from the environment only, so the key never lands in a saved config.
            self.api_key = os.environ.get(str(api_key_env))
            if not self.api_key:
                raise ValueError(
                    f"the judge's API key is read from the environment variable "
                    f"{api_key_env}, which is not set"
                )
        self.url = str(base_url).rstrip("/") + "/chat/completions"
        self.model = str(model)
        self.rubric = rubric
        self.prompt_template = prompt_template
        self.max_new_tokens = int(max_new_tokens)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.retry_backoff_s = float(retry_backoff_s)
        self.concurrency = max(1, int(concurrency))

    def _post(self, prompt: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": self.max_new_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            payload = json.loads(response.read().decode("utf-8"))
        content = payload["choices"][0]["message"]["content"]
        return "" if content is None else str(content)

    def complete(self, prompt: str) -> str:
        """The judge's answer, or JudgeRequestError once the retries are spent."""
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            try:
                return self._post(prompt)
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:500]
                last_error = f"HTTP {error.code} {error.reason}: {detail}".strip()
                # Other client errors (bad model name, auth) will not change on a retry.
                if 400 <= error.code < 500 and error.code not in (408, 429):
                    break
            except (urllib.error.URLError, TimeoutError, OSError) as error:
                reason = getattr(error, "reason", error)
                last_error = f"request failed: {type(error).__name__}: {reason}"
            except (ValueError, KeyError, IndexError, TypeError) as error:
                last_error = f"unexpected response: {type(error).__name__}: {error}"
        raise JudgeRequestError(f"[judge error] {last_error} ({self.url})")

    def _grade_one(self, item: JudgeItem) -> tuple[int | None, str]:
        try:
            raw = self.complete(build_prompt(self.prompt_template, self.rubric, item))
        except JudgeRequestError as error:
            # The error text is not parsed: a digit in it ("retry in 3 s") is not a grade.
            return None, str(error)
        return parse_grade(raw), raw

    def grade(self, items: Sequence[JudgeItem]) -> tuple[list[int | None], list[str]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(self._grade_one, items))
        return [grade for grade, _ in results], [raw for _, raw in results]


def build_judge(judge_cfg: DictConfig | Mapping[str, Any] | None, cache_dir: str | Path) -> Judge:
    """The judge ``judge_cfg.kind`` names: ``local``, ``openai`` or ``none``."""
    if judge_cfg is None:
        return NoJudge()
    cfg = judge_cfg if isinstance(judge_cfg, DictConfig) else OmegaConf.create(dict(judge_cfg))
    kind = str(cfg.get("kind") or "none").lower()
    if kind == "none":
        return NoJudge()
    if kind not in ("local", "openai"):
        raise ValueError(f"judge.kind must be local, openai or none, got {kind!r}")
    common = {
        "rubric": str(cfg.rubric),
        "prompt_template": str(cfg.prompt_template),
        "max_new_tokens": int(cfg.get("max_new_tokens", 8)),
    }
    if kind == "local":
        if cfg.get("model") is None:
            raise ValueError("judge.kind=local needs judge.model (a model config)")
        return LocalJudge(
            cfg.model,
            cache_dir,
            batch_size=int(cfg.get("batch_size", 16)),
            device=str(cfg.get("device", "auto")),
            **common,
        )
    remote = cfg.get("openai")
    if remote is None:
        raise ValueError("judge.kind=openai needs a judge.openai block")
    options = OmegaConf.to_container(remote, resolve=True)
    assert isinstance(options, dict)
    return OpenAICompatibleJudge(**common, **{str(k): v for k, v in options.items()})
