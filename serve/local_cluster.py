"""Start (and stop) a local Ray with the config's pools declared as logical resources, and run the
application on it. Used by `ifserve up`, `ifserve demo` and the tests."""

from __future__ import annotations

import os
import time
import urllib.request

import ray
from ray import serve

from serve.app import APP_NAME, PROXY_LOCATION, build_app, ensure_checkpoints
from serve.config import ServeConfig
from serve.proxy_files import CALLBACK, ENV


def start(config: ServeConfig, *, progress=print, metrics_port: int | None = None, wait: bool = True) -> str:
    """Start Ray and Serve, deploy, wait until every stage has a replica (`wait`); returns the base URL."""
    config.check_can_serve()
    ensure_checkpoints(config, progress)
    cluster = config.cluster
    # Serve's proxy spools uploads to disk and sends downloads from the store (serve/proxy_files.py); its
    # process inherits the environment of the Ray started here.
    os.environ.setdefault(ENV, CALLBACK)
    if not ray.is_initialized():
        ray.init(
            num_cpus=cluster.num_cpus,
            num_gpus=cluster.num_gpus,
            resources=dict(cluster.resources),
            # The dashboard process writes Prometheus' service-discovery file; only needed for metrics.
            include_dashboard=metrics_port is not None,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            _metrics_export_port=metrics_port,
        )
    serve.start(proxy_location=PROXY_LOCATION, http_options=config.http_options())
    progress("deploying (loading every stage's checkpoint) ...")
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    url = f"http://{_display_host(config.http.host)}:{config.http.port}"
    if wait:
        wait_ready(url, timeout_s=300)
    return url


SERVICE_DISCOVERY_FILE = "/tmp/ray/prom_metrics_service_discovery.json"  # Ray keeps it current per session


def stop() -> None:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def drain(config: ServeConfig, progress=print) -> int:
    """Refuse new requests (503 + Retry-After) and wait, at most the ingress's drain bound, for those in
    flight to finish; returns how many were still in flight at the end (0: none lost)."""
    limits = serve.get_deployment_handle("TenantLimits", app_name=APP_NAME)
    left = limits.drain.remote().result()
    deadline = time.monotonic() + config.ingress_drain_s()
    while left and time.monotonic() < deadline:
        progress(f"draining: {left} request(s) in flight ...")
        time.sleep(1.0)
        left = limits.in_flight.remote().result()["requests"]
    time.sleep(1.0)  # the last answers leave the proxy
    return left


def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except Exception as err:  # noqa: BLE001 - not up yet
            last = str(err)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz did not become ready in {timeout_s:.0f} s ({last})")


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host
