"""The orchestrator's retries without a cluster: stage handles that fail as Ray's do (a replica's death,
an output lost with its node), over asyncio futures standing in for object refs. A retry calls again
only the stages from the earliest one whose output failed or was lost, with the same inputs; past
`faults.max_attempts` the image is Unavailable (503 + Retry-After); a request's own error is not
retried. The multi-node fault tests (tests/test_serve_multinode.py) show the same on a real cluster,
images included."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict

import pytest
from ray.exceptions import ObjectLostError, RayActorError

from serve.config import FaultsConfig
from serve.orchestrator import Orchestrator, Unavailable
from stages.errors import InvalidParameter
from stages.families.deepfloyd_if import DEEPFLOYD_IF, GenerationParams

PARAMS = GenerationParams(prompt="a kite", seed=3, size=1024)
NODES = ["text_encoder", "stage1", "stage2", "stage3"]


class Script:
    """What each node's calls do, in order: None (its output is made), an error (its output raises it
    when awaited: a dead replica), or "lost" (its output is made on a node that goes away as the next
    stage reads it: that stage fails, and the output is gone when probed)."""

    def __init__(self, **failures: list):
        self.failures = {node: list(errors) for node, errors in failures.items()}
        self.calls: Counter[str] = Counter()
        self.inputs: dict[str, list] = defaultdict(list)

    def output(self, node: str, previous):
        self.calls[node] += 1
        self.inputs[node].append(previous)
        failure = self.failures[node].pop(0) if self.failures.get(node) else None
        if failure == "lost":
            return _Lost(f"{node}#{self.calls[node]}")
        future = asyncio.get_running_loop().create_future()
        if isinstance(previous, _Lost):  # its node goes as this stage fetches it
            previous.gone = True
            future.set_exception(ObjectLostError("ref", "owner", "lost with its node"))
        elif isinstance(previous, asyncio.Future) and previous.exception() is not None:
            future.set_exception(previous.exception())  # Ray fails a task whose argument failed
        elif failure is not None:
            future.set_exception(failure)
        else:
            future.set_result(f"{node}#{self.calls[node]}")
        return future


class _Lost:
    """An output on a node that goes away once the next stage has started reading it."""

    def __init__(self, value: str):
        self.value, self.gone = value, False

    def __await__(self):
        if self.gone:
            raise ObjectLostError("ref", "owner", "lost with its node")
        return self.value
        yield  # a generator, as __await__ must be


class _Response:
    def __init__(self, ref):
        self.ref = ref

    async def _to_object_ref(self):
        return self.ref

    def cancel(self) -> None:
        pass


class _Method:
    def __init__(self, script: Script, node: str):
        self.script, self.node = script, node

    def remote(self, *args, previous=None, **kwargs) -> _Response:
        return _Response(self.script.output(self.node, previous))


class _Handle:
    def __init__(self, script: Script, node: str):
        self.encode = self.run = _Method(script, node)


class _Ready:
    async def wait(self, ref) -> None:  # the refs here are ready when made
        return None


def orchestrator(script: Script, attempts: int = 3) -> Orchestrator:
    stages = {node: _Handle(script, node) for node in NODES[1:]}
    faults = FaultsConfig(max_attempts=attempts, retry_backoff_s=0)
    made = Orchestrator(DEEPFLOYD_IF, _Handle(script, "text_encoder"), stages, faults=faults, model="m")
    made.watcher = _Ready()
    return made


def run(made: Orchestrator):
    return asyncio.run(made.image("r", PARAMS))


def test_a_dead_stage_replica_is_retried_from_that_stage_with_the_same_inputs():
    script = Script(stage2=[RayActorError()])
    made = orchestrator(script)
    assert run(made) == "stage3#2"  # stage III's second call: the first was fed stage II's failed output
    assert script.calls == Counter(text_encoder=1, stage1=1, stage2=2, stage3=2)
    first, again = script.inputs["stage2"]
    assert again is first and first.result() == "stage1#1"  # stage I's kept output again: the same image
    assert made.retries == Counter(stage2=1) and made.given_up == 0


def test_an_output_lost_with_its_node_restarts_from_the_earliest_stage_whose_inputs_survive():
    """Stage II's output was read by stage III, then its node went: stage III fails on it, and the retry
    must make stage II's output again (from stage I's, which survived) before stage III."""
    script = Script(stage2=["lost"])
    made = orchestrator(script)
    assert run(made) == "stage3#2"
    assert script.calls == Counter(text_encoder=1, stage1=1, stage2=2, stage3=2)
    assert made.retries == Counter(stage2=1)


def test_past_its_attempts_an_image_is_unavailable():
    script = Script(stage1=[RayActorError()] * 3)
    made = orchestrator(script, attempts=3)
    with pytest.raises(Unavailable, match="3 times"):
        run(made)
    assert script.calls["stage1"] == 3 and script.calls["text_encoder"] == 1
    assert made.retries == Counter(stage1=2) and made.given_up == 1


def test_a_requests_own_error_is_not_retried():
    script = Script(stage1=[InvalidParameter("size", "no")])
    made = orchestrator(script)
    with pytest.raises(InvalidParameter):
        run(made)
    assert script.calls["stage1"] == 1 and made.retries == Counter()
