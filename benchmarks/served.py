"""What the served benchmarks share: the application from a config file with the preset's checkpoints,
a throwaway database and store, and tenants with keys; and how a run's figures are printed and kept."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from serve import local_cluster
from serve.config import ServeConfig, parse_config
from serve.tenancy.store import TenantStore

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def served_with_tenants(
    preset: str, config_path: Path, tenants: dict[str, str], progress=print
) -> Iterator[tuple[ServeConfig, str, dict[str, str]]]:
    """The service (config, base URL) and a key for each tenant (name -> priority class)."""
    data = yaml.safe_load(config_path.read_text())
    tmp = Path(tempfile.mkdtemp(prefix="ifserve-bench-"))
    data["model"] = {**data["model"], "checkpoints": str(ROOT / "out" / "checkpoints" / preset), "preset": preset}
    data["tenancy"] = {"database": f"sqlite:///{tmp / 'app.db'}"}
    data["storage"] = {"url": str(tmp / "store")}
    config = parse_config(data)
    keys = {}
    with TenantStore(config.tenancy.database) as store:
        for name, priority in tenants.items():
            store.create_tenant(name, priority=priority)
            keys[name] = store.create_key(name)[1]
    progress(f"starting the service ({config_path.name}, {preset}) ...")
    url = local_cluster.start(config, progress=lambda line: None)
    try:
        yield config, url, keys
    finally:
        local_cluster.stop()


def config_name(config_path: Path) -> str:
    return str(config_path.relative_to(ROOT) if config_path.is_relative_to(ROOT) else config_path)


def report(results: dict[str, Any], module: str, argv: list[str] | None, json_path: Path | None,
           render: Callable[[dict[str, Any]], str]) -> None:  # fmt: skip
    """Print the run (with the command that made it) and keep every figure as JSON."""
    results["command"] = f"python -m benchmarks.{module} " + " ".join(sys.argv[1:] if argv is None else argv)
    print(render(results))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
