import pytest


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Every test here may build Flower messages by hand."""
