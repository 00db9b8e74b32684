"""Several nodes (`ray.cluster_utils.Cluster`): one simulated node per pool, each declaring only its
pool's resource. Each stage's replicas must run on its pool's node and nowhere else, and an image
crossing all the nodes still equals the reference."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from serve import local_cluster
from serve.app import APP_NAME
from stages.families.deepfloyd_if import GenerationParams
from tests.serving import decode, reference_images, serving_config

pytestmark = pytest.mark.serve

POOLS = {
    "TextEncoder": "pool_text_encoder",
    "StageI": "pool_stage1",
    "StageII": "pool_stage2",
    "StageIII": "pool_stage3",
}
NODE = dict(num_cpus=2, object_store_memory=100 * 1024**2)  # logical CPUs: one per replica


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints, tmp_path_factory):
    cluster = Cluster(initialize_head=True, head_node_args=dict(NODE, num_cpus=1))  # ingress, controller, proxy
    nodes = {pool: cluster.add_node(**NODE, resources={pool: 2}).node_id for pool in POOLS.values()}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    config = serving_config(
        tiny_checkpoints,
        tmp_path_factory.mktemp("serve-multinode"),
        cluster={"resources": {}},  # declared by the nodes above, not by `ifserve up`
        stages={name: {"autoscaling": {"min_replicas": 2, "max_replicas": 2}} for name in ("stage1",)},
    )
    url = local_cluster.start(config, progress=lambda *_: None)
    yield url, nodes, cluster.head_node.node_id
    local_cluster.stop()
    cluster.shutdown()


def replica_nodes(deployment: str, calls: int = 12) -> set[str]:
    handle = serve.get_deployment_handle(deployment, app_name=APP_NAME)
    return {handle.stats.remote().result()["node_id"] for _ in range(calls)}


def test_each_stage_runs_only_on_its_pools_node(cluster):
    _, nodes, head = cluster
    for deployment, pool in POOLS.items():
        where = replica_nodes(deployment)
        assert where == {nodes[pool]}, (deployment, where)
    assert head not in set().union(*(replica_nodes(d) for d in POOLS))


def test_an_image_crosses_the_nodes_and_equals_the_reference(cluster, reference_pipes):
    url = cluster[0]
    fields = dict(prompt="a windmill in a field of tulips", seed=21, stage1_steps=5, stage2_steps=2, stage3_steps=2)
    response = httpx.post(f"{url}/v1/images/generations", json=fields, timeout=600)
    assert response.status_code == 200, response.text
    reference = reference_images(reference_pipes, GenerationParams(**fields))[1024]
    served = decode(response.json()["data"][0]["b64_json"])
    assert np.array_equal(served, reference)
