"""The Likert judges: the grade parser, the local tiny-model judge, and the OpenAI-compatible
judge against a local HTTP stub (no request leaves 127.0.0.1)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import compose_train

from clintune.eval.judge import (
    JudgeItem,
    LocalJudge,
    NoJudge,
    OpenAICompatibleJudge,
    build_judge,
    build_prompt,
    check_template,
    parse_grade,
)

TEMPLATE = "{rubric}\nNote: {note}\nReference: {reference}\nSummary: {summary}\nGrade 1-5."
RUBRIC = "5 = perfect, 1 = useless."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4", 4),
        ("1", 1),
        ("5", 5),
        (" 3\n", 3),
        ("Score: 4", 4),
        ("score:2", 2),
        ("4/5", 4),
        ("4 / 5", 4),
        ("I would rate this 4 out of 5.", 4),
        ("**5**", 5),
        ("Rating: **3**/5", 3),
        ("On a scale of 1-5, I give it 2.", 2),
        ("4. The summary is accurate and concise.", 4),
        ("Score: 4. It scores 4 because the plan is there.", 4),  # one grade, said twice
        ("5/5", 5),
        ("3 or 4", None),
        ("3-4", None),
        ("4/5, maybe 3/5", None),
        ("10", None),
        ("10/10", None),
        ("0", None),
        ("-1", None),
        ("6", None),
        ("4.5", None),
        ("", None),
        ("   ", None),
        ("excellent", None),
        ("four", None),  # only digits are grades: words like "one" appear in ordinary prose
        ("The 55-year-old patient: 4", None),  # two numbers, no way to tell which is the grade
        ("T4 elevated", None),  # a number inside a word is not a grade
    ],
)
def test_parse_grade(text: str, expected: int | None) -> None:
    assert parse_grade(text) == expected


def test_template_fields_are_checked_and_filled_literally() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        check_template("{note} {sumary}")
    with pytest.raises(ValueError, match="must contain"):
        check_template("{note} only")
    item = JudgeItem(note="BP {high}", summary="s {x}", reference="r")
    prompt = build_prompt(TEMPLATE, " R \n", item)
    # Braces in the clinical text are data, not template fields.
    assert prompt == "R\nNote: BP {high}\nReference: r\nSummary: s {x}\nGrade 1-5."


def test_no_judge_and_unknown_kind() -> None:
    judge = build_judge({"kind": "none"}, ".")
    assert isinstance(judge, NoJudge)
    assert judge.grade([JudgeItem("n", "s", "r")] * 2) == ([None, None], ["", ""])
    assert isinstance(build_judge(None, "."), NoJudge)
    with pytest.raises(ValueError, match="local, openai or none"):
        build_judge({"kind": "gpt"}, ".")


def test_local_judge_on_the_tiny_model(cache_dir: Path) -> None:
    cfg = compose_train(["task=summarization"], cache_dir)
    judge = build_judge(cfg.task.judge, cache_dir)
    assert isinstance(judge, LocalJudge)
    examples = [
        ("CC: cough. HPI: 40F with cough x 3 days. Dx: bronchitis. Plan: fluids.", "40F, cough"),
        ("CC: chest pain. HPI: 60M. Dx: angina. Plan: start aspirin.", "60M with angina"),
        ("CC: rash. HPI: 22F. Dx: contact dermatitis. Plan: topical steroid.", "x"),
    ]
    items = [JudgeItem(note, summary, "reference summary") for note, summary in examples]
    grades, raw = judge.grade(items)
    assert len(grades) == len(raw) == len(items)
    assert all(grade is None or grade in range(1, 6) for grade in grades)
    assert all(isinstance(text, str) for text in raw)
    # The grades are exactly what the parser reads in the raw outputs: nothing is filled in.
    assert grades == [parse_grade(text) for text in raw]
    # The real test data fits the tiny judge's context, so no prompt lost its start.
    assert judge.truncated_prompts == 0
    judge.close()
    assert judge.model is None
    with pytest.raises(RuntimeError, match="closed"):
        judge.grade(items)


# --- the OpenAI-compatible judge, against a stub server ---------------------------------------


@dataclass
class Stub:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)


def _handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stub.requests.append(
                {"path": self.path, "headers": dict(self.headers.items()), "body": body}
            )
            prompt = body["messages"][0]["content"]
            if "FAIL500" in prompt:
                self._send(500, b"internal failure: retry in 3 seconds")
                return
            if "FAIL400" in prompt:
                self._send(400, b'{"error": "bad model"}')
                return
            if "SLOW" in prompt:
                time.sleep(1.0)
            answer = "Score: 4/5" if "GOOD" in prompt else "3 or 4"
            reply = {"choices": [{"message": {"role": "assistant", "content": answer}}]}
            self._send(200, json.dumps(reply).encode())

        def _send(self, status: int, payload: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (the timeout test)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def stub() -> Iterator[Stub]:
    stub = Stub(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
    server.daemon_threads = True
    stub.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield stub
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _remote(url: str, **overrides: Any) -> OpenAICompatibleJudge:
    options: dict[str, Any] = {
        "base_url": url,
        "model": "judge-model",
        "rubric": RUBRIC,
        "prompt_template": TEMPLATE,
        "api_key_env": "CLINTUNE_TEST_JUDGE_KEY",
        "allow_remote_text": True,
        "max_new_tokens": 8,
        "retry_backoff_s": 0.0,
    }
    options.update(overrides)
    return OpenAICompatibleJudge(**options)


def test_remote_judge_refuses_without_the_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINTUNE_TEST_JUDGE_KEY", "sekrit")
    with pytest.raises(ValueError, match="allow_remote_text"):
        _remote("http://127.0.0.1:9/v1", allow_remote_text=False)
    # The shipped config keeps it off too: switching the kind alone is not enough.
    judge_cfg = compose_train(
        ["task=summarization", "task.judge.kind=openai", "task.judge.openai.base_url=http://x"],
        Path("."),
    ).task.judge
    with pytest.raises(ValueError, match="clinical text leaves this machine"):
        build_judge(judge_cfg, ".")


def test_remote_judge_needs_its_key_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLINTUNE_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="CLINTUNE_TEST_JUDGE_KEY"):
        _remote("http://127.0.0.1:9/v1")


def test_remote_judge_grades_through_the_api(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINTUNE_TEST_JUDGE_KEY", "sekrit")
    judge = _remote(stub.url, concurrency=2)
    items = [JudgeItem("note", "GOOD one", "ref"), JudgeItem("note", "vague", "ref")]
    grades, raw = judge.grade(items)
    assert grades == [4, None]  # "3 or 4" is not a grade, and is not turned into one
    assert raw == ["Score: 4/5", "3 or 4"]
    assert len(stub.requests) == 2
    for request in stub.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == "Bearer sekrit"
        body = request["body"]
        assert body["temperature"] == 0
        assert body["max_tokens"] == 8
        assert body["model"] == "judge-model"
        assert body["messages"][0]["role"] == "user"
    prompts = sorted(request["body"]["messages"][0]["content"] for request in stub.requests)
    assert prompts[0] == build_prompt(TEMPLATE, RUBRIC, items[0])


def test_remote_judge_records_http_errors_and_retries(
    stub: Stub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLINTUNE_TEST_JUDGE_KEY", "sekrit")
    judge = _remote(stub.url, retries=2)
    items = [
        JudgeItem("note", "FAIL500", "ref"),
        JudgeItem("note", "GOOD", "ref"),
        JudgeItem("note", "FAIL400", "ref"),
    ]
    grades, raw = judge.grade(items)
    # The error body holds a digit ("retry in 3 seconds"); it must not become a grade.
    assert grades == [None, 4, None]
    assert "HTTP 500" in raw[0] and "internal failure" in raw[0]
    assert "HTTP 400" in raw[2] and "bad model" in raw[2]
    summaries = [
        r["body"]["messages"][0]["content"].rsplit("Summary: ", 1)[1] for r in stub.requests
    ]
    # A 500 is retried (1 + 2 attempts); a 400 will not change, so it is tried once.
    assert sum(s.startswith("FAIL500") for s in summaries) == 3
    assert sum(s.startswith("FAIL400") for s in summaries) == 1


def test_remote_judge_records_a_timeout(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINTUNE_TEST_JUDGE_KEY", "sekrit")
    judge = _remote(stub.url, timeout_s=0.2, retries=0)
    grades, raw = judge.grade([JudgeItem("note", "SLOW", "ref")])
    assert grades == [None]
    assert raw[0].startswith("[judge error]") and "timed out" in raw[0]


def test_remote_judge_without_a_key_sends_no_authorization(stub: Stub) -> None:
    judge = _remote(stub.url, api_key_env=None)
    assert judge.grade([JudgeItem("note", "GOOD", "ref")])[0] == [4]
    assert "Authorization" not in stub.requests[0]["headers"]
