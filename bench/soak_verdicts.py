"""How the soak (bench/soak.py) judges one request from what the client saw: completed,
failed (a clear error), lost (no complete answer) or malformed (a wrong one); the rules are
bench/soak.py's docstring."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["completed", "failed", "lost", "malformed"]
KINDS: tuple[Kind, ...] = ("completed", "failed", "lost", "malformed")


@dataclass
class Outcome:
    index: int
    stream: bool
    prompt_tokens: int
    max_tokens: int
    sent_s: float  # seconds after the load began
    sent_wall: str  # local time of the send, to find it in the logs
    kind: Kind = "lost"
    reason: str = "not finished"
    request_id: str | None = None
    ttft_s: float | None = None  # streams: send to the first text
    e2e_s: float | None = None  # send to the final chunk (or the whole body)
    completion_tokens: int | None = None
    text_chunks: int = 0
    migrations: int = 0
    attempts: int = 0
    decode_worker: str | None = None


def _completion_problem(choice: dict[str, Any], usage: Any, max_tokens: int) -> str | None:
    """Why a final answer is not a complete one (EOS ignored, no stop: every
    request must end by length with exactly max_tokens tokens)."""
    if choice.get("finish_reason") != "length":
        return f"finish_reason {choice.get('finish_reason')!r}, expected 'length'"
    if not isinstance(usage, dict) or "completion_tokens" not in usage:
        return "no usage"
    if usage["completion_tokens"] != max_tokens:
        return f"{usage['completion_tokens']} completion tokens, expected {max_tokens}"
    return None


def _error_message(body: Any) -> str | None:
    """The message of an OpenAI-style error body, or None if it is not one."""
    if not isinstance(body, dict) or "error" not in body:
        return None
    err = body["error"]
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


def _timings(out: Outcome, event: dict[str, Any]) -> None:
    t = event.get("splitserve_timings")
    if isinstance(t, dict):
        out.migrations = int(t.get("migrations", 0) or 0)
        out.attempts = int(t.get("attempts", 0) or 0)
        out.decode_worker = t.get("decode_worker")


class StreamJudge:
    """Reads one server-sent-event response, line by line, and says how it
    ended (see bench/soak.py's docstring for the rules)."""

    def __init__(self, out: Outcome) -> None:
        self.out = out
        self.done = False  # [DONE] seen
        self.final: dict[str, Any] | None = None  # the chunk with finish_reason
        self.usage: Any = None
        self.error: str | None = None
        self.problem: str | None = None  # the first thing wrong with the stream

    def _flag(self, problem: str) -> None:
        self.problem = self.problem or problem

    def feed(self, line: str) -> bool:
        """One line of the body; True when it carried text."""
        if not line or line.startswith(":"):  # event separators and SSE comments
            return False
        if self.done:
            self._flag(f"data after [DONE]: {line[:80]!r}")
            return False
        if not line.startswith("data: "):
            self._flag(f"not an SSE data line: {line[:80]!r}")
            return False
        payload = line[6:]
        if payload == "[DONE]":
            self.done = True
            return False
        try:
            event = json.loads(payload)
        except ValueError:
            self._flag(f"unparsable event: {payload[:80]!r}")
            return False
        message = _error_message(event)
        if message is not None:
            self.error = message
            return False
        if not isinstance(event, dict):
            self._flag(f"event is not an object: {payload[:80]!r}")
            return False
        if self.error is not None:
            self._flag("an event after the error event")
        self.out.request_id = self.out.request_id or event.get("id")
        if event.get("usage"):
            self.usage = event["usage"]
        text = False
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            text = text or bool(choice.get("text") or delta.get("content"))
            if choice.get("finish_reason") is not None:
                if self.final is not None:
                    self._flag("two final chunks")
                self.final = choice
                _timings(self.out, event)
        return text

    def verdict(self, broken: str | None = None) -> tuple[Kind, str]:
        """How the stream ended; `broken`: the connection error that ended it early."""
        if self.error is not None:
            if self.done and self.problem is None:
                return "failed", f"error event: {self.error}"
            why = self.problem or (broken and f"then {broken}") or "no [DONE]"
            return "malformed", f"error event ({self.error}) but {why}"
        if self.problem is not None:
            return "malformed", self.problem
        if self.final is None or not self.done:
            if broken:
                return "lost", broken
            what = "a final chunk" if self.final is None else "[DONE]"
            return "lost", f"stream ended without {what} or an error event"
        problem = _completion_problem(self.final, self.usage, self.out.max_tokens)
        self.out.completion_tokens = (self.usage or {}).get("completion_tokens")
        if problem is not None:
            return "malformed", problem
        return "completed", "ok"


def judge_body(out: Outcome, status: int, body: bytes) -> tuple[Kind, str]:
    """How a non-streaming answer ended."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if status >= 400:
        message = _error_message(data)
        if message is None:
            return "malformed", f"HTTP {status} without a JSON error body: {body[:80]!r}"
        return "failed", f"HTTP {status}: {message}"
    if not isinstance(data, dict):
        return "lost", f"HTTP {status} without a JSON body: {body[:80]!r}"
    out.request_id = data.get("id")
    choices = data.get("choices") or []
    if status != 200 or len(choices) != 1:
        return "malformed", f"HTTP {status} with {len(choices)} choices"
    _timings(out, data)
    out.completion_tokens = (data.get("usage") or {}).get("completion_tokens")
    problem = _completion_problem(choices[0], data.get("usage"), out.max_tokens)
    return ("malformed", problem) if problem else ("completed", "ok")


def group_reason(reason: str) -> str:
    """The reason with addresses, ids and numbers (but an HTTP status) blanked,
    so alike ones group."""
    reason = re.sub(r"\b\d{1,3}(\.\d{1,3}){3}:\d+\b", "ADDR", reason)
    reason = re.sub(r"\b(cmpl|chatcmpl)-[0-9a-f]+\b|\b[0-9a-f]{16,}\b", "ID", reason)
    return re.sub(r"(?<!HTTP )\b\d+(\.\d+)?", "N", reason)[:200]  # the status stays
