"""Server side: a Flower message-based strategy (``flwr.serverapp.strategy.FedAvg`` subclass) plus the round
loop that drives it.

Why fedlt runs its own loop instead of ``Strategy.start``: a Fed-LT run needs seeded client sampling that does
not depend on node ids, evaluation every ``eval.every`` rounds over ALL clients, sending frozen arrays once,
rejection of failed or non-finite updates, per-round logging and starting from a checkpointed round. The loop
still calls the strategy's own ``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` hooks, so an
algorithm that is a Flower strategy (FedAvg, FedProx, FedAdam, ...) keeps Flower's aggregation code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlt.eval.generic import GenericEvaluation
from fedlt.eval.personalized import personalized_metrics
from fedlt.eval.predict import predict_logits
from fedlt.federation.algorithm import ClientAlgorithm, Predictor
from fedlt.federation.failures import describe
from fedlt.seeding import SAMPLE, numpy_rng


def has_prefix(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


class FedLTStrategy(FedAvg):
    """FedAvg's server side with fedlt's hooks. Override in an algorithm file:

    * ``client_cls`` -- the client side (a :class:`ClientAlgorithm` subclass).
    * ``flower_kwargs()`` -- extra constructor arguments for a Flower base class (e.g. FedAdam's ``eta``).
    * ``train_config(server_round)`` -- extra values sent to the sampled clients with the global arrays.
    * ``frozen_arrays(model)`` -- arrays built once on the server and sent once to each client.
    * ``aggregate_train(server_round, replies)`` -- Flower's hook; default: sample-weighted average.
    * ``after_aggregate(server_round, arrays, replies)`` -- server-side step after averaging (e.g. CReFF).
    * ``generic_predictors(model)`` -- the generic model(s) evaluated on the balanced test set; first = primary.
    * ``server_state()`` / ``load_server_state(state)`` -- strategy state that checkpoints must carry.
    """

    client_cls: type[ClientAlgorithm] = ClientAlgorithm

    def __init__(self, cfg: dict):
        self.cfg = cfg
        super().__init__(
            fraction_train=float(cfg["participation"]), fraction_evaluate=1.0, min_train_nodes=1,
            min_evaluate_nodes=1, min_available_nodes=int(cfg["num_clients"]), **self.flower_kwargs(),
        )
        self.node_of_client: dict[int, int] = {}
        self.clients_with_frozen: set[int] = set()
        self.frozen: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ hooks
    def flower_kwargs(self) -> dict:
        return {}

    def train_config(self, server_round: int) -> dict:
        return {}

    def frozen_arrays(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        sd = model.state_dict()
        return {k: v.detach().clone() for k, v in sd.items() if has_prefix(k, self.client_cls.frozen_prefixes)}

    def after_aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        return arrays

    def generic_predictors(self, model: torch.nn.Module) -> dict[str, Predictor]:
        model.eval()
        return {"model": model}

    def server_state(self) -> dict:
        return {}

    def load_server_state(self, state: dict) -> None:
        pass

    # -------------------------------------------------------------------------------- what travels
    def is_shared(self, key: str) -> bool:
        c = self.client_cls
        return not has_prefix(key, c.personal_prefixes) and not has_prefix(key, c.frozen_prefixes)

    def initial_arrays(self, model: torch.nn.Module) -> ArrayRecord:
        self.frozen = self.frozen_arrays(model)
        return ArrayRecord({k: v.detach().clone() for k, v in model.state_dict().items() if self.is_shared(k)})

    # ------------------------------------------------------------------------------------- sampling
    def sample_clients(self, server_round: int) -> list[int]:
        """Uniform sample without replacement of max(int(participation * N), 1) client ids, from a stream
        derived from (seed, round): independent of node ids, actor count and history."""
        n = int(self.cfg["num_clients"])
        m = max(int(float(self.cfg["participation"]) * n), 1)
        rng = numpy_rng(int(self.cfg["seed"]), SAMPLE, server_round)
        return sorted(int(c) for c in rng.choice(n, size=m, replace=False))

    # ------------------------------------------------------------------------------------- messages
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        clients = self.sample_clients(server_round)
        cfg = ConfigRecord({**dict(config), "server-round": server_round, **self.train_config(server_round)})
        return [self._message(c, arrays, cfg, MessageType.TRAIN) for c in clients]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        cfg = ConfigRecord({**dict(config), "server-round": server_round})
        return [self._message(c, arrays, cfg, MessageType.EVALUATE) for c in sorted(self.node_of_client)]

    def _message(self, client: int, arrays: ArrayRecord, cfg: ConfigRecord, kind: str) -> Message:
        content = RecordDict({"arrays": arrays, "config": cfg})
        if self.frozen and client not in self.clients_with_frozen:
            content["frozen"] = ArrayRecord(self.frozen)
            self.clients_with_frozen.add(client)
        return Message(content=content, dst_node_id=self.node_of_client[client], message_type=kind)

    def discover_clients(self, grid: Grid, timeout: float) -> None:
        """Ask every node once for its client id (partition-id), so sampling can be by client id."""
        n = int(self.cfg["num_clients"])
        deadline = time.monotonic() + timeout
        while len(node_ids := list(grid.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(node_ids)} of {n} client nodes connected within {timeout:.0f} s")
            time.sleep(0.2)
        msgs = [Message(content=RecordDict({"config": ConfigRecord({"query": "client-id"})}), dst_node_id=nid,
                        message_type=MessageType.QUERY) for nid in node_ids]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if reply.has_error():
                raise RuntimeError(f"client node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
            cid = int(reply.content["metrics"]["client-id"])
            self.node_of_client[cid] = reply.metadata.src_node_id
        missing = sorted(set(range(n)) - set(self.node_of_client))
        if missing:
            raise RuntimeError(f"no node answered for clients {missing[:10]}")

    # ----------------------------------------------------------------------------------- replies
    @staticmethod
    def client_of(reply: Message) -> int:
        return int(next(iter(reply.content.metric_records.values()))["client-id"])

    def split_replies(self, replies: Iterable[Message]) -> tuple[list[Message], list[dict]]:
        """Keep replies without errors and with finite arrays, sorted by client id (a fixed summation order
        makes the average bitwise reproducible); return the rest as failure records."""
        ok, failures = [], []
        node_to_client = {v: k for k, v in self.node_of_client.items()}
        for r in replies:
            cid = node_to_client.get(r.metadata.src_node_id, -1)
            if r.has_error():
                failures.append({"client": cid, "reason": describe(str(r.error.reason))})
                continue
            bad = [k for rec in r.content.array_records.values() for k, a in rec.items()
                   if np.issubdtype(a.numpy().dtype, np.floating) and not np.isfinite(a.numpy()).all()]
            if bad:
                failures.append({"client": cid, "reason": f"non-finite update in {bad[:3]} (rejected)"})
                continue
            ok.append(r)
        ok.sort(key=self.client_of)
        return ok, failures

    @staticmethod
    def merge(old: ArrayRecord, new: ArrayRecord | None) -> ArrayRecord:
        """Aggregated keys replace the old ones; keys no client returned keep their value; dtypes are kept
        (Flower's average turns integer buffers such as BatchNorm's counter into floats)."""
        if new is None:
            return old
        out = {}
        for k, a in old.items():
            if k in new:
                v = new[k].numpy()
                out[k] = Array(np.asarray(np.round(v) if np.issubdtype(a.numpy().dtype, np.integer) else v,
                                          dtype=a.numpy().dtype))
            else:
                out[k] = a
        return ArrayRecord(out)

    # ---------------------------------------------------------------------------------- evaluation
    def personalized_metrics(self, replies: list[Message], mask_default: bool) -> tuple[dict, dict]:
        """Per-client records -> personalized metrics for every predictor, masked and unmasked (mean over ALL
        responding clients, unweighted, plus spread; see fedlt.eval.personalized). Returns (scalars, detail)."""
        records = [dict(next(iter(r.content.metric_records.values()))) for r in replies]
        return personalized_metrics(records, mask_default)

    def generic_metrics(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                        batch_size: int, evaluation: GenericEvaluation | None = None) -> tuple[dict, dict]:
        """Every generic predictor on the balanced test set (see fedlt.eval.generic)."""
        evaluation = evaluation or GenericEvaluation(y, num_classes)
        predictors = self.generic_predictors(model)

        def logits():
            for name, fn in predictors.items():
                with torch.no_grad():
                    yield name, predict_logits(fn, x, batch_size)

        return evaluation.evaluate(logits(), several=len(predictors) > 1)


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
