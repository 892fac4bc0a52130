"""backend.malloc_arena_max: the setting becomes the environment of the processes fedlt starts and a mallopt call
in the running driver; 0 leaves glibc alone. (That Ray's processes receive it: tests/flower/test_ray_security.py.)"""

import os
import platform

import pytest

from fedlt.core import malloc


def test_env_carries_the_arena_limit_and_zero_means_glibc_default():
    assert malloc.env({"malloc_arena_max": 2}) == {"MALLOC_ARENA_MAX": "2"}
    assert malloc.env({"malloc_arena_max": 0}) == {}
    assert malloc.env({}) == {}
    assert malloc.apply_here({"malloc_arena_max": 0}) is False


def test_export_keeps_a_value_the_user_exported(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert malloc.export({"malloc_arena_max": 2}) == {"MALLOC_ARENA_MAX": "4"}
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert malloc.export({"malloc_arena_max": 2}) == {"MALLOC_ARENA_MAX": "2"}
    assert os.environ["MALLOC_ARENA_MAX"] == "2"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_the_setting_in_the_running_process():
    assert malloc.apply_here({"malloc_arena_max": 2}) is True
