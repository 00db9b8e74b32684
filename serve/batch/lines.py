"""A batch's input file, checked line by line before anything runs: every line must be a JSON object
with a unique `custom_id`, `method` POST, the batch's `url`, and a `body` that the endpoint accepts.
Any bad line fails the whole batch at `validating`, with errors naming the line numbers."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stages.errors import InvalidParameter

MAX_ERRORS = 100  # errors reported for one file; the rest are counted


@dataclass
class Checked:
    items: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # (line, custom_id, body)
    errors: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's batch errors: code, message, param, line
    error_lines: list[dict[str, Any]] = field(default_factory=list)  # the error file's lines
    more_errors: int = 0

    def error(self, line: int, code: str, message: str, param: str | None = None, custom_id: str | None = None):
        if len(self.errors) >= MAX_ERRORS:
            self.more_errors += 1
            return
        text = f"line {line}: {message}"
        self.errors.append({"code": code, "message": text, "param": param, "line": line})
        error = {"code": code, "message": text, "line": line}
        self.error_lines.append({"id": None, "custom_id": custom_id, "response": None, "error": error})


def check_lines(
    data: bytes, endpoint: str, check_body: Callable[[dict[str, Any]], None], max_lines: int, max_bytes: int
) -> Checked:
    """`check_body` raises InvalidParameter for a body the endpoint would refuse."""
    out = Checked()
    if len(data) > max_bytes:
        out.error(0, "too_large", f"the file has {len(data)} bytes; at most {max_bytes} (batch.max_batch_bytes)")
        return out
    lines = data.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()  # the final newline
    if len(lines) > max_lines:
        out.error(0, "too_many_lines", f"the file has {len(lines)} lines; at most {max_lines} (batch.max_lines)")
        return out
    if not lines:
        out.error(0, "empty_file", "the file has no requests")
        return out
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        try:
            line = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            out.error(number, "invalid_json_line", "not valid JSON")
            continue
        if not isinstance(line, dict):
            out.error(number, "invalid_json_line", "must be a JSON object")
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
            out.error(number, "invalid_request", "custom_id: must be a string of 1-512 characters", "custom_id")
            continue
        if custom_id in seen:
            out.error(number, "duplicate_custom_id", f"custom_id {custom_id!r} is also on line {seen[custom_id]}",
                      "custom_id", custom_id)  # fmt: skip
            continue
        seen[custom_id] = number
        if line.get("method") != "POST":
            message = f"method: must be POST, not {line.get('method')!r}"
            out.error(number, "invalid_method", message, "method", custom_id)
            continue
        if line.get("url") != endpoint:
            message = f"url: must be the batch's endpoint {endpoint}, not {line.get('url')!r}"
            out.error(number, "invalid_url", message, "url", custom_id)
            continue
        body = line.get("body")
        if not isinstance(body, dict):
            out.error(number, "invalid_request", "body: must be a JSON object", "body", custom_id)
            continue
        if body.get("stream"):
            out.error(number, "invalid_request", "body.stream: a batch request cannot stream", "body.stream", custom_id)
            continue
        try:
            check_body(body)
        except InvalidParameter as err:
            out.error(number, "invalid_request", f"body.{err.param}: {err.message}", f"body.{err.param}", custom_id)
            continue
        out.items.append((number, custom_id, body))
    return out
