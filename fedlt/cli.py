"""Console entry points. ``fedlt`` is a Hydra app over ``configs/``: any option can be overridden on the
command line (``fedlt strategy=fedprox num_rounds=20``), ``fedlt --help`` lists the config groups."""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fedlt.compose import CONFIG_DIR


def user_errors() -> tuple[type[BaseException], ...]:
    from fedlt.config import ConfigError
    from fedlt.core.checkpoint import CheckpointError
    from fedlt.data.partition import PartitionError
    from fedlt.data.sources import DataError
    from fedlt.rundir import RunDirError

    return (ConfigError, DataError, PartitionError, CheckpointError, RunDirError)


def fail(message: str, code: int = 2) -> None:
    """One paragraph on stderr, a non-zero exit, no traceback."""
    print(f"fedlt: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def _given_run_dir() -> Path | None:
    """The folder named by ``hydra.run.dir=`` on the command line, if any (read before Hydra creates it)."""
    for arg in sys.argv[1:]:
        if arg.startswith("hydra.run.dir="):
            return Path(os.path.expanduser(arg.split("=", 1)[1])).resolve()
    return None


_GIVEN: list = [None, False]  # (the hydra.run.dir of this invocation, whether it existed before Hydra made it)


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


def describe_options() -> str:
    """``fedlt --help``: every option with its default and its documentation, read from the commented YAML
    files that define them (configs/config.yaml and each group's files), so the text lives in one place."""
    root = Path(CONFIG_DIR)
    out = ["fedlt: federated long-tailed learning on Flower + Ray. Override any option as key=value, choose a",
           "group entry as group=name (e.g. `fedlt strategy=fedprox strategy.mu=0.01 num_rounds=20`), a preset as",
           "experiment=NAME. Hydra's own help: `fedlt --hydra-help`.", "", "== Options (configs/config.yaml) =="]
    text = (root / "config.yaml").read_text().split("\nhydra:")[0]
    out += [line for line in text.splitlines() if line.strip()]
    out += ["", "== Config groups (group=name; each file documents its options) =="]
    for group in sorted(d for d in root.iterdir() if d.is_dir()):
        out.append(f"{group.name}:")
        for f in sorted(group.glob("*.yaml")):
            lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
            doc = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#") and "@package" not in ln), "")
            out.append(f"  {f.stem:<34} {doc[:150]}")
            out += [f"      {ln}" for ln in lines if not ln.startswith(("#", "defaults", "  -", "name:"))
                    and group.name != "experiment"]
    return "\n".join(out)


def check_sweep(argv: list[str]) -> None:
    """``fedlt -m``: compose and validate every job of the sweep before the first one starts, so a bad value in
    job 7 is refused now, naming the job, instead of after six finished runs. Uses Hydra's own override parser
    and the basic sweeper's expansion (the jobs Hydra will run, in its order)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fedlt.compose import compose_resolved
    from fedlt.validate import validate

    overrides = [a for a in argv if a not in ("-m", "--multirun") and not a.startswith("hydra.")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 -- Hydra reports syntax errors itself, in its own words
        return
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    if len(jobs) < 2:
        return
    errors = user_errors()
    for number, job in enumerate(jobs):
        try:
            validate(compose_resolved(job, job_name="fedlt-sweep-check"))
        except errors as e:
            fail(f"sweep job #{number} ({' '.join(job)}) would be refused, so no job was started: {e}")
        except Exception as e:  # noqa: BLE001 -- interpolation / composition errors are user errors too
            fail(f"sweep job #{number} ({' '.join(job)}) cannot be composed, so no job was started: "
                 f"{' '.join(str(e).split('Config search path')[0].split())}")


def main() -> None:
    """The ``fedlt`` console script."""
    if any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        check_sweep(sys.argv[1:])
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        try:
            print(describe_options(), flush=True)
        except BrokenPipeError:  # `fedlt --help | head`
            sys.stdout = None
        return
    given = _given_run_dir()
    _GIVEN[:] = [given, given is not None and given.exists()]
    from fedlt import rundir  # noqa: F401 -- rundir.STARTED is this command's start: before Hydra makes the folder
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

    from fedlt import rundir

    sys.stderr.write(_STDERR.release())
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    existed = _GIVEN[1] if run_dir == _GIVEN[0] else False
    errors = user_errors()
    resume = cfg.get("resume")

    def give_up(message: str, code: int = 2) -> None:
        if not resume:
            rundir.remove_created(run_dir, existed, ours=claimed)
        elif run_dir != resume_dir:
            rundir.remove_created(run_dir, False, ours=False)  # the folder Hydra made for this invocation
        fail(message, code)

    resume_dir, claimed = None, False
    try:
        from fedlt.validate import validate

        if resume:  # continue RUN_DIR with its own config.yaml (fedlt.rundir.resume_config)
            resume_dir, plain = rundir.resume_config(str(resume), list(HydraConfig.get().overrides.task),
                                                     to_dict(cfg))
            plain = validate(plain)
        else:
            rundir.claim_new(run_dir)
            claimed = True
            plain = validate(to_dict(cfg))
    except errors as e:
        give_up(str(e))
    except Exception as e:  # OmegaConf interpolation / missing values are user errors too
        key = getattr(e, "full_key", None)  # OmegaConf's errors name the option they failed on
        why = str(getattr(e, "msg", None) or e).strip().splitlines()[0]
        give_up(f"the configuration could not be resolved{f' at {key}' if key else ''}: {why} (check the "
                f"${{...}} interpolations of that option).")
    if resume:
        if run_dir != resume_dir:
            rundir.remove_created(run_dir, False, ours=False)  # the folder Hydra made for this invocation
        run_dir = resume_dir  # config.yaml is rewritten once the checkpoint is accepted and Ray runs
    from fedlt.core.checkpoint import write_config_yaml
    from fedlt.experiment import Interrupted, RunFailed, run
    from fedlt.flower.ray_backend import BackendError

    try:
        lock = rundir.RunLock(run_dir).acquire()
    except errors as e:
        fail(str(e))
    try:
        if not resume:
            write_config_yaml(run_dir, plain)
        results = run(plain, run_dir, resume=bool(resume))
    except errors as e:
        lock.release()
        give_up(str(e))
    except BackendError as e:
        lock.release()
        give_up(str(e), code=1)
    except Interrupted as e:
        lock.release()
        print(f"fedlt: stopped after round {e.last_round} of {plain['num_rounds']}; the checkpoint is in "
              f"{run_dir / 'checkpoints'}. Continue with: fedlt resume={run_dir}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except RunFailed as e:
        lock.release()
        cause = e.args[0]
        print(f"fedlt: error: the run stopped: {type(cause).__name__}: {cause}. What was written so far is in "
              f"{run_dir}; `fedlt resume={run_dir}` continues from its newest checkpoint.", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(1)  # a failed Flower/Ray run can leave non-daemon threads behind
    lock.release()
    g, p = results.get("generic/accuracy"), results.get("personalized/accuracy")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"generic/accuracy: {fmt(g)}  personalized/accuracy: {fmt(p)}  "
          f"rounds: {results['rounds_completed']}  wall: {results['time/wall_s']:.1f} s")
    print(f"run_dir: {run_dir}", flush=True)
