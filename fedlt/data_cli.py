"""``fedlt-data``: inspect a split without training.

Takes the same Hydra overrides as ``fedlt`` (composed from the same ``configs/`` tree, validated the same way),
prepares the data exactly as a run would (decode once and cache, long-tail profile, partition, local test
sets) -- without Ray or any model -- and prints the JSON summary a run writes to ``partition.json``::

    fedlt-data dataset=cifar10_lt dataset.imbalance_factor=100 partition=dirichlet partition.alpha=0.5 \\
        num_clients=40 seed=3407 figure=split.png

``figure=PATH`` (or ``--figure PATH``) also writes the PNG a run writes as ``partition.png``. No run directory
is created. Bad input: one paragraph on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import sys

USAGE = """usage: fedlt-data [figure=PATH] [OVERRIDE ...]

Prepare the data of a run (same overrides as `fedlt`, e.g. dataset=cifar100_lt partition=shards num_clients=40)
without training and print its JSON summary: class counts of the long-tailed training set, client_train_sizes,
the clients x classes count matrix, local test sizes and overlap, head/mid/tail class groups under every rule,
and the clients left with no training or no test data (also warned about on stderr).
figure=PATH (or --figure PATH) also writes a PNG: clients x classes heatmap + the global long-tail curve.
Config groups: dataset={datasets}; partition={partitions}.
"""


def dumps(value, level: int = 0) -> str:
    """JSON with one line per key and per matrix row (a 40 x 100 count matrix stays readable)."""
    pad = "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(k)}: {dumps(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if isinstance(value, list) and value and all(isinstance(x, list | dict) for x in value):
        return "[\n" + ",\n".join(pad + dumps(x, level + 1) for x in value) + "\n" + "  " * level + "]"
    return json.dumps(value)


def _fail(message: str) -> int:
    print(f"fedlt-data: error: {message}", file=sys.stderr, flush=True)
    return 2


def _group_options(group: str) -> str:
    from pathlib import Path

    from fedlt.compose import CONFIG_DIR

    return ", ".join(sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml")))


def parse_args(argv: list[str]) -> tuple[list[str], str | None, bool]:
    """Split ``figure=PATH`` / ``--figure PATH`` / ``--help`` from the Hydra overrides."""
    overrides, figure, want_help = [], None, False
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            want_help = True
        elif a.startswith(("figure=", "--figure=")):
            figure = a.split("=", 1)[1]
        elif a == "--figure":
            figure = next(it, None)
            if figure is None:
                raise ValueError("--figure needs a PATH")
        elif a.startswith("hydra."):
            continue  # run-directory settings of `fedlt`: irrelevant here (nothing is written)
        else:
            overrides.append(a)
    return overrides, figure, want_help


def compose_config(overrides: list[str]) -> dict:
    """The resolved config `fedlt` would run with (Hydra's compose API over the same config folder)."""
    from fedlt.compose import compose_resolved

    return compose_resolved(overrides, job_name="fedlt-data")


def inspect_split(overrides: list[str], figure: str | None = None) -> dict:
    """Compose + validate + prepare; return the summary (and write the figure when asked). Raises the user
    errors of :func:`fedlt.cli.user_errors`."""
    from fedlt.config import ConfigError
    from fedlt.validate import validate
    from fedlt.data.federated import prepare, summary

    try:
        plain = compose_config(overrides)
    except Exception as e:  # bad override syntax, unknown group option, unresolvable interpolation
        message = str(e).split("Config search path")[0]  # Hydra appends its search path: noise for users
        raise ConfigError(f"the configuration could not be composed: {' '.join(message.split())}") from e
    validate(plain)
    plan, split, source = prepare(plain)
    result = summary(split, source, plain)
    result["clients_without_data"] = clients_without_data(result)
    if figure:
        from fedlt.data.figure import write_partition_figure

        write_partition_figure(result, figure)
    return result


def clients_without_data(result: dict) -> dict:
    """Clients with no training images and clients with an empty local test set (count and ids)."""
    out = {}
    for key, sizes in (("no_training_data", result.get("client_train_sizes") or []),
                       ("no_test_data", result.get("client_test_sizes") or [])):
        ids = [i for i, n in enumerate(sizes) if n == 0]
        out[key] = {"count": len(ids), "clients": ids}
    return out


def _ids(ids: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def empty_clients_warning(result: dict) -> str | None:
    """One paragraph when some clients have no training or no test data, else None."""
    empty, n = result.get("clients_without_data") or {}, result.get("num_clients", 0)
    parts = [f"{e['count']} of {n} clients have no {what} (clients {_ids(e['clients'])})"
             for key, what in (("no_training_data", "training data"), ("no_test_data", "test data"))
             if (e := empty.get(key)) and e["count"]]
    if not parts:
        return None
    return ("; ".join(parts) + ". A client without training data cannot train and one without test data cannot be "
            "evaluated; spread the data more evenly (a larger partition.alpha, fewer num_clients, or "
            "partition.min_samples_per_client=N).")


def main(argv: list[str] | None = None) -> int:
    from fedlt.cli import user_errors

    try:
        overrides, figure, want_help = parse_args(list(sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        return _fail(str(e))
    if want_help:
        print(USAGE.format(datasets=_group_options("dataset"), partitions=_group_options("partition")))
        return 0
    try:
        result = inspect_split(overrides, figure)
    except user_errors() as e:
        return _fail(str(e))
    except OSError as e:  # e.g. the figure path cannot be written
        return _fail(f"{e.strerror or e}: {e.filename or ''}".strip(": "))
    sys.stdout.write(dumps(result) + "\n")
    sys.stdout.flush()
    warning = empty_clients_warning(result)
    if warning:
        print(f"fedlt-data: warning: {warning}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
