"""Several nodes (`ray.cluster_utils.Cluster`): simulated nodes per pool, each declaring only its pool's
resource (stage II's pool on two nodes). Each stage's replicas run only on its pool's nodes, and an image
crossing the nodes equals the reference.

Then faults under a steady load (clients sending 256 px images back to back while it happens): a stage
replica's process killed, a stage's engine thread wedged (the fault hook; its health check fails and
Ray replaces it), and a pool's node removed with the outputs it held. Each prints what was sent and how
it ended: succeeded (with the reference's pixels), failed with a retriable error (503 + Retry-After),
lost (any other answer, or a wrong image) or hung (no answer in time). Lost and hung must be 0. Then a
request's deadline: past it, a 504 and its task out of the batch."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from serve import local_cluster
from serve.app import APP_NAME, build_app
from serve.orchestrator import running_replicas
from stages.families.deepfloyd_if import GenerationParams
from tests.serving import decode, reference_images, serving_config, wait_for

pytestmark = pytest.mark.serve

POOLS = {
    "TextEncoder": "pool_text_encoder",
    "StageI": "pool_stage1",
    "StageII": "pool_stage2",
    "StageIII": "pool_stage3",
}
NODE = dict(num_cpus=2, object_store_memory=100 * 1024**2)  # logical CPUs: one per replica
# Faults are noticed and handled in seconds here: health checked every second, a stage with work and no
# step for 3 s is wedged, and a stopping replica waits 3 s for its tasks before Ray kills it.
FAULTS = dict(health_check_period_s=1, health_check_timeout_s=5, min_stall_s=3, max_attempts=4, fault_hooks=True)
LOAD = dict(prompt="a lighthouse at dusk", size="256x256", stage1_steps=3, stage2_steps=3)
SEEDS = range(100, 104)  # the load cycles through these; each one's reference is computed once


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints, tmp_path_factory):
    cluster = Cluster(initialize_head=True, head_node_args=dict(NODE, num_cpus=1))  # ingress, controller, proxy
    nodes: dict[str, list] = {pool: [] for pool in POOLS.values()}
    for pool in POOLS.values():
        for _ in range(2 if pool == "pool_stage2" else 1):  # stage II's pool: two nodes, one can go
            # A spare CPU: the replacement of a removed node's replica must fit beside the other one, and
            # the front (ingress, limits, runner) must stay on the head though it would fit here too.
            nodes[pool].append(cluster.add_node(**dict(NODE, num_cpus=3), resources={pool: 2}))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    drain = {"graceful_shutdown_timeout_s": 3}
    config = serving_config(
        tiny_checkpoints,
        tmp_path_factory.mktemp("serve-multinode"),
        cluster={"resources": {}},  # declared by the nodes above, not by `ifserve up`
        faults=FAULTS,
        stages={
            "stage1": {"autoscaling": {"min_replicas": 2, "max_replicas": 2}, **drain},
            "stage2": {"autoscaling": {"min_replicas": 2, "max_replicas": 2}, **drain},
        },
    )
    url = local_cluster.start(config, progress=lambda *_: None)
    yield url, nodes, cluster, config
    local_cluster.stop()
    cluster.shutdown()


@pytest.fixture(scope="module")
def references(reference_pipes) -> dict[int, np.ndarray]:
    params = {**LOAD, "size": 256}  # the engine's form of the API's "256x256"
    return {seed: reference_images(reference_pipes, GenerationParams(**params, seed=seed))[256] for seed in SEEDS}


def stats(deployment: str, calls: int = 12) -> dict[str, dict]:
    """Each replica's stats that `calls` handle calls reached, by replica id."""
    handle = serve.get_deployment_handle(deployment, app_name=APP_NAME)
    found = {}
    for _ in range(calls):
        try:
            one = handle.stats.remote().result(timeout_s=30)
        except Exception:  # noqa: BLE001 - a replica dying under a fault test: ask another
            continue
        found[one["replica"]] = one
    return found


def busy(deployment: str) -> dict:
    """The stats of one of the deployment's replicas while it holds work (a fault then hits a request)."""
    return wait_for(
        lambda: next((one for one in stats(deployment, calls=4).values() if one["running"] + one["waiting"]), None),
        60,
        interval_s=0.05,
        what=f"a busy {deployment} replica",
    )


def replicas(deployment: str) -> int:
    return running_replicas(serve.status(), APP_NAME, [deployment])[deployment]


@dataclass
class SteadyLoad:
    """`clients` threads posting images back to back until stopped; every answer classified."""

    url: str
    references: dict[int, np.ndarray]
    clients: int = 2
    timeout_s: float = 120  # an answer later than this is a hang
    outcomes: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        self._lock = threading.Lock()

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 10)

    def _client(self, index: int) -> None:
        n = index
        while not self._stop.is_set():
            seed = SEEDS[n % len(SEEDS)]
            n += self.clients
            outcome = self._one(seed)
            with self._lock:
                self.outcomes["sent"] += 1
                self.outcomes[outcome] += 1

    def _one(self, seed: int) -> str:
        try:
            response = httpx.post(
                f"{self.url}/v1/images/generations", json=dict(LOAD, seed=seed), timeout=self.timeout_s
            )
        except httpx.TimeoutException:
            return "hung"
        except httpx.TransportError as err:  # no answer at all: the connection dropped
            self.problems.append(f"seed {seed}: {type(err).__name__}: {err}")
            return "lost"
        if response.status_code == 200:
            image = decode(response.json()["data"][0]["b64_json"])
            if np.array_equal(image, self.references[seed]):
                return "succeeded"
            self.problems.append(f"seed {seed}: a different image")
            return "lost"
        if response.status_code == 503 and response.headers.get("retry-after"):
            return "retriable"
        self.problems.append(f"seed {seed}: {response.status_code} {response.text[:200]}")
        return "lost"

    def report(self, fault: str) -> str:
        counts = self.outcomes
        return (
            f"{fault}: sent {counts['sent']}, succeeded {counts['succeeded']}, failed with a retriable error "
            f"{counts['retriable']}, lost {counts['lost']}, hung {counts['hung']}"
        )


def retries() -> Counter:
    """Images the ingress replicas tried again, by the stage whose call failed (all models)."""
    total: Counter = Counter()
    for one in stats("Ingress", calls=4).values():
        for by_stage in one["retries"].values():
            total.update(by_stage)
    return total


def under_load(url: str, references, fault: str, inject, recovered, capsys, retried: str | None = None,
               settle_s: float = 3) -> SteadyLoad:  # fmt: skip
    """Run the load, inject the fault once it flows, keep it up until `recovered()` and a little after.
    `retried`: the stage whose failed calls must have been retried (the fault hit a request there)."""
    with SteadyLoad(url, references) as load:
        wait_for(lambda: load.outcomes["succeeded"] >= 2, 120, what="the load to flow")
        before, retried_before = load.outcomes["succeeded"], retries()
        inject()
        wait_for(recovered, 120, interval_s=0.5, what=f"recovery from: {fault}")
        wait_for(lambda: load.outcomes["succeeded"] >= before + 2, 120, what="images after the fault")
        time.sleep(settle_s)
    retried_now = retries() - retried_before
    report = f"{load.report(fault)}; retried {dict(retried_now) or 'none'}"
    with capsys.disabled():  # printed whatever pytest's capture: the run's account of the fault
        print(f"\n{report}")
    assert load.outcomes["lost"] == 0 and load.outcomes["hung"] == 0, (report, load.problems)
    assert load.outcomes["succeeded"] > before
    if retried is not None:  # the request the fault hit came back through a retry, not a 503
        assert retried_now[retried] >= 1, report
    return load


def test_each_stage_runs_only_on_its_pools_nodes(cluster):
    _, nodes, _, _ = cluster
    head = ray.get_runtime_context().get_node_id()
    for deployment, pool in POOLS.items():
        where = {one["node_id"] for one in stats(deployment).values()}
        assert where <= {node.node_id for node in nodes[pool]}, (deployment, where)
        assert head not in where
    # The front and Serve's proxy run on the head, though the pools' nodes have spare CPUs: no pool's node
    # takes an HTTP request with it when it goes.
    for deployment in ("Ingress", "BatchRunner"):
        assert {one["node_id"] for one in stats(deployment, 4).values()} == {head}, deployment
    assert set(serve.status().proxies) == {head}  # no HTTP connection ends on a pool's node either


def test_an_image_crosses_the_nodes_and_equals_the_reference(cluster, reference_pipes):
    url = cluster[0]
    fields = dict(prompt="a windmill in a field of tulips", seed=21, stage1_steps=5, stage2_steps=2, stage3_steps=2)
    response = httpx.post(f"{url}/v1/images/generations", json=fields, timeout=600)
    assert response.status_code == 200, response.text
    reference = reference_images(reference_pipes, GenerationParams(**fields))[1024]
    served = decode(response.json()["data"][0]["b64_json"])
    assert np.array_equal(served, reference)


def test_killing_a_stage_replicas_process_loses_no_request(cluster, references, capsys):
    url = cluster[0]
    killed: list[dict] = []

    def kill() -> None:
        killed.append(busy("StageII"))  # one with a request in it: that request must be retried
        os.kill(killed[0]["pid"], signal.SIGKILL)

    def gone_and_replaced() -> bool:
        return killed[0]["replica"] not in stats("StageII", calls=6) and replicas("StageII") == 2

    under_load(url, references, "StageII replica killed", kill, gone_and_replaced, capsys, retried="stage2")


def test_a_wedged_engine_thread_fails_its_health_check_and_loses_no_request(cluster, references, capsys):
    url = cluster[0]
    before = set(stats("StageI", calls=20))
    handle = serve.get_deployment_handle("StageI", app_name=APP_NAME)

    def replaced() -> bool:  # Ray stopped the wedged replica and started another in its place
        return replicas("StageI") == 2 and bool(set(stats("StageI", calls=6)) - before)

    under_load(url, references, "StageI engine thread wedged", lambda: handle.inject_fault.remote("wedge").result(),
               replaced, capsys, retried="stage1")  # fmt: skip


def test_removing_a_pools_node_loses_no_request(cluster, references, capsys):
    url, nodes, ray_cluster, _ = cluster
    removed: list = []

    def remove() -> None:  # the node of a replica with a request in it, and the outputs that node holds
        hosting = busy("StageII")["node_id"]
        removed.append(next(n for n in nodes["pool_stage2"] if n.node_id == hosting))
        ray_cluster.remove_node(removed[0])
        nodes["pool_stage2"].remove(removed[0])

    def moved() -> bool:
        where = {s["node_id"] for s in stats("StageII", 6).values()}
        return replicas("StageII") == 2 and removed[0].node_id not in where

    under_load(url, references, "a pool_stage2 node removed", remove, moved, capsys, retried="stage2")


def test_a_killed_ingress_gives_its_leases_and_stage_room_back_within_10_s(cluster, capsys):
    """Issue 25, finding 3: a request's lease (its tenant's concurrency slot and its room in every stage it
    needs) was freed only by its ingress, or after an hour. Now its ingress renews it every 1.5 s and it
    lapses 6 s (tenancy.lease_s) after the last renewal: an ingress killed with requests in flight holds
    nothing 10 s later, though the stages are still busy with what it sent."""
    url = cluster[0]
    limits = serve.get_deployment_handle("TenantLimits", app_name=APP_NAME)
    body = dict(LOAD, stage1_steps=60, stage2_steps=30)  # long enough to be in flight when the ingress dies
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(httpx.post, f"{url}/v1/images/generations", json=dict(body, seed=s), timeout=300)
                 for s in range(4)]  # fmt: skip
        held = wait_for(lambda: (f := limits.in_flight.remote().result())["requests"] >= 2 and f, 120, 0.1,
                        what="requests in flight")  # fmt: skip
        (ingress,) = stats("Ingress", 4).values()
        os.kill(ingress["pid"], signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: _nothing_held(limits.in_flight.remote().result()), 60, 0.1, what="the leases back")
        back_after = time.monotonic() - killed
        for call in calls:
            call.exception()  # answered with an error, or a connection dropped: either way it ended
    with capsys.disabled():
        print(f"\nkilled ingress held {held['requests']} requests and {held['load']} stage room; all back "
              f"{back_after:.1f} s after the kill")  # fmt: skip
    assert back_after < 10
    wait_for(lambda: httpx.post(f"{url}/v1/images/generations", json=dict(LOAD, seed=SEEDS[0]),
                                timeout=120).status_code == 200, 180, 1, what="a new ingress serving")  # fmt: skip


def _nothing_held(in_flight: dict) -> bool:
    return in_flight["requests"] == 0 and not any(in_flight["load"].values())


def test_downscaling_a_stage_under_load_loses_no_request(cluster, references, capsys):
    """A redeploy with stage I down from two replicas to one: Serve stops a replica, which first lets its
    requests finish (graceful_shutdown_timeout_s); the ingress and runner replicas, whose config changed
    too, are replaced the same way."""
    url, _, _, config = cluster
    smaller = config.model_copy(deep=True)
    smaller.stages["stage1"].autoscaling.min_replicas = smaller.stages["stage1"].autoscaling.max_replicas = 1

    redeploy = threading.Thread(
        target=serve.run, args=(build_app(smaller),), kwargs=dict(name=APP_NAME, route_prefix="/"), daemon=True
    )
    under_load(url, references, "stage I downscaled by a redeploy", redeploy.start, lambda: replicas("StageI") == 1,
               capsys)  # fmt: skip
    redeploy.join(timeout=300)  # serve.run returns once the app runs again
    assert not redeploy.is_alive()


def test_a_request_past_its_deadline_gets_504_and_leaves_the_stage(cluster):
    url = cluster[0]
    slow = dict(prompt="a slow one", size="64x64", seed=7, stage1_steps=400)
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/images/generations", json=slow, headers={"X-Request-Timeout": "1.5"}, timeout=120)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded" and response.headers["retry-after"]
    assert time.monotonic() - started < 30
    # Its task left stage I's batch at the next step: nothing running there once it is answered.
    wait_for(lambda: all(s["running"] == 0 and s["waiting"] == 0 for s in stats("StageI").values()), 30,
             what="stage I empty")  # fmt: skip
    bad = httpx.post(f"{url}/v1/images/generations", json=slow, headers={"X-Request-Timeout": "soon"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Timeout"
