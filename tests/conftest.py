import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(os.cpu_count() or 1)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    from stages.checkpoints import write_checkpoints
    from stages.families import DEEPFLOYD_IF

    root = tmp_path_factory.mktemp("checkpoints") / "tiny"
    write_checkpoints(DEEPFLOYD_IF, "tiny", root)
    return root


@pytest.fixture(scope="session")
def safety_checkpoints(tmp_path_factory):
    """The tiny preset with IF's safety checker, feature extractor and watermarker in IF-I."""
    from stages.checkpoints import write_checkpoints
    from stages.families import DEEPFLOYD_IF

    root = tmp_path_factory.mktemp("checkpoints") / "tiny-safety"
    write_checkpoints(DEEPFLOYD_IF, "tiny", root, safety_checker=True)
    return root


@pytest.fixture(scope="session")
def reference_pipes(tiny_checkpoints):
    from tests.reference import load_reference

    return load_reference(tiny_checkpoints)


@pytest.fixture(scope="session")
def cascade(tiny_checkpoints):
    from stages.cascade import Cascade

    return Cascade.from_checkpoints(tiny_checkpoints)


@pytest.fixture(scope="session")
def deci_checkpoints(tmp_path_factory):
    """DeciDiffusion's tiny preset: DIR/DeciDiffusion-v1-0."""
    from stages.checkpoints import write_checkpoints
    from stages.families import get_family

    root = tmp_path_factory.mktemp("checkpoints") / "decidiffusion-tiny"
    write_checkpoints(get_family("decidiffusion"), "tiny", root)
    return root


@pytest.fixture(scope="session")
def deci_pipe(deci_checkpoints):
    """diffusers' own StableDiffusionPipeline over that folder: DeciDiffusion's reference."""
    from tests.reference import load_latent_reference

    return load_latent_reference(deci_checkpoints / "DeciDiffusion-v1-0")


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server for the session (tests/postgres.py): its URL."""
    from tests.postgres import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    from tests.postgres import empty_database

    return empty_database(request, tmp_path)
