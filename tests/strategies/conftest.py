import pytest


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Messages built by hand (outside a ServerApp) need Flower's per-process task identity
    (same fixture as tests/federation/conftest.py)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old
