"""The run folder, as the entry points see it: a new run claims a folder that holds no run yet (and locks it
while it runs); ``fedlt resume=RUN_DIR`` continues a run with that folder's own config.yaml; a failed command
removes only what it created. Nothing a run wrote is ever overwritten by another run."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

from fedlt.config import RESUME_OVERRIDABLE, overridable
from fedlt.core.checkpoint import CheckpointError

LOCK = ".fedlt.lock"
RUN_FILES = ("config.yaml", "results.json", "metrics.jsonl", "partition.json", "checkpoints", "tb")
STARTED = time.time()


class RunDirError(ValueError):
    """A run folder that cannot be used (a user error: one paragraph, exit 2)."""


def holds_run(run_dir: Path) -> list[str]:
    """The files of an earlier run in ``run_dir`` (empty: none)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def check_usable(run_dir: Path) -> None:
    """A folder a new run may be written to: a directory (or nothing yet) that is writable."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"the run folder {run_dir} is a file, not a folder; choose another with "
                          f"hydra.run.dir=PATH.")
    probe = run_dir if run_dir.exists() else next((p for p in run_dir.parents if p.exists()), Path("/"))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"the run folder {run_dir} cannot be written by this user ({probe} is not writable); "
                          f"choose another with hydra.run.dir=PATH or fix its permissions.")


def claim_new(run_dir: Path) -> None:
    """Refuse a folder that already holds a run: a second run there would overwrite it."""
    check_usable(run_dir)
    found = holds_run(run_dir) if run_dir.is_dir() else []
    if found:
        raise RunDirError(
            f"the run folder {run_dir} already holds a run ({', '.join(found)}); a new run there would overwrite "
            f"it. Continue that run with `fedlt resume={run_dir}`, or choose another folder with hydra.run.dir=PATH.")


class RunLock:
    """An exclusive lock on a run folder for the life of this process's run (two live runs never share one)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(f"another fedlt run (pid {holder}) is using the run folder {self.path.parent}; wait "
                              f"for it to finish or choose another folder with hydra.run.dir=PATH.") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
            self.path.unlink(missing_ok=True)


def created_by_this_process(run_dir: Path, existed_before: bool) -> bool:
    """Did this command create ``run_dir`` (Hydra makes it just before fedlt's code runs)?"""
    try:
        return not existed_before and run_dir.stat().st_ctime >= STARTED - 1.0
    except OSError:
        return False


def remove_created(run_dir: Path, existed_before: bool, ours: bool) -> None:
    """After a failed command: remove the run files this command wrote (``ours``: it claimed the folder as a
    new run's), then the folder itself only if this command created it and it is empty; a user's own folder,
    and every earlier run, are left as they were."""
    if not run_dir.is_dir():
        return
    if ours:
        for name in (*RUN_FILES, "partition.png", LOCK):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
    if created_by_this_process(run_dir, existed_before) and not any(run_dir.iterdir()):
        run_dir.rmdir()


def override_keys(overrides: list[str]) -> list[str]:
    """Config keys named by Hydra command-line overrides (``a.b=1``, ``+a=1``, ``~a``, ``group=name``)."""
    return [o.lstrip("+~").split("=", 1)[0].split("@", 1)[0] for o in overrides]


def resume_config(resume: str, overrides: list[str], composed: dict) -> tuple[Path, dict]:
    """``fedlt resume=RUN_DIR [allowed overrides]``: the run directory and the config to continue it with --
    its own config.yaml, plus the command-line values of the RESUME_OVERRIDABLE keys the user passed (from
    ``composed``, Hydra's composition of the command line). Anything else on the command line is refused."""
    from omegaconf import OmegaConf

    run_dir = Path(os.path.expanduser(str(resume))).resolve()
    if not run_dir.is_dir():
        raise CheckpointError(f"invalid value resume={resume!r}: {run_dir} is not a directory; pass the run "
                              f"directory of the run to continue (the `run_dir:` line fedlt printed).")
    if not os.access(run_dir, os.R_OK | os.W_OK | os.X_OK):
        raise CheckpointError(f"invalid value resume={resume!r}: the run directory {run_dir} cannot be read and "
                              f"written by this user; fix its permissions.")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"invalid value resume={resume!r}: {run_dir} is not a fedlt run directory (it has "
                              f"no config.yaml).")
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if not isinstance(saved, dict) or "strategy" not in saved or "num_rounds" not in saved:
            raise ValueError("not a fedlt run configuration")
    except Exception as e:  # noqa: BLE001 -- unreadable for any reason: same message
        from fedlt.core.failures import clip

        why = clip(" ".join(str(e).split()), 300, rest="not shown")
        raise CheckpointError(f"invalid value resume={resume!r}: {path} cannot be read as a fedlt run "
                              f"configuration ({type(e).__name__}: {why}).") from None
    keys = [k for k in override_keys(overrides) if k != "resume"]
    refused = [k for k in keys if not overridable(k)]
    if refused:
        raise CheckpointError(
            f"resume={resume!r} continues the run with its own config.yaml, so {', '.join(refused)} cannot be "
            f"changed on the command line; only {', '.join(RESUME_OVERRIDABLE)} may be (start a new run to change "
            f"anything else).")
    for key in keys:
        src, dst = composed, saved
        *parents, leaf = key.split(".")
        for p in parents:
            src = src[p]
            dst = dst.setdefault(p, {})
        dst[leaf] = src[leaf]
    saved["resume"] = None
    return run_dir, saved
