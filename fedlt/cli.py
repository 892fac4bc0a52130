"""Console entry points. ``fedlt`` is a Hydra app over ``configs/``: any option can be overridden on the
command line (``fedlt strategy=fedprox num_rounds=20``), ``fedlt --help`` lists the config groups."""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = os.environ.get("FEDLT_CONFIG_DIR") or str(Path(__file__).resolve().parent.parent / "configs")
USER_ERRORS: tuple[type[BaseException], ...] = ()


def user_errors() -> tuple[type[BaseException], ...]:
    from fedlt.config import ConfigError
    from fedlt.data.partition import PartitionError
    from fedlt.data.sources import DataError
    from fedlt.federation.checkpoint import CheckpointError

    return (ConfigError, DataError, PartitionError, CheckpointError)


def fail(message: str, run_dir: Path | None = None, fresh: bool = False, code: int = 2) -> None:
    """One paragraph on stderr, a non-zero exit, no traceback; a run directory this call created is removed
    so nothing half-written looks like a run."""
    if run_dir is not None and fresh and run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"fedlt: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def write_config(run_dir: Path, plain: dict) -> None:
    from fedlt.federation.checkpoint import write_config_yaml

    write_config_yaml(run_dir, plain)


class _HeldStderr:
    """Hydra's own errors (an unknown key, a missing config group) are printed by Hydra on stderr, over several
    lines, before fedlt's code runs. ``main`` holds stderr back until the run starts, and turns such an error
    into fedlt's one-paragraph form (exit 2)."""

    def __init__(self) -> None:
        self.real = sys.stderr
        self.buffer = io.StringIO()
        self.held = False

    def hold(self) -> None:
        self.real, self.held = sys.stderr, True
        sys.stderr = self.buffer

    def release(self) -> str:
        """Back to the real stderr; retarget logging handlers created meanwhile; return what was held."""
        if not self.held:
            return ""
        self.held = False
        sys.stderr = self.real
        for ref in logging._handlerList:  # noqa: SLF001 -- handlers Hydra built while stderr was held
            h = ref()
            if isinstance(h, logging.StreamHandler) and h.stream is self.buffer:
                h.setStream(self.real)
        text, self.buffer = self.buffer.getvalue(), io.StringIO()
        return text


_STDERR = _HeldStderr()


def main() -> None:
    """The ``fedlt`` console script."""
    _STDERR.hold()
    try:
        hydra_main()
    except SystemExit as e:
        held = _STDERR.release()
        if e.code not in (0, None) and held.strip() and "fedlt: error:" not in held:
            held = held.split("Config search path")[0]  # Hydra's search-path dump is noise to a user
            noise = ("full_key:", "object_type=")
            lines = [ln.strip() for ln in held.splitlines()
                     if ln.strip() and not ln.strip().startswith(noise) and "HYDRA_FULL_ERROR" not in ln]
            print(f"fedlt: error: {' '.join(lines)}", file=sys.stderr, flush=True)
            sys.exit(2)
        sys.stderr.write(held)
        raise
    finally:
        sys.stderr.write(_STDERR.release())


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    sys.stderr.write(_STDERR.release())

    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    fresh = not any(run_dir.iterdir()) if run_dir.exists() else True
    errors = user_errors()
    resume = cfg.get("resume")
    try:
        from fedlt.config import validate

        if resume:  # continue RUN_DIR with its own config.yaml (fedlt.federation.checkpoint.resume_config)
            from fedlt.federation.checkpoint import resume_config

            resume_dir, plain = resume_config(str(resume), list(HydraConfig.get().overrides.task), to_dict(cfg))
            plain = validate(plain)
        else:
            plain = validate(to_dict(cfg))
    except errors as e:
        fail(str(e), run_dir, fresh)
    except Exception as e:  # OmegaConf interpolation / missing values are user errors too
        fail(f"the configuration could not be resolved: {e}", run_dir, fresh)
    if resume:
        if fresh and run_dir != resume_dir:
            shutil.rmtree(run_dir, ignore_errors=True)  # the directory Hydra made for this invocation
        run_dir, fresh = resume_dir, False  # config.yaml is rewritten by run() once the checkpoint is accepted
    else:
        write_config(run_dir, plain)
    from fedlt.federation.ray_backend import BackendError
    from fedlt.federation.simulation import Interrupted, RunFailed, run

    try:
        results = run(plain, run_dir, resume=bool(resume))
    except errors as e:
        fail(str(e), run_dir, fresh)
    except BackendError as e:
        fail(str(e), run_dir, fresh, code=1)
    except Interrupted as e:
        print(f"fedlt: stopped after round {e.last_round} of {plain['num_rounds']}; the checkpoint is in "
              f"{run_dir / 'checkpoints'}. Continue with: fedlt resume={run_dir}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except RunFailed as e:
        cause = e.args[0]
        print(f"fedlt: error: the run stopped: {type(cause).__name__}: {cause}. What was written so far is in "
              f"{run_dir}; `fedlt resume={run_dir}` continues from its newest checkpoint.", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(1)  # a failed Flower/Ray run can leave non-daemon threads behind (flower-notes.md pitfall 5)
    g, p = results.get("generic/accuracy"), results.get("personalized/accuracy")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"generic/accuracy: {fmt(g)}  personalized/accuracy: {fmt(p)}  "
          f"rounds: {results['rounds_completed']}  wall: {results['time/wall_s']:.1f} s")
    print(f"run_dir: {run_dir}", flush=True)
