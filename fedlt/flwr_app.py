"""The same ServerApp/ClientApp as ``fedlt``'s simulation, for ``flwr run`` and Flower's Deployment Engine.

``pyproject.toml`` names these two objects in ``[tool.flwr.app.components]``. Their configuration comes from
``context.run_config`` (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``):

* ``fedlt-overrides`` -- Hydra overrides, exactly as on the ``fedlt`` command line (e.g.
  ``"experiment=smoke strategy=fedprox num_clients=2"``); composed with ``configs/`` and validated as ``fedlt``
  does, on the server and on every client (same config, same seed -> the same split everywhere);
* ``run-dir`` -- where the ServerApp writes config.yaml, partition.json, metrics.jsonl, results.json and tb/
  (empty: ``runs/flwr/<run id>`` under the ServerApp's working directory).

Each SuperNode is one client: ``--node-config "partition-id=<client id> num-partitions=<num_clients>"``.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

_CONFIGS: dict[str, tuple[dict, object]] = {}


def config_from_run(run_config) -> dict:
    """The validated fedlt config for a run's ``fedlt-overrides``."""
    from fedlt.compose import compose

    return compose(shlex.split(str(run_config.get("fedlt-overrides", "") or "")), job_name="flwr-run")


def _client_app_of(run_config) -> ClientApp:
    """The fedlt ClientApp for this run config, built once per process (data prepared from the local cache)."""
    key = str(run_config.get("fedlt-overrides", "") or "")
    if key not in _CONFIGS:
        from fedlt.data.federated import prepare
        from fedlt.flower.client_app import make_client_app

        cfg = config_from_run(run_config)
        plan, _, _ = prepare(cfg)
        _CONFIGS[key] = (cfg, make_client_app(cfg, plan))
    return _CONFIGS[key][1]


class RunConfiguredClientApp(ClientApp):
    """Dispatches every message to fedlt's ClientApp built from ``context.run_config``."""

    def __call__(self, message: Message, context: Context) -> Message:
        return _client_app_of(context.run_config)(message=message, context=context)


client_app = RunConfiguredClientApp()
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from omegaconf import OmegaConf

    from fedlt.core.rounds import RunOutcome
    from fedlt.data.federated import server_set_summary
    from fedlt.experiment import final_results, prepare_run
    from fedlt.flower.server_app import make_server_app
    from fedlt.flower.simulation import quiet_flower
    from fedlt.runlog import RunLogger, write_json_atomic

    t0 = time.monotonic()
    cfg = config_from_run(context.run_config)
    quiet_flower(cfg.get("log_level", "WARNING"))
    run_dir = Path(str(context.run_config.get("run-dir", "") or f"runs/flwr/{context.run_id}")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    plan, split, source = prepare_run(cfg, run_dir)
    extra = {"server_data": server_set_summary(split, source)} if len(split.server_indices) else {}
    outcome = RunOutcome()
    inner = make_server_app(cfg, plan, lambda: RunLogger(run_dir, int(cfg["num_rounds"]), progress=False), outcome)
    t_fed = time.monotonic()
    inner(grid=grid, context=context)
    results = final_results(cfg, outcome, time.monotonic() - t0, time.monotonic() - t_fed, extra)
    write_json_atomic(run_dir / "results.json", results)
    print(f"run_dir: {run_dir}", flush=True)
