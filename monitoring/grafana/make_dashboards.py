"""Writes the Grafana dashboards (JSON) next to this file: `python monitoring/grafana/make_dashboards.py`.

Panels query the recording rules (monitoring/rules/recording.yml) where one exists, so a dashboard and
an alert never disagree about what "throughput" or "utilisation" means. Datasource: a Prometheus
datasource chosen when importing (`${datasource}`).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def panel(title: str, unit: str, *targets: tuple[str, str], x: int, y: int, w: int = 12, h: int = 8) -> dict:
    return {
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(uid: str, title: str, panels: list[dict]) -> dict:
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    return {
        "uid": uid,
        "title": title,
        "tags": ["ifserve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


OPERATIONS = dashboard(
    "ifserve-operations",
    "ifserve: operations",
    [
        panel(
            "Request latency p50 / p95",
            "s",
            ("ifserve:request_duration_seconds:p50_1m", "p50 {{endpoint}}"),
            ("ifserve:request_duration_seconds:p95_1m", "p95 {{endpoint}}"),
            x=0,
            y=0,
        ),
        panel("Requests by status", "reqps", ("ifserve:requests:rate1m", "{{endpoint}} {{status}}"), x=12, y=0),
        panel(
            "Throughput: images per second by stage",
            "short",
            ("ifserve:stage_images:rate1m", "{{model}} {{stage}}"),
            x=0,
            y=8,
        ),
        panel(
            "Denoising steps per second by stage",
            "short",
            ("ifserve:stage_denoising_steps:rate1m", "{{model}} {{stage}}"),
            x=12,
            y=8,
        ),
        panel(
            "Batched step duration p50 / p95",
            "s",
            ("ifserve:stage_step_duration_seconds:p50_1m", "p50 {{model}} {{stage}}"),
            ("ifserve:stage_step_duration_seconds:p95_1m", "p95 {{model}} {{stage}}"),
            x=0,
            y=16,
        ),
        panel(
            "Mean batch size per step",
            "short",
            ("ifserve:stage_mean_batch_size:ratio1m", "{{model}} {{stage}}"),
            x=12,
            y=16,
        ),
        panel(
            "Queue wait p95 and stage residence p95",
            "s",
            ("ifserve:stage_queue_wait_seconds:p95_1m", "queue {{model}} {{stage}}"),
            ("ifserve:stage_residence_seconds:p95_1m", "residence {{model}} {{stage}}"),
            x=0,
            y=24,
        ),
        panel(
            "Tasks active and waiting",
            "short",
            ("sum by (model, stage) (ifserve_stage_tasks_active)", "active {{model}} {{stage}}"),
            ("sum by (model, stage) (ifserve_stage_tasks_waiting)", "waiting {{model}} {{stage}}"),
            x=12,
            y=24,
        ),
        panel(
            "Replicas per stage",
            "short",
            ("ifserve:stage_replicas:count", "{{model}} {{stage}}"),
            ("max by (model, stage) (ifserve_stage_max_replicas)", "max {{model}} {{stage}}"),
            x=0,
            y=32,
        ),
        panel(
            "Text encoder: prompts by cache result",
            "short",
            ("sum by (model, cache) (rate(ifserve_encoder_prompts_total[1m]))", "{{model}} {{cache}}"),
            x=12,
            y=32,
        ),
    ],
)

CAPACITY = dashboard(
    "ifserve-capacity",
    "ifserve: capacity planning",
    [
        panel(
            "Demand: tasks arriving per second",
            "short",
            ("ifserve:stage_demand_tasks:rate1m", "{{model}} {{stage}}"),
            x=0,
            y=0,
        ),
        panel(
            "Capacity at the current replica count (images/s)",
            "short",
            ("ifserve:stage_capacity_images:rate1m", "{{model}} {{stage}}"),
            x=12,
            y=0,
        ),
        panel(
            "Headroom: capacity minus demand (images/s)",
            "short",
            ("ifserve:stage_headroom_images:rate1m", "{{model}} {{stage}}"),
            x=0,
            y=8,
        ),
        panel(
            "Replicas needed for the observed load vs running",
            "short",
            ("ifserve:stage_replicas_needed:ceil1m", "needed {{model}} {{stage}}"),
            ("ifserve:stage_replicas:count", "running {{model}} {{stage}}"),
            x=12,
            y=8,
        ),
        panel(
            "Utilisation: busy fraction of replicas",
            "percentunit",
            ("ifserve:stage_busy:ratio1m", "{{model}} {{stage}}"),
            x=0,
            y=16,
        ),
        panel(
            "Mean batch size (how full each step is)",
            "short",
            ("ifserve:stage_mean_batch_size:ratio1m", "{{model}} {{stage}}"),
            ("max by (model, stage) (ifserve_stage_max_batch_size)", "configured max {{model}} {{stage}}"),
            x=12,
            y=16,
        ),
        panel(
            "Share of capacity per tenant, by stage",
            "percentunit",
            ("ifserve:tenant_capacity_share:ratio1m", "{{tenant}} ({{priority}}) {{model}} {{stage}}"),
            x=0,
            y=24,
        ),
        panel(
            "Share of capacity per priority class, by stage",
            "percentunit",
            ("ifserve:priority_capacity_share:ratio1m", "{{priority}} {{model}} {{stage}}"),
            x=12,
            y=24,
        ),
        panel(
            "Images requested per tenant",
            "short",
            ("ifserve:tenant_images:rate1m", "{{tenant}} ({{priority}}) {{model}}"),
            x=0,
            y=32,
        ),
        panel(
            "Queue wait p95 per tenant, by stage",
            "s",
            ("ifserve:tenant_queue_wait_seconds:p95_1m", "{{tenant}} ({{priority}}) {{model}} {{stage}}"),
            x=12,
            y=32,
        ),
    ],
)

# Only a GPU replica exports these; on CPU this dashboard is empty by design (not tested on CPU).
ACCELERATORS = dashboard(
    "ifserve-accelerators",
    "ifserve: accelerators",
    [
        panel(
            "Accelerator memory per replica",
            "bytes",
            ("ifserve_accelerator_memory_bytes", "{{model}} {{stage}} {{replica}}"),
            x=0,
            y=0,
        ),
        panel(
            "Accelerator utilisation per replica",
            "percentunit",
            ("ifserve_accelerator_utilization_ratio", "{{model}} {{stage}} {{replica}}"),
            x=12,
            y=0,
        ),
    ],
)

DASHBOARDS = {"operations": OPERATIONS, "capacity": CAPACITY, "accelerators": ACCELERATORS}

if __name__ == "__main__":
    for name, board in DASHBOARDS.items():
        (HERE / f"{name}.json").write_text(json.dumps(board, indent=2) + "\n")
        print(f"wrote {HERE / name}.json")
