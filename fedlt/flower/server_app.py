"""The Flower ServerApp: builds the algorithm's server side and runs fedlt's round loop over Flower's Grid."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlt.core.checkpoint import Checkpointer
from fedlt.core.client_step import configure_torch
from fedlt.core.rounds import RunOutcome, run_rounds
from fedlt.data.federated import DataPlan
from fedlt.flower.ray_backend import actor_count
from strategies import get_strategy


def make_server_app(cfg: dict, plan: DataPlan, logger_factory, outcome: RunOutcome,
                    checkpointer: Checkpointer | None = None, on_end=None) -> ServerApp:
    """``on_end``: called when the round loop is over, whatever the reason (before Flower shuts Ray down)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        configure_torch({**cfg["backend"], "torch_threads": cfg["backend"].get("server_threads") or 1})
        strategy = get_strategy(cfg["strategy"]["name"])(cfg)
        outcome.strategy = strategy
        logger = logger_factory()
        try:
            run_rounds(strategy, grid, cfg, plan, logger, outcome, checkpointer, actors=actor_count(cfg))
        except BaseException as e:  # surfaced by the driver; the simulation must not hang on it
            outcome.error = e
            raise
        finally:
            if on_end is not None:
                on_end()
            logger.close()

    return app
