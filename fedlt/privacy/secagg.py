"""Secure aggregation (``privacy.secagg=true``): SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead"), the protocol Flower implements, built from Flower's own building blocks
(``flwr.common.secure_aggregation``: ``crypto.shamir``, ``crypto.symmetric_encryption``, ``quantization``,
``secaggplus_utils``; ECDH key pairs from ``flwr.supercore.primitives.asymmetric``) and driven by fedlt's round loop
(:func:`fedlt.core.rounds.run_rounds`) over ordinary Flower Messages through the Grid (Ray simulation, in-process
grid, deployment). Checked against flwr 1.42.0 (installed): ``flwr/server/workflow/secure_aggregation/
secaggplus_workflow.py`` (stage order, share counts, neighbour ring, unmasking) and ``flwr/client/mod/
secure_aggregation/secaggplus_mod.py`` (client stages, checks, quantization and masking). Flower's
``SecAggPlusWorkflow`` itself cannot be used: it runs its own stages from a ``LegacyContext`` and calls a legacy
``Strategy.configure_fit`` / ``aggregate_fit`` with ``FitIns`` / ``FitRes``, while fedlt's loop samples by client
id, sends its own train messages and aggregates through ``ServerAlgorithm`` hooks.

One training round, for the sampled clients (ids are fedlt client ids, which both sides know):

0. setup (message type ``train.secagg``): the server sends the share count and threshold; each client makes two
   ECDH key pairs (sk1/pk1 for pairwise masks, sk2/pk2 for encrypting shares) and returns the public keys.
1. share keys: the server relays to each client the public keys of its neighbours (a seeded ring of ``share_num``
   clients, itself included); the client draws its self-mask seed b, Shamir-splits b and sk1 (threshold t), and
   encrypts each neighbour's pair of shares with the key it shares with that neighbour (sk2 x pk2).
2. collect masked vectors: the ordinary ``train`` message, plus the ciphertexts addressed to the client (the
   server relays them, it cannot read them). The client decrypts and keeps its shares, runs THE one client step
   (:func:`fedlt.core.client_step.train`; privacy's clipping/noise included), then uploads only
   ``[weight, unclipped bit, clipped-entry count, quantized weighted update] + PRG(b) +/- PRG(sk1 x pk1_j)`` mod
   2^32 (plus the metrics every train reply has).
3. unmask: each client that uploaded returns its shares of b for the neighbours that uploaded and of sk1 for the
   neighbours that shared keys but did not upload; the server reconstructs (Shamir), removes the self masks and
   the dropped clients' pairwise masks, dequantizes, and releases sent + sum / total weight as ONE reply to the
   strategy (``privacy=dp_central``: the sum of clipped updates goes to :meth:`RunPrivacy.release`, which adds the
   noise to the SUM). A client lost after stage 1 is tolerated while every needed secret keeps ``t`` live share
   holders; otherwise the round fails (one failure sentence) and its updates are dropped.

Client secrets live between stages in the node's ``context.state`` (record ``fedlt.secagg``), where Flower's
``secaggplus_mod`` keeps them too, never in fedlt's server-held client state; they are deleted after unmasking.

Deviations from Flower, and why:

* The update, not the model, is quantized: ``ratio * (w_k - w_sent)``, ratio = q/T with q = round(n_k / max_weight
  * T) (Flower's weighting of ``[w, w * params]``); under ``dp_central`` ratio = 1 (DP-FedAvg sums clipped updates
  with equal weight). The unmasked sum / sum of ratios is then fedlt's plain sample-weighted aggregate minus sent.
  max_weight defaults to the largest client's training set (Flower: 1000, which clips the weighted updates of
  clients with thousands of images at the clipping range).
* Stochastic rounding draws from a stream seeded by (seed, round, client) instead of the global NumPy RNG, so runs
  are reproducible (the masks cancel exactly, so the aggregate does not depend on them).
* Neighbours come from a ring shuffled by a seeded stream (Flower: ``random.shuffle``); the ids are client ids.
* Two integer counters ride in the masked vector: the "norm <= C" bit of adaptive clipping (Flower's DP sends it in
  the clear) and the number of entries the clipping range cut (a diagnostic, ``secagg/clipped_fraction``).
* Dropouts: only clients that completed "share keys" and then failed are unmasked with their sk1, and only their
  masks with clients that uploaded are removed (Flower removes masks with every neighbour and asks for sk1 shares
  of clients whose shares were never relayed). A client whose update is not finite raises (a dropout) instead of
  uploading garbage the server could not detect. Integer buffers keep the server's value.
* Masks come from Flower's ``pseudo_rand_gen``, which XOR-folds the 32-byte seed into a 32-bit NumPy
  ``RandomState`` seed: as in Flower, a mask has 32 bits of entropy (a limit of that building block).
* ``dp_central``: the server cannot re-clip an update it never sees; the sensitivity rests on the clients'
  clipping, and stochastic rounding may add up to step * sqrt(d) (step = 2 * clipping_range / T) to a client's
  clipped update (about 1e-3 * C for the smoke CNN), which the accountant does not include.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import Stage
from flwr.common.secure_aggregation.secaggplus_utils import (pseudo_rand_gen, share_keys_plaintext_concat,
                                                             share_keys_plaintext_separate)
from flwr.supercore.primitives.asymmetric import (bytes_to_private_key, bytes_to_public_key, generate_key_pairs,
                                                  private_key_to_bytes, public_key_to_bytes)

from fedlt.privacy.params import CENTRAL
from fedlt.seeding import PRIVACY, numpy_rng

SECAGG = "fedlt.secagg"  # message record (a stage's config / reply) and context.state record (client secrets)
STAGE_MESSAGE = f"{MessageType.TRAIN}.secagg"  # message type of setup, share keys and unmask
MASKED = "secagg-masked"  # the only array of a train reply under secure aggregation
MODULUS = 2**32  # Flower's default modulus_range
HEADER = 3  # integer entries before the update: weight q, unclipped bit, clipped-entry count
STREAM = 0x53454341  # seeding stream ("SECA"): neighbour ring and stochastic rounding
log = logging.getLogger("fedlt")


# ------------------------------------------------------------------------------------------ shared
def share_counts(n: int, share_fraction: float, threshold_fraction: float) -> tuple[int, int]:
    """(shares per client, reconstruction threshold) for n sampled clients: Flower's rule for float values."""
    shares = round(share_fraction * n)
    if shares < n and shares % 2 == 0:
        shares += 1
    if shares <= 2:
        shares = n
    return shares, max(round(threshold_fraction * shares), 2)


def neighbours(clients: list[int], shares: int, rng: np.random.Generator) -> dict[int, set[int]]:
    """Each client's neighbours (itself included): ``shares // 2`` on each side of it in a shuffled ring."""
    ring = [clients[i] for i in rng.permutation(len(clients))]
    half = shares // 2
    return {c: {ring[(i + o) % len(ring)] for o in range(-half, half + 1)} for i, c in enumerate(ring)}


def float_keys(sent: ArrayRecord) -> list[str]:
    return sorted(k for k, a in sent.items() if np.issubdtype(a.numpy().dtype, np.floating))


def prg(seed: bytes, length: int) -> np.ndarray:
    return pseudo_rand_gen(seed, MODULUS, [(length,)])[0]


def pairwise_mask(sk1: bytes, pk1: bytes, length: int) -> np.ndarray:
    return prg(generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(pk1)), length)


# ------------------------------------------------------------------------------------------ client
def _load(state: RecordDict, rnd: int, stage: str) -> dict:
    if SECAGG not in state or int(state[SECAGG]["round"]) != rnd:
        raise RuntimeError(f"secure aggregation: {stage} stage of round {rnd} without this round's setup")
    return dict(state[SECAGG])


def client_stage(content: RecordDict, state: RecordDict, cid: int) -> RecordDict:
    """Setup, share keys or unmask (a ``train.secagg`` message); secrets are kept in ``state``."""
    cfg = content[SECAGG]
    stage, rnd = str(cfg["stage"]), int(cfg["round"])
    if stage == Stage.SETUP:
        (sk1, pk1), (sk2, pk2) = generate_key_pairs(), generate_key_pairs()
        secrets = {"round": rnd, "threshold": int(cfg["threshold"]), "shares": int(cfg["shares"]),
                   "sk1": private_key_to_bytes(sk1), "sk2": private_key_to_bytes(sk2)}
        reply = {"pk1": public_key_to_bytes(pk1), "pk2": public_key_to_bytes(pk2)}
    elif stage == Stage.SHARE_KEYS:
        secrets = _load(state, rnd, stage)
        reply = _share_keys(secrets, cfg, cid)
    elif stage == Stage.UNMASK:
        secrets = _load(state, rnd, stage)
        active, dead = [int(c) for c in cfg["active"]], [int(c) for c in cfg["dead"]]
        if len(active) < secrets["threshold"] or set(active) & set(dead):
            raise ValueError(f"secure aggregation: refusing to unmask with {len(active)} live neighbours (threshold "
                             f"{secrets['threshold']}) or with clients listed as both live and dropped")
        b_shares = dict(zip(secrets["share-ids"], secrets["b-shares"], strict=True))
        sk_shares = dict(zip(secrets["share-ids"], secrets["sk1-shares"], strict=True))
        reply = {"ids": active + dead, "shares": [b_shares[c] for c in active] + [sk_shares[c] for c in dead]}
        secrets = None  # used up: never reveal anything of this round again
    else:
        raise ValueError(f"secure aggregation: unknown stage {stage!r}")
    if secrets is None:
        del state[SECAGG]
    else:
        state[SECAGG] = ConfigRecord(secrets)
    return RecordDict({SECAGG: ConfigRecord(reply), "metrics": MetricRecord({"client-id": cid})})


def _share_keys(secrets: dict, cfg: ConfigRecord, cid: int) -> dict:
    ids, pk1s, pk2s = [int(c) for c in cfg["ids"]], list(cfg["pk1"]), list(cfg["pk2"])
    if len(ids) < secrets["threshold"]:
        raise ValueError(f"secure aggregation: {len(ids)} neighbours, fewer than the threshold {secrets['threshold']}")
    if len(set(pk1s + pk2s)) != 2 * len(ids) or cid not in ids:
        raise ValueError("secure aggregation: repeated public keys, or this client missing from its neighbours")
    seed = os.urandom(32)  # the self mask's seed b
    b_shares = create_shares(seed, secrets["threshold"], secrets["shares"])
    sk1_shares = create_shares(secrets["sk1"], secrets["threshold"], secrets["shares"])
    dsts, ctxts = [], []
    for i, (c, pk2) in enumerate(zip(ids, pk2s, strict=True)):
        if c == cid:
            secrets.update({"share-ids": [cid], "b-shares": [b_shares[i]], "sk1-shares": [sk1_shares[i]]})
            continue
        key = generate_shared_key(bytes_to_private_key(secrets["sk2"]), bytes_to_public_key(pk2))
        dsts.append(c)
        ctxts.append(encrypt(key, share_keys_plaintext_concat(cid, c, b_shares[i], sk1_shares[i])))
    secrets.update({"seed": seed, "ids": ids, "pk1": pk1s, "pk2": pk2s})
    return {"dsts": dsts, "ctxts": ctxts}


def masked_upload(state: RecordDict, cfg: ConfigRecord, sent: ArrayRecord, shared: dict[str, torch.Tensor],
                  num_examples: int, unclipped: float | None, seed: int, cid: int) -> np.ndarray:
    """Stage 2 on the client, after its training: keep the shares relayed to it, then return its masked vector
    (the only array it uploads). ``unclipped``: adaptive clipping's bit, summed securely."""
    rnd = int(cfg["round"])
    extra = sorted(set(shared) - set(sent.keys()))
    if extra:
        raise ValueError(f"secure aggregation sums the model arrays the server sent; {extra[:3]} cannot be uploaded")
    secrets = _load(state, rnd, Stage.COLLECT_MASKED_VECTORS)
    srcs, ctxts = [int(c) for c in cfg["srcs"]], list(cfg["ctxts"])
    if len(srcs) + 1 < secrets["threshold"]:
        raise ValueError(f"secure aggregation: shares from {len(srcs)} neighbours, fewer than the threshold")
    pk = {c: (p1, p2) for c, p1, p2 in zip(secrets["ids"], secrets["pk1"], secrets["pk2"], strict=True)}
    for src, ct in zip(srcs, ctxts, strict=True):
        key = generate_shared_key(bytes_to_private_key(secrets["sk2"]), bytes_to_public_key(pk[src][1]))
        actual_src, dst, b_share, sk1_share = share_keys_plaintext_separate(decrypt(key, ct))
        if (actual_src, dst) != (src, cid):
            raise ValueError(f"secure aggregation: a share from {actual_src} to {dst} was relayed as {src} -> {cid}")
        secrets["share-ids"] = [*secrets["share-ids"], src]
        secrets["b-shares"] = [*secrets["b-shares"], b_share]
        secrets["sk1-shares"] = [*secrets["sk1-shares"], sk1_share]
    state[SECAGG] = ConfigRecord(secrets)

    clip, target = float(cfg["clipping-range"]), int(cfg["quantization-range"])
    weight_q = round(num_examples / float(cfg["max-weight"]) * target) if cfg["weighted"] else target
    update = np.concatenate([(shared[k].double() - torch.from_numpy(sent[k].numpy()).double()).flatten().numpy()
                             for k in float_keys(sent)])
    if not np.isfinite(update).all():
        raise ValueError("non-finite update (NaN or inf): not uploaded, the secure sum goes on without it")
    weighted = update * (weight_q / target)
    pre = (np.clip(weighted, -clip, clip) + clip) * (target / (2 * clip))  # Flower's quantize, seeded rounding
    quantized = np.floor(pre).astype(np.int64)
    quantized += numpy_rng(seed, PRIVACY, STREAM, rnd, cid).random(pre.shape) < pre - quantized
    header = [weight_q, int(unclipped or 0), int((np.abs(weighted) > clip).sum())]
    vector = np.concatenate([np.asarray(header, dtype=np.int64), quantized]) + prg(secrets["seed"], len(header)
                                                                                     + len(quantized))
    for j in srcs:  # pairwise masks with every neighbour whose shares arrived (they mask with us too)
        mask = pairwise_mask(secrets["sk1"], pk[j][0], len(vector))
        vector = vector + mask if cid > j else vector - mask
    return np.mod(vector, MODULUS)


# ------------------------------------------------------------------------------------------ server
@dataclass
class SecureSum:
    """One round's outcome: ``replies`` are the train replies whose masked update is in the sum (metrics and
    client state only); ``total`` the float64 sum of the clients' weighted updates per array (None: the round
    failed, ``failure`` says why); ``weight`` the sum of their weights."""

    replies: list[Message] = field(default_factory=list)
    total: dict[str, torch.Tensor] | None = None
    weight: float = 0.0
    unclipped: int = 0
    failure: str | None = None
    metrics: dict = field(default_factory=dict)
    not_sent: set[int] = field(default_factory=set)  # sampled clients whose train message never went out

    def mean_reply(self, sent: ArrayRecord) -> Message:
        """What the strategy aggregates: one reply holding sent + sum / total weight (fedlt's sample-weighted
        mean of the clients' arrays; integer arrays keep the sent value)."""
        out = {}
        for k, a in sent.items():
            v = a.numpy()
            out[k] = (Array((torch.from_numpy(v).double() + self.total[k] / self.weight).to(
                torch.from_numpy(v).dtype).numpy()) if k in self.total else Array(v.copy()))
        content = RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord({"num-examples": 1,
                                                                                    "client-id": -1})})
        return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


class SecAggServer:
    """The server's side of every round; ``exchange(phase, messages)`` sends through the grid and returns the
    usable replies sorted by client id (failures are recorded by the round loop)."""

    def __init__(self, cfg: dict, largest_client: int):
        p = cfg["privacy"]
        max_weight = p.get("secagg_max_weight")
        self.seed = int(cfg["seed"])
        self.weighted = p["name"] != CENTRAL
        self.share_fraction = float(p["secagg_share_fraction"])
        self.threshold_fraction = float(p["secagg_reconstruction_threshold"])
        self.collect_config = {"clipping-range": float(p["secagg_clipping_range"]),
                               "quantization-range": int(p["secagg_quantization_range"]),
                               "max-weight": float(largest_client if max_weight is None else max_weight),
                               "weighted": self.weighted}

    def summary(self) -> dict:
        """results.json ``privacy.secure_aggregation``."""
        return {"protocol": "SecAgg+ (Bell et al. 2020) from Flower 1.42's building blocks, driven by fedlt's round "
                            "loop: the server saw only the sum of each round's masked, quantized updates",
                "share_fraction": self.share_fraction, "reconstruction_threshold": self.threshold_fraction,
                "modulus": MODULUS, **{k.replace("-", "_"): v for k, v in self.collect_config.items()}}

    def run(self, rnd: int, arrays: ArrayRecord, messages: list[Message], client_of_node: dict[int, int],
            exchange) -> SecureSum:
        """Round ``rnd`` of SecAgg+ for the train ``messages`` (built by the round loop from the global ``arrays``)."""
        train = {client_of_node[m.metadata.dst_node_id]: m for m in messages}
        clients = sorted(train)
        target = int(self.collect_config["quantization-range"])
        if len(clients) < 2:
            return self._failed(f"{len(clients)} client(s) sampled, and a secure sum needs at least 2",
                                set(clients))
        if len(clients) * target >= MODULUS:
            return self._failed(f"{len(clients)} clients x secagg_quantization_range={target} would overflow "
                                f"the modulus 2^32", set(clients))
        share_num, t = share_counts(len(clients), self.share_fraction, self.threshold_fraction)
        nbrs = neighbours(clients, share_num, numpy_rng(self.seed, PRIVACY, STREAM, rnd))
        node = {c: m.metadata.dst_node_id for c, m in train.items()}

        def send(stage: str, configs: dict[int, dict]) -> dict[int, ConfigRecord]:
            msgs = [Message(content=RecordDict({SECAGG: ConfigRecord({"stage": stage, "round": rnd, **cfg}),
                                                "config": ConfigRecord({"server-round": rnd})}),
                            dst_node_id=node[c], message_type=STAGE_MESSAGE) for c, cfg in configs.items()]
            return {client_of_node[r.metadata.src_node_id]: r.content[SECAGG]
                    for r in exchange(f"secagg-{stage}", msgs)}

        def check(stage: str, holders: set[int], owners: set[int]) -> SecureSum | None:
            """None while every owner's secrets keep ``t`` live holders; else the failed round."""
            c = next((c for c in sorted(owners) if len(nbrs[c] & holders) < t), None)
            if len(holders) >= t and c is None:
                return None
            why = (f"client {c} has {len(nbrs[c] & holders)} live neighbours holding its secret shares"
                   if c is not None else f"{len(holders)} clients are left")
            return self._failed(f"after {stage}, {why}, fewer than the reconstruction threshold {t} "
                                f"({share_num} shares per client)", set(clients) - sent)

        sent: set[int] = set()  # clients whose train message went out
        keys = send(Stage.SETUP, {c: {"shares": share_num, "threshold": t} for c in clients})
        if failed := check("setup", set(keys), set(keys)):
            return failed
        ciphertexts = send(Stage.SHARE_KEYS, {c: {
            "ids": (ids := sorted(nbrs[c] & set(keys))), "pk1": [keys[j]["pk1"] for j in ids],
            "pk2": [keys[j]["pk2"] for j in ids]} for c in keys})
        shared = set(ciphertexts)
        if failed := check("share keys", shared, shared):
            return failed
        inbox: dict[int, list[tuple[int, bytes]]] = {c: [] for c in shared}
        for src in sorted(shared):
            for dst, ct in zip(ciphertexts[src]["dsts"], ciphertexts[src]["ctxts"], strict=True):
                if int(dst) in inbox:
                    inbox[int(dst)].append((src, ct))
        for c in sorted(shared):
            train[c].content[SECAGG] = ConfigRecord({"stage": Stage.COLLECT_MASKED_VECTORS, "round": rnd,
                                                     "srcs": [s for s, _ in inbox[c]],
                                                     "ctxts": [ct for _, ct in inbox[c]], **self.collect_config})
        sent = shared
        replies = exchange("train", [train[c] for c in sorted(shared)])
        uploaded = {client_of_node[r.metadata.src_node_id]: r for r in replies}
        survivors, dropped = set(uploaded), shared - set(uploaded)
        if failed := check("collecting the masked updates", survivors, shared):
            return failed
        vector = np.zeros_like(replies[0].content["arrays"][MASKED].numpy())
        for r in replies:
            vector = np.mod(vector + r.content["arrays"][MASKED].numpy(), MODULUS)

        held = send(Stage.UNMASK, {c: {"active": sorted(nbrs[c] & survivors), "dead": sorted(nbrs[c] & dropped)}
                                   for c in sorted(survivors)})
        shares: dict[int, list[bytes]] = {c: [] for c in shared}
        for rec in held.values():
            for owner, share in zip(rec["ids"], rec["shares"], strict=True):
                shares[int(owner)].append(share)
        if (c := next((c for c in sorted(shared) if len(shares[c]) < t), None)) is not None:
            return self._failed(f"in unmasking only {len(shares[c])} shares of client {c}'s secret came back, "
                                f"fewer than the reconstruction threshold {t}", set(clients) - sent)
        for c in sorted(survivors):  # remove the self masks
            vector = vector - prg(combine_shares(shares[c]), len(vector))
        for d in sorted(dropped):  # remove the dropped clients' pairwise masks with those that uploaded
            sk1 = combine_shares(shares[d])
            for j in sorted(nbrs[d] & survivors):
                mask = pairwise_mask(sk1, keys[j]["pk1"], len(vector))
                vector = vector + mask if d > j else vector - mask
        vector = np.mod(vector, MODULUS)
        result = self._decode(arrays, vector, [uploaded[c] for c in sorted(survivors)], len(dropped))
        result.not_sent = set(clients) - sent
        return result

    def _decode(self, sent: ArrayRecord, vector: np.ndarray, replies: list[Message], dropped: int) -> SecureSum:
        clip, target = float(self.collect_config["clipping-range"]), int(self.collect_config["quantization-range"])
        weight_q, unclipped, clipped = (int(v) for v in vector[:HEADER])
        flat = dequantize([vector[HEADER:]], clip, target)[0] - (len(replies) - 1) * clip  # Flower's offset
        total, at = {}, 0
        for k in float_keys(sent):
            shape = sent[k].numpy().shape
            size = int(np.prod(shape))
            total[k] = torch.from_numpy(flat[at:at + size].reshape(shape).copy())
            at += size
        if clipped:
            log.warning("secure aggregation: %d entries of the weighted updates exceeded privacy.secagg_clipping_range"
                        "=%g and were clipped (the aggregate is biased); raise the range", clipped, clip)
        metrics = {"secagg/clients": len(replies), "secagg/dropouts_recovered": dropped,
                   "secagg/clipped_fraction": clipped / max(len(flat) * len(replies), 1)}
        return SecureSum(replies, total, weight_q / target, unclipped, None, metrics)

    @staticmethod
    def _failed(why: str, not_sent: set[int]) -> SecureSum:
        return SecureSum(failure=f"secure aggregation: {why}; the round's updates were dropped", not_sent=not_sent,
                         metrics={"secagg/clients": 0, "secagg/dropouts_recovered": 0})
