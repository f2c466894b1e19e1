"""`strata device predict`: join a relay (or an aggregator) as an inference-only device and predict."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from proto.errors import InvalidInput, NotFound
from strata.cli_common import (
    EXIT_OK,
    add_actions,
    add_bundle_option,
    add_json_option,
    channel_factory_for,
    print_json,
)

if TYPE_CHECKING:
    from agent.tasks import TorchTask


def register(commands: argparse._SubParsersAction) -> None:
    predict = add_actions(commands, "device", "act as a low-power device").add_parser(
        "predict", help="join as an inference-only device, download the current model, predict on inputs"
    )
    predict.add_argument("--relay", required=True, metavar="ADDR", help="relay (or aggregator) address host:port")
    predict.add_argument("--task", default="digits", help="built-in task whose predict() to run (default: digits)")
    predict.add_argument("--federation", default="", help="federation (default: the task's name)")
    inputs = predict.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input", type=Path, metavar="FILE", help=".npy array of inputs (digits: shape (N, 64))")
    inputs.add_argument("--sample", type=int, metavar="K", help="predict the first K rows of the task's own test set")
    predict.add_argument(
        "--model", default="", metavar="CID|NAME@VERSION",
        help="predict with this model instead of the home's current one: a CID, or a release such as digits@^1.0 "
        "(the newest compatible release, resolved by --coordinator); the home must hold it",
    )  # fmt: skip
    predict.add_argument(
        "--coordinator", metavar="HOST:PORT", default=os.environ.get("STRATA_COORDINATOR", "127.0.0.1:7000"),
        help="where --model NAME@VERSION is resolved (default: $STRATA_COORDINATOR or 127.0.0.1:7000)",
    )  # fmt: skip
    add_bundle_option(predict)
    predict.add_argument("--id", default="", help="device id (default: generated)")
    predict.add_argument("--timeout", type=float, default=30.0, help="give up joining after this many seconds")
    add_json_option(predict)
    predict.set_defaults(handler=cmd_device_predict)


def _load_inputs(args: argparse.Namespace, task: type[TorchTask]) -> tuple[np.ndarray, np.ndarray | None]:
    if args.sample is not None:
        if args.sample < 1:
            raise InvalidInput("--sample must be >= 1", reason="bad_argument")
        rows, labels = task.test_set()
        return np.asarray(rows[: args.sample]), np.asarray(labels[: args.sample])
    if not args.input.is_file():
        raise NotFound(f"no input file {args.input}", reason="not_found")
    try:
        array = np.load(args.input, allow_pickle=False)
    except ValueError as exc:
        raise InvalidInput(f"{args.input} is not a .npy array: {exc}", reason="bad_input") from None
    return array, None


def _model_cid(args: argparse.Namespace) -> str:
    """--model as a CID: a release name is resolved by the coordinator's hub (a device may ask it that)."""
    from coordinator.client import CoordinatorClient
    from coordinator.hub import parse_ref

    if parse_ref(args.model) is None:
        return args.model
    with CoordinatorClient(args.coordinator, channel_factory=channel_factory_for(args)) as coordinator:
        return coordinator.resolve(args.model)[0]


def cmd_device_predict(args: argparse.Namespace) -> int:
    from agent.client import Client
    from agent.tasks import builtin_task

    task = builtin_task(args.task)
    inputs, labels = _load_inputs(args, task)
    model_cid = _model_cid(args) if args.model else ""
    client = Client(
        [args.relay],
        federation=args.federation or args.task,
        agent_id=args.id,
        capability="inference",
        watch=False,
        join_timeout_s=args.timeout,
    )
    try:
        client.join()
        manifest, weights = client.download(model_cid)
    finally:
        client.close()
    predictions = task.predict(weights, inputs)
    result: dict[str, object] = {
        "model": manifest.cid,
        "round": manifest.round,
        "home": client.home_id,
        "predictions": predictions.tolist(),
    }
    if labels is not None:
        result["labels"] = labels.tolist()
        result["accuracy"] = float(np.mean(predictions == labels)) if len(labels) else None
    if args.json:
        print_json(result)
        return EXIT_OK
    print(f"model {manifest.cid} (round {manifest.round}, via {client.home_id})")
    print("predictions: " + " ".join(str(p) for p in predictions.tolist()))
    if labels is not None:
        print("labels:      " + " ".join(str(v) for v in labels.tolist()))
        print(f"accuracy:    {result['accuracy']:.3f}")
    return EXIT_OK
