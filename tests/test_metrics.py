"""Metrics under real traffic: Ray's metrics endpoint shows exactly the images, task-steps and requests
served; a real Prometheus (Debian's package) scrapes the live deployment through Ray's
service-discovery file, and every recording rule and every dashboard panel query returns data."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from serve import local_cluster
from tests.serving import ROOT, fast_metrics_export, free_port, serving_config, wait_for

pytestmark = pytest.mark.serve

MONITORING = ROOT / "monitoring"
# (body, images per stage, task-steps per stage): three requests, four images.
TRAFFIC = [
    (
        {
            "prompt": "a lighthouse",
            "seed": 1,
            "size": "1024x1024",
            "stage1_steps": 4,
            "stage2_steps": 2,
            "stage3_steps": 2,
        },
        {"stage1": 1, "stage2": 1, "stage3": 1},
        {"stage1": 4, "stage2": 2, "stage3": 2},
    ),
    (
        {"prompt": "two boats", "seed": 2, "n": 2, "size": "256x256", "stage1_steps": 5, "stage2_steps": 3},
        {"stage1": 2, "stage2": 2},
        {"stage1": 10, "stage2": 6},
    ),
    ({"prompt": "a kite", "seed": 3, "size": "64x64", "stage1_steps": 6}, {"stage1": 1}, {"stage1": 6}),
]


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `apt-get install prometheus` (.ci/run installs it)")
    return path


@pytest.fixture(scope="module")
def served(tiny_checkpoints, tmp_path_factory):
    with fast_metrics_export():
        metrics_port = free_port()
        config = serving_config(tiny_checkpoints, tmp_path_factory.mktemp("serve-metrics"))
        url = local_cluster.start(config, progress=lambda *_: None, metrics_port=metrics_port)
        yield url, metrics_port
        local_cluster.stop()


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    """A real Prometheus on loopback with our config, scraping every second."""
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(MONITORING / f) for f in config["rule_files"]]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            _binary("prometheus"),
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ok(f"{base}/-/ready"), 60, what="Prometheus to start")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def scrape(metrics_port: int) -> dict[tuple[str, str], float]:
    """Ray's endpoint, summed over replicas: (sample name, stage or endpoint/status) -> value."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("ray_ifserve_") or "le" in sample.labels:
                continue
            labels = sample.labels
            key = labels.get("stage") or f"{labels.get('endpoint')} {labels.get('status')}"
            totals[(sample.name, key)] += sample.value
    return totals


@pytest.fixture(scope="module")
def traffic(served, prometheus):
    url, metrics_port = served
    wait_for(lambda: _targets_up(prometheus), 60, what="Prometheus to scrape Ray")
    before = scrape(metrics_port)
    with ThreadPoolExecutor(len(TRAFFIC)) as pool:
        responses = list(
            pool.map(lambda t: httpx.post(f"{url}/v1/images/generations", json=t[0], timeout=600), TRAFFIC)
        )
    assert [r.status_code for r in responses] == [200] * len(TRAFFIC)
    return before


def _targets_up(prometheus: str) -> bool:
    result = httpx.get(f"{prometheus}/api/v1/query", params={"query": 'up{job="ray"} == 1'}, timeout=10).json()
    return bool(result["data"]["result"])


def test_promtool_accepts_the_config_and_rules():
    promtool = _binary("promtool")
    config = subprocess.run(
        [promtool, "check", "config", str(MONITORING / "prometheus.yml")], capture_output=True, text=True
    )
    assert config.returncode == 0, config.stdout + config.stderr
    rules = subprocess.run(
        [promtool, "check", "rules", *map(str, sorted((MONITORING / "rules").glob("*.yml")))],
        capture_output=True,
        text=True,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_counters_match_the_traffic_exactly(served, traffic):
    _, metrics_port = served
    before = traffic
    images, task_steps = defaultdict(int), defaultdict(int)
    for _, stage_images, stage_steps in TRAFFIC:
        for stage, count in stage_images.items():
            images[stage] += count
        for stage, count in stage_steps.items():
            task_steps[stage] += count
    endpoint = "/v1/images/generations 200"

    def delta(after, name, key):
        return after.get((name, key), 0) - before.get((name, key), 0)

    def observed():
        after = scrape(metrics_port)
        return {
            "images": {s: delta(after, "ray_ifserve_stage_images_total", s) for s in images},
            "batch_size_sum": {s: delta(after, "ray_ifserve_stage_batch_size_sum", s) for s in task_steps},
            "denoising_steps": {s: delta(after, "ray_ifserve_stage_denoising_steps_total", s) for s in task_steps},
            "residence_count": {s: delta(after, "ray_ifserve_stage_residence_seconds_count", s) for s in images},
            "queue_wait_count": {s: delta(after, "ray_ifserve_stage_queue_wait_seconds_count", s) for s in images},
            "latency_count": delta(after, "ray_ifserve_request_duration_seconds_count", endpoint),
            "requests": delta(after, "ray_ifserve_requests_total", endpoint),
        }

    expected = {
        "images": dict(images),
        "batch_size_sum": dict(task_steps),  # the batch-size histogram's sum is the sample-steps executed
        "denoising_steps": dict(task_steps),
        "residence_count": dict(images),
        "queue_wait_count": dict(images),
        "latency_count": len(TRAFFIC),
        "requests": len(TRAFFIC),
    }
    deadline = time.monotonic() + 30  # Ray exports every second; wait for the last export
    while (seen := observed()) != expected and time.monotonic() < deadline:
        time.sleep(1)
    assert seen == expected


def _rule_names() -> list[str]:
    names = []
    for path in sorted((MONITORING / "rules").glob("recording*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names += [rule["record"] for rule in group["rules"]]
    return names


def _panel_queries() -> list[tuple[str, str]]:
    queries = []
    for name in ("operations", "capacity"):  # accelerators: GPU replicas only, empty on CPU by design
        board = json.loads((MONITORING / "grafana" / f"{name}.json").read_text())
        queries += [(f"{name}: {p['title']}", t["expr"]) for p in board["panels"] for t in p["targets"]]
    return queries


def test_every_recording_rule_and_panel_query_returns_data(prometheus, traffic):
    queries = [(f"rule {name}", name) for name in _rule_names()] + _panel_queries()
    pending = dict(queries)
    deadline = time.monotonic() + 90
    while pending and time.monotonic() < deadline:
        for label, expr in list(pending.items()):
            result = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
            assert result["status"] == "success", (label, result)
            if result["data"]["result"]:
                del pending[label]
        time.sleep(1)
    assert not pending, f"queries without data: {sorted(pending)}"
    # Throughput is really there for every stage, under our names (the scrape config strips `ray_`).
    result = httpx.get(
        f"{prometheus}/api/v1/query", params={"query": "max_over_time(ifserve:stage_images:rate1m[5m])"}, timeout=10
    ).json()
    stages = {r["metric"]["stage"]: float(r["value"][1]) for r in result["data"]["result"]}
    assert set(stages) >= {"stage1", "stage2", "stage3"} and all(v > 0 for v in stages.values()), stages


def test_the_planner_reads_the_observed_load_from_prometheus(served, prometheus, traffic):
    """`ifserve plan --prometheus`: per stage, the share of images that reach it, their mean steps and
    the share that ends there, as TRAFFIC sent them (4 images at stage I, 3 at II, 1 at III)."""
    from serve.planner import demand_from_prometheus
    from stages.families import DEEPFLOYD_IF

    model = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())["model"]["id"]

    def observed():
        try:
            return demand_from_prometheus(prometheus, DEEPFLOYD_IF, model, window="15m")
        except Exception:  # noqa: BLE001 - not scraped yet
            return None

    expected = {"stage1": (1.0, 20 / 4, 1 / 4), "stage2": (3 / 4, 8 / 3, 2 / 3), "stage3": (1 / 4, 2.0, 1.0)}

    def matches(found) -> bool:
        rate, demand = found
        return rate > 0 and all(
            demand[stage].images == pytest.approx(images, rel=0.1)
            and demand[stage].steps == pytest.approx(steps, rel=0.1)
            and demand[stage].final == pytest.approx(final, rel=0.15, abs=0.05)
            for stage, (images, steps, final) in expected.items()
        )

    # Prometheus's rate() extrapolates each series from its own first and last samples in the window, and
    # the stages' series start at different times: right after the first scrapes of the finished traffic
    # the ratios can be far off (on a loaded machine, stage II's arrivals rated above stage I's). They
    # settle as scrapes of the final counts accumulate; wait for that, then check.
    found = wait_for(
        lambda: (f := observed()) is not None and matches(f) and f, 180, what="the observed load to settle"
    )
    rate, demand = found
    assert rate > 0
    for stage, (images, steps, final) in expected.items():
        d = demand[stage]
        assert d.images == pytest.approx(images, rel=0.1), stage
        assert d.steps == pytest.approx(steps, rel=0.1), stage
        assert d.final == pytest.approx(final, rel=0.15, abs=0.05), stage
