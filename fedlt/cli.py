"""Console entry points. ``fedlt`` is a Hydra app over ``configs/``: any option can be overridden on the
command line (``fedlt strategy=fedprox num_rounds=20``), ``fedlt --help`` lists the config groups."""

from __future__ import annotations

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
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(plain)))
    os.replace(tmp, run_dir / "config.yaml")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

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
        run_dir, fresh = resume_dir, False
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
