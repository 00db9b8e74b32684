"""`ifserve batch`: OpenAI's Batch API from the command line, through the official `openai` client (so
it works against any server of the same API).

    ifserve batch submit FILE.jsonl [--endpoint /v1/images/edits] [--metadata KEY=VALUE ...] [--wait]
        (prints the batch id last)
    ifserve batch status ID [--wait]
    ifserve batch results ID --out DIR      (PNG files named by custom_id; failures in DIR/errors.jsonl)
    ifserve batch cancel ID
        (--url http://127.0.0.1:8000 or $IFSERVE_URL; --api-key or $IFSERVE_API_KEY)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
from pathlib import Path

ENDPOINTS = ("/v1/images/generations", "/v1/images/edits")
ENDED = ("completed", "failed", "cancelled", "expired")


def add_parsers(sub) -> None:
    batch = sub.add_parser("batch", help="submit, follow, fetch and cancel batch jobs (OpenAI's Batch API)")
    actions = batch.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="upload a JSONL file of image requests and start a batch")
    submit.add_argument("file", type=Path, help="one request per line: {custom_id, method, url, body}")
    submit.add_argument("--endpoint", choices=ENDPOINTS, default=ENDPOINTS[0],
                        help="the endpoint every line calls (its `url`)")  # fmt: skip
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--wait", action="store_true", help="follow it with a progress bar until it ends")
    status = actions.add_parser("status", help="a batch's status and counts")
    status.add_argument("batch_id")
    status.add_argument("--wait", action="store_true", help="follow it with a progress bar until it ends")
    results = actions.add_parser("results", help="write a finished batch's images as PNG files named by custom_id")
    results.add_argument("batch_id")
    results.add_argument("--out", type=Path, required=True)
    cancel = actions.add_parser("cancel", help="cancel a batch: what is done is kept, the rest never runs")
    cancel.add_argument("batch_id")
    for parser in (submit, status, results, cancel):
        parser.add_argument("--url", default=os.environ.get("IFSERVE_URL", "http://127.0.0.1:8000"))
        parser.add_argument("--api-key", default=os.environ.get("IFSERVE_API_KEY"))


def _client(args):
    import openai

    return openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key or "none", max_retries=3)


def _describe(batch) -> str:
    counts = batch.request_counts
    done = f"{counts.completed} completed, {counts.failed} failed of {counts.total}" if counts else "no counts yet"
    return f"{batch.id}  {batch.status}  ({done})"


def _follow(client, batch_id: str, poll_s: float = 1.0):
    """A progress bar over the batch's requests until it ends; the ended batch."""
    from tqdm import tqdm

    with tqdm(desc=batch_id, unit="req", file=sys.stderr) as bar:
        while True:
            batch = client.batches.retrieve(batch_id)
            counts = batch.request_counts
            if counts and counts.total:
                bar.total = counts.total
                bar.n = counts.completed + counts.failed
            bar.set_postfix_str(batch.status)
            bar.refresh()
            if batch.status in ENDED:
                return batch
            time.sleep(poll_s)


def _metadata(pairs: list[str]) -> dict[str, str] | None:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            from stages.errors import InvalidParameter

            raise InvalidParameter("--metadata", f"{pair!r} is not KEY=VALUE")
        out[key] = value
    return out or None


def _file_name(custom_id: str, index: int, count: int, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", custom_id).strip(".") or "image"
    name = f"{stem}-{index}.png" if count > 1 else f"{stem}.png"
    while name in taken:  # two custom_ids that differ only in characters a file name cannot hold
        name = "_" + name
    taken.add(name)
    return name


def _results(client, batch, out: Path) -> tuple[int, int]:
    """Images written and failed lines."""
    import httpx

    out.mkdir(parents=True, exist_ok=True)
    written, taken = 0, set()
    if batch.output_file_id:
        for raw in client.files.content(batch.output_file_id).text.splitlines():
            line = json.loads(raw)
            data = line["response"]["body"]["data"]
            for index, item in enumerate(data):
                name = _file_name(line["custom_id"], index, len(data), taken)
                picture = (
                    base64.b64decode(item["b64_json"]) if "b64_json" in item
                    else httpx.get(item["url"], timeout=60).raise_for_status().content
                )  # fmt: skip
                tmp = out / f".{name}.tmp"
                tmp.write_bytes(picture)
                tmp.replace(out / name)
                written += 1
    failed = 0
    if batch.error_file_id:
        errors = client.files.content(batch.error_file_id).content
        (out / "errors.jsonl").write_bytes(errors)
        failed = len(errors.splitlines())
    return written, failed


def batch(args: argparse.Namespace) -> int:
    import openai

    client = _client(args)
    try:
        if args.action == "submit":
            if not args.file.is_file():
                from stages.errors import InvalidParameter

                raise InvalidParameter("FILE", f"no file {args.file}")
            metadata = _metadata(args.metadata)
            with args.file.open("rb") as handle:
                source = client.files.create(file=(args.file.name, handle), purpose="batch")
            created = client.batches.create(
                input_file_id=source.id, endpoint=args.endpoint, completion_window="24h", metadata=metadata
            )
            print(f"uploaded {args.file} as {source.id}; created {created.id}", file=sys.stderr)
            if args.wait:
                print(_describe(_follow(client, created.id)), file=sys.stderr)
            print(created.id)  # the last line, for scripts
        elif args.action == "status":
            found = _follow(client, args.batch_id) if args.wait else client.batches.retrieve(args.batch_id)
            print(_describe(found))
            for error in (found.errors.data if found.errors else None) or []:
                print(f"  {error.code}: {error.message}")
        elif args.action == "results":
            found = client.batches.retrieve(args.batch_id)
            if found.status not in ENDED:
                print(f"ifserve batch results: {_describe(found)}: not ended yet (`status --wait`)", file=sys.stderr)
                return 1
            written, failed = _results(client, found, args.out)
            print(f"wrote {written} images to {args.out}" + (f"; {failed} failed (errors.jsonl)" if failed else ""))
        else:
            print(_describe(client.batches.cancel(args.batch_id)))
        return 0
    except openai.APIStatusError as err:
        body = err.body if isinstance(err.body, dict) else {}
        message = body.get("message") or err.message
        print(f"ifserve batch {args.action}: error {err.status_code}: {message}", file=sys.stderr)
        return 1
    except openai.APIConnectionError:
        print(f"ifserve batch {args.action}: error: cannot reach {args.url} (`ifserve up`?)", file=sys.stderr)
        return 1
