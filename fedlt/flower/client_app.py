"""The Flower ClientApp: registers fedlt's one client step (:mod:`fedlt.core.client_step`) for each message type.

Flower's Ray backend ships the app object with every message; :class:`FedltClientApp` pickles by reference
(the config and a token), and each actor process rebuilds the app once (:func:`client_app_for`), then its
:class:`~fedlt.core.client_step.ClientRuntime` on the first message."""

from __future__ import annotations

import hashlib
import json

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlt.core import client_step
from fedlt.core.client_step import COHORT
from fedlt.data.federated import DataPlan
from strategies import get_strategy


class FedltClientApp(ClientApp):
    """A ClientApp that pickles by reference: pickled by value it is ~8 KB of closures re-serialised per message."""

    def __init__(self, token: str, cfg: dict, plan: DataPlan):
        super().__init__()
        self.fedlt_args = (token, cfg, plan)

    def __reduce__(self):
        return (client_app_for, self.fedlt_args)


_APPS: dict[str, ClientApp] = {}


def client_app_for(token: str, cfg: dict, plan: DataPlan) -> ClientApp:
    app = _APPS.get(token)
    if app is None:
        app = _APPS[token] = make_client_app(cfg, plan)
    return app


def make_client_app(cfg: dict, plan: DataPlan) -> ClientApp:
    token = hashlib.sha256(json.dumps([cfg, list(vars(plan).values())], sort_keys=True, default=str).encode())
    app = FedltClientApp(token.hexdigest(), cfg, plan)
    client_cls = get_strategy(cfg["strategy"]["name"]).client_cls

    def rt():
        return client_step.runtime(cfg, plan, client_cls)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return client_step.query(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return client_step.train(rt(), msg, context)

    @app.train(COHORT)
    def train_cohort(msg: Message, context: Context) -> Message:
        return client_step.train_cohort_message(rt(), msg, context)

    @app.train("secagg")  # privacy.secagg: setup, share keys and unmask (fedlt.privacy.secagg)
    def secagg_stage(msg: Message, context: Context) -> Message:
        return client_step.secagg_stage(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return client_step.evaluate(rt(), msg, context)

    return app
