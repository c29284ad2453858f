"""Shared fixtures: the same tests run on fakeredis and on real Redis.

Real Redis is the server named by TRACKER_REDIS_URL or REDIS_URL, else an
embedded server started for the session in a temporary data dir. Every test
gets its own key prefix and deletes only the keys under it.
"""

from __future__ import annotations

import os
import uuid

import pytest
from helpers import open_deployment, open_real, wipe

from tracker.projector import Projector
from tracker.query import Tracker
from tracker.store import embedded
from tracker.store.deployment import Deployment


@pytest.fixture(scope="session")
def real_redis_url(tmp_path_factory) -> str:
    url = os.environ.get("TRACKER_REDIS_URL") or os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    data_dir = tmp_path_factory.mktemp("embedded")
    sock = embedded.ensure(data_dir)
    yield f"unix://{sock}"
    embedded.stop(data_dir)


@pytest.fixture(scope="session")
def embedded_url(tmp_path_factory) -> str:
    """Always the embedded server (the default a new user gets), whatever the env says."""
    data_dir = tmp_path_factory.mktemp("embedded-default")
    sock = embedded.ensure(data_dir)
    yield f"unix://{sock}"
    embedded.stop(data_dir)


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture(params=["fake", "real"])
def backend(request, real_redis_url, prefix):
    """A factory for deployments on one backend; cleans up what it made."""
    made = []

    def make(**settings) -> Deployment:
        d = open_deployment(request.param, real_redis_url, prefix, **settings)
        made.append(d)
        return d

    make.kind = request.param
    yield make
    for d in made:
        wipe(d)
        d.close()


@pytest.fixture
def deployment(backend) -> Deployment:
    return backend(partitions=4, ttl=1800)


@pytest.fixture
def tracker(deployment) -> Tracker:
    return Tracker(deployment)


@pytest.fixture
def projector(deployment) -> Projector:
    return Projector(deployment, consumer="test")


@pytest.fixture
def real_deployment(real_redis_url, prefix):
    yield from open_real(real_redis_url, prefix, 4)
