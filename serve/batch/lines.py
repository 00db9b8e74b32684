"""A batch's input file, checked line by line before anything runs: every line must be a JSON object
with a unique `custom_id`, `method` POST, the batch's `url`, and a `body` that the endpoint accepts, and
hold only text that can be stored and encoded (no NUL, no lone surrogate: `serve/openai_api.py`). Any
bad line fails the whole batch at `validating`, with errors naming the line numbers.

The file is read a line at a time, twice: once to check it (`check_lines`), once to queue its items
(`items`), so memory holds one line (at most `max_line_bytes`) and a digest per custom_id, never the file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from serve.openai_api import shown, unsafe_text
from stages.errors import InvalidParameter

MAX_ERRORS = 100  # errors reported for one file; the rest are counted
_SKIP_CHUNK = 1 << 20


@dataclass
class Checked:
    lines: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's batch errors: code, message, param, line
    error_lines: list[dict[str, Any]] = field(default_factory=list)  # the error file's lines
    more_errors: int = 0

    def error(self, line: int, code: str, message: str, param: str | None = None, custom_id: str | None = None):
        if len(self.errors) >= MAX_ERRORS:
            self.more_errors += 1
            return
        text = f"line {line}: {message}"[:1000]  # kept in the database: a client's long value is cut short
        param = None if param is None else param[:200]
        self.errors.append({"code": code, "message": text, "param": param, "line": line})
        error = {"code": code, "message": text, "line": line}
        self.error_lines.append({"id": None, "custom_id": custom_id, "response": None, "error": error})

    def only(self, code: str, message: str) -> Checked:
        """The file fails for this one reason (its size, its count of lines), whatever its lines hold."""
        self.errors, self.error_lines, self.more_errors = [], [], 0
        self.error(0, code, message)
        return self


def _raw_lines(source: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(number, line) from 1; None for a line longer than `max_line_bytes`, which is skipped unread."""
    number = 0
    while raw := source.readline(max_line_bytes + 1):
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while (rest := source.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        yield number, raw


def check_lines(
    source: BinaryIO,
    size: int,
    endpoint: str,
    check_body: Callable[[dict[str, Any]], None],
    max_lines: int,
    max_bytes: int,
    max_line_bytes: int,
) -> Checked:
    """`source`: the file, `size` bytes; `check_body` raises InvalidParameter for a body the endpoint
    would refuse."""
    out = Checked()
    if size > max_bytes:
        return out.only("too_large", f"the file has {size} bytes; at most {max_bytes} (batch.max_batch_bytes)")
    seen: dict[bytes, int] = {}  # digest of each custom_id -> its line
    for number, raw in _raw_lines(source, max_line_bytes):
        out.lines = number
        if number > max_lines:
            return out.only("too_many_lines", f"the file has more than {max_lines} lines (batch.max_lines)")
        if raw is None:
            out.error(number, "line_too_long", f"longer than {max_line_bytes} bytes")
            continue
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
        bad = unsafe_text(line)
        if bad is not None:
            named = custom_id if bad != "custom_id" else None
            out.error(number, "invalid_request", f"{bad}: must be text without NUL characters or lone surrogates",
                      bad, named)  # fmt: skip
            continue
        digest = hashlib.sha256(custom_id.encode()).digest()
        if digest in seen:
            out.error(number, "duplicate_custom_id", f"custom_id {shown(custom_id)!r} is also on line {seen[digest]}",
                      "custom_id", custom_id)  # fmt: skip
            continue
        seen[digest] = number
        if line.get("method") != "POST":
            message = f"method: must be POST, not {shown(str(line.get('method')))!r}"
            out.error(number, "invalid_method", message, "method", custom_id)
            continue
        if line.get("url") != endpoint:
            message = f"url: must be the batch's endpoint {endpoint}, not {shown(str(line.get('url')))!r}"
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
    if out.lines == 0:
        out.error(0, "empty_file", "the file has no requests")
    return out


def unstorable_line(source: BinaryIO, max_line_bytes: int) -> str | None:
    """What the upload of a batch file checks, a line at a time: that no line holds text nothing could store
    (a NUL, a lone surrogate); the first such line and field, or None. The rest waits for `check_lines`."""
    for number, raw in _raw_lines(source, max_line_bytes):
        try:
            line = json.loads(raw) if raw is not None else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        bad = unsafe_text(line) if line is not None else None
        if bad is not None:
            return f"line {number}: {bad}: must be text without NUL characters or lone surrogates"
    return None


def items(source: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line, custom_id, body) of a file that `check_lines` passed, a line at a time."""
    for number, raw in _raw_lines(source, max_line_bytes):
        line = json.loads(raw)
        yield number, line["custom_id"], line["body"]
