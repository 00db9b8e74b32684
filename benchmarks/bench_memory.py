"""Memory against the size of a batch, an output and an upload, on the served application (deploy/local.yaml,
the tiny preset), in one run. Nothing in it generates an image: what is measured is what the Batch API's
plumbing holds.

    1. for each N in --sizes: a batch of N lines whose results (--result-mib each) are already written, as
       the runner leaves them, is finalized by the BatchRunner (output file written), then its output is
       downloaded over HTTP through the ingress;
    2. a --upload-mib file is uploaded to POST /v1/files (streamed by the client).

`--plain-proxy` runs the same without serve/proxy_files.py in Serve's proxy, to show what Ray's proxy
alone makes of large bodies (it has no backpressure: README, "Large bodies").

For each phase it resets the peak RSS (Linux: /proc/PID/clear_refs) of the runner, the ingress and Serve's
HTTP proxy (all on the head), then reads how far above its RSS at the start each one's peak went. It prints,
never asserting:

    runner_finalize_growth_mib     peak growth of the runner finalizing N=largest over N=smallest (target < 64)
    ingress_download_growth_mib    ... of the ingress serving those downloads                      (target < 64)
    ingress_upload_peak_mib        the ingress's peak above its start during the upload            (target < 32)
    proxy_*                        Serve's proxy, the same ways (Ray's, not ours: reported, no target)

    python -m benchmarks.bench_memory --json benchmarks/results/memory-tiny.json
    python -m benchmarks.bench_memory --plain-proxy --sizes 10,100 \
        --json benchmarks/results/memory-tiny-plain-proxy.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve

from benchmarks.served import ROOT, config_name, report, served_with_tenants
from serve.app import APP_NAME
from serve.batch.store import BatchStore, json_line, result_key
from serve.batch.tables import IN_PROGRESS, SUCCEEDED, BatchRow, ItemRow
from serve.blob_store import BlobStore
from serve.database import Database
from serve.proxy_files import ENV

ENDPOINT = "/v1/images/generations"
MIB = 1 << 20


def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


class Peak:
    """A process's peak RSS above its RSS when the phase started."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self) -> Peak:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
        self.start = _status(self.pid)["VmRSS"]
        return self

    def __exit__(self, *_) -> None:
        self.growth_mib = (_status(self.pid)["VmHWM"] - self.start) / MIB


def _pids() -> dict[str, int]:
    runner = serve.get_deployment_handle("BatchRunner", app_name=APP_NAME).stats.remote().result()["pid"]
    ingress = serve.get_deployment_handle("Ingress", app_name=APP_NAME).stats.remote().result()["pid"]
    processes = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    (proxy,) = [int(p.name) for p in processes if _title(p).startswith("ray::ProxyActor")]
    return {"runner": runner, "ingress": ingress, "proxy": proxy}


def _title(process: Path) -> str:
    try:
        return (process / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:  # gone meanwhile
        return ""


def _finished_batch(store: BatchStore, tenant_id: str, lines: int, result_bytes: int) -> str:
    """A batch whose `lines` results are written and its items done: what the runner finalizes next."""
    payload = "x" * result_bytes
    now = datetime.now(UTC)
    batch = BatchRow(id=f"batch_mem{lines}_{int(time.time())}", tenant_id=tenant_id, endpoint=ENDPOINT,
                     input_file_id="file-none", completion_window="24h", status=IN_PROGRESS, created_at=now,
                     expires_at=now + timedelta(hours=24), in_progress_at=now)  # fmt: skip
    for line in range(1, lines + 1):
        body = {"data": [{"b64_json": payload, "seed": line}]}
        result = {"id": f"batch_req_{line}", "custom_id": f"line-{line}", "error": None,
                  "response": {"status_code": 200, "request_id": f"r{line}", "body": body}}  # fmt: skip
        store.blobs.write(result_key(batch.id, line), json_line(result))
    with store._session.begin() as session:  # the batch and its items at once, or the runner ends it empty
        session.add(batch)
        session.flush()
        session.add_all(ItemRow(batch_id=batch.id, line=n, custom_id=f"line-{n}", tenant_id=tenant_id, body={},
                                state=SUCCEEDED, attempts=1, status_code=200) for n in range(1, lines + 1))  # fmt: skip
    return batch.id


def run(sizes: list[int], result_mib: float, upload_mib: int, plain_proxy: bool = False, progress=print
        ) -> dict[str, Any]:  # fmt: skip
    config_path = ROOT / "deploy" / "local.yaml"
    if plain_proxy:  # Serve's proxy without serve/proxy_files.py: what it costs without (set before Ray starts)
        os.environ[ENV] = ""
    with served_with_tenants("tiny", config_path, {"owner": "batch"}, progress) as (config, url, keys):
        headers = {"Authorization": f"Bearer {keys['owner']}"}
        database = Database(config.tenancy.database)
        store = BatchStore(database, BlobStore(config.storage.url))
        tenant_id = next(t.id for t in _tenants(database) if t.name == "owner")
        runner = serve.get_deployment_handle("BatchRunner", app_name=APP_NAME)
        pids = _pids()
        phases: dict[str, Any] = {}
        for n in sizes:
            progress(f"N = {n}: writing {n} results of {result_mib:g} MiB ...")
            batch_id = _finished_batch(store, tenant_id, n, int(result_mib * MIB))
            with Peak(pids["runner"]) as finalizing:
                runner.wake.remote().result()
                output = _wait_output(url, headers, batch_id)
            progress(f"N = {n}: downloading the {output['bytes'] / MIB:.0f} MiB output ...")
            with Peak(pids["ingress"]) as ingress, Peak(pids["proxy"]) as proxy:
                downloaded = 0
                with httpx.stream("GET", f"{url}/v1/files/{output['id']}/content", headers=headers,
                                  timeout=600) as response:  # fmt: skip
                    response.raise_for_status()
                    for chunk in response.iter_bytes():
                        downloaded += len(chunk)
            assert downloaded == output["bytes"], (downloaded, output["bytes"])
            phases[str(n)] = {"output_mib": output["bytes"] / MIB, "runner_peak_mib": finalizing.growth_mib,
                              "ingress_peak_mib": ingress.growth_mib, "proxy_peak_mib": proxy.growth_mib}  # fmt: skip
            store.delete_file(tenant_id, output["id"])
        progress(f"uploading {upload_mib} MiB ...")
        line = json_line({"custom_id": "x", "method": "POST", "url": ENDPOINT, "body": {"prompt": "a" * 1000}})

        def body():
            yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
            chunk = line * (MIB // len(line))
            for _ in range(upload_mib):
                yield chunk
            yield b"\r\n--b--\r\n"

        with Peak(pids["ingress"]) as ingress, Peak(pids["proxy"]) as proxy:
            response = httpx.post(f"{url}/v1/files", content=body(), timeout=600,
                                  headers={**headers, "Content-Type": "multipart/form-data; boundary=b"})  # fmt: skip
        response.raise_for_status()
        upload = {"file_mib": response.json()["bytes"] / MIB, "ingress_peak_mib": ingress.growth_mib,
                  "proxy_peak_mib": proxy.growth_mib}  # fmt: skip
    small, large = phases[str(sizes[0])], phases[str(sizes[-1])]
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": _machine(),
        "config": config_name(config_path),
        "proxy_middleware": not plain_proxy,
        "sizes": sizes,
        "result_mib": result_mib,
        "phases": phases,
        "upload": upload,
        "runner_finalize_growth_mib": large["runner_peak_mib"] - small["runner_peak_mib"],
        "ingress_download_growth_mib": large["ingress_peak_mib"] - small["ingress_peak_mib"],
        "proxy_download_growth_mib": large["proxy_peak_mib"] - small["proxy_peak_mib"],
        "ingress_upload_peak_mib": upload["ingress_peak_mib"],
        "proxy_upload_peak_mib": upload["proxy_peak_mib"],
    }


def _tenants(database: Database):
    from serve.tenancy.store import TenantStore

    return TenantStore(database).tenants()


def _wait_output(url: str, headers: dict, batch_id: str, timeout_s: float = 1800) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = httpx.get(f"{url}/v1/batches/{batch_id}", headers=headers, timeout=60).json()
        if batch.get("status") in ("completed", "failed", "cancelled", "expired"):
            found = httpx.get(f"{url}/v1/files/{batch['output_file_id']}", headers=headers, timeout=60)
            if batch["status"] != "completed" or found.status_code != 200:
                raise RuntimeError(f"batch {batch_id} ended {batch['status']}: {batch}; its output: {found.text}")
            return found.json()
        time.sleep(0.5)
    raise TimeoutError(f"batch {batch_id} was not finalized in {timeout_s:.0f} s")


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, ray {ray.__version__}"


def render(results: dict[str, Any]) -> str:
    rows = [f"{n:>6}  {p['output_mib']:>9.0f}  {p['runner_peak_mib']:>10.1f}  {p['ingress_peak_mib']:>11.1f}  "
            f"{p['proxy_peak_mib']:>9.1f}" for n, p in results["phases"].items()]  # fmt: skip
    upload = results["upload"]
    lines = [
        f"{results['machine']}; {results['config']}; results of {results['result_mib']:g} MiB; "
        f"proxy middleware {'on' if results['proxy_middleware'] else 'OFF (--plain-proxy)'}",
        "     N  output MiB  runner MiB  ingress MiB  proxy MiB   (peak RSS above the phase's start)",
        *rows,
        f"upload of {upload['file_mib']:.0f} MiB: ingress +{upload['ingress_peak_mib']:.1f} MiB, "
        f"proxy +{upload['proxy_peak_mib']:.1f} MiB",
        "",
    ]
    targets = [("runner_finalize_growth_mib", 64), ("ingress_download_growth_mib", 64), ("ingress_upload_peak_mib", 32)]
    for name, target in targets:
        value = results[name]
        lines.append(f"{name:<30} {value:8.1f}   target < {target}: {'met' if value < target else 'MISSED'}")
    for name in ("proxy_download_growth_mib", "proxy_upload_peak_mib"):
        lines.append(f"{name:<30} {results[name]:8.1f}   (Ray Serve's proxy: reported)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="batch sizes N, comma-separated, smallest first")
    parser.add_argument("--result-mib", type=float, default=1.0, help="each result line's size")
    parser.add_argument("--upload-mib", type=int, default=100)
    parser.add_argument(
        "--plain-proxy",
        action="store_true",
        help="without serve/proxy_files.py in Serve's proxy: the memory Ray's proxy alone costs",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sizes = sorted(int(n) for n in args.sizes.split(","))
    results = run(sizes, args.result_mib, args.upload_mib, args.plain_proxy)
    report(results, "bench_memory", argv, args.json, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
