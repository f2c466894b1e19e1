"""The ServerApp: FedAvg over every node, every round, timing each round itself.

Flower's Strategy.start() logs no per-round durations, so this FedAvg subclass stamps
each round: it opens when configure_train() is called (before the messages are pushed)
and closes when aggregate_train() has averaged the replies. That is the same span as a
Strata round (opened_at -> closed_at in its journal): send the model, train, receive,
aggregate. Federated evaluation is off on both sides (fraction_evaluate 0).

Bytes are counted from the protocol: the deflated size of every object in a message's
content (its ArrayRecord, Arrays and their chunks, the config/metric records) -- what a
SuperNode pulls from the SuperLink for the train message and pushes back for its reply,
without HTTP framing.

Run config (vs_flower.py sets all of it with --run-config):
  num-rounds      rounds to run
  nodes           SuperNodes to wait for; every one trains every round
  layout          the model: "name:count,name:count,..." float32 tensors
  results         path of the JSON file this app writes its round records to
  pull-interval   seconds between the ServerApp's polls for replies; 3.0 keeps Flower's
                  own Grid.send_and_receive (which sleeps a fixed 3 s between polls)
"""

import json
import os
import time
from importlib.metadata import version

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

app = ServerApp()

FLOWER_PULL_INTERVAL_S = 3.0  # the fixed sleep in Flower's own Grid.send_and_receive
WAIT_FOR_NODES_S = 600.0


def _content_bytes(content) -> int:
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


class _PollingGrid:
    """Flower's Grid with send_and_receive polling every `interval` s instead of 3 s.

    The same loop as Flower's own (push, then pull until every reply is in or the
    timeout passes), through the Grid's public push_messages/pull_messages.
    """

    def __init__(self, grid: Grid, interval: float) -> None:
        self._grid = grid
        self._interval = interval

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        pending = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.time() + timeout
        replies = []
        while pending and (end is None or time.time() < end):
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self._interval)
        return replies


class TimedFedAvg(FedAvg):
    """FedAvg that records, per round, its span, participants and bytes moved."""

    def __init__(self, nodes: int, results_path: str, meta: dict) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=nodes,
            min_available_nodes=nodes,
        )
        self.records: list[dict] = []
        self._open: dict = {}
        self._results_path = results_path
        self._meta = meta

    def configure_train(self, server_round, arrays, config, grid):
        opened_at = time.time()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        per_message = _content_bytes(messages[0].content) if messages else 0
        self._open = {
            "round": server_round,
            "opened_at": opened_at,
            "sent": len(messages),
            "down_bytes": per_message * len(messages),
        }
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        closed_at = time.time()
        ok = [m for m in replies if not m.has_error()]
        self.records.append(
            {
                **self._open,
                "closed_at": closed_at,
                "participants": len(ok),
                "up_bytes": sum(_content_bytes(m.content) for m in ok),
            }
        )
        self._write()
        return arrays, metrics

    def _write(self) -> None:
        if not self._results_path:
            return
        tmp = f"{self._results_path}.tmp"
        with open(tmp, "w") as out:
            json.dump({**self._meta, "rounds": self.records}, out)
        os.replace(tmp, self._results_path)


def _model(layout: str) -> ArrayRecord:
    rng = np.random.default_rng(3)
    arrays = {}
    for entry in layout.split(","):
        name, _, count = entry.partition(":")
        arrays[name] = Array(rng.standard_normal(int(count), dtype=np.float32))
    return ArrayRecord(arrays)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    nodes = int(config["nodes"])
    rounds = int(config["num-rounds"])
    interval = float(config["pull-interval"])

    # all nodes connected before round 1 opens, so no round waits for a node to start
    give_up = time.time() + WAIT_FOR_NODES_S
    while len(list(grid.get_node_ids())) < nodes:
        if time.time() > give_up:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {nodes} SuperNodes connected")
        time.sleep(0.1)

    meta = {"flwr": version("flwr"), "nodes": nodes, "pull_interval_s": interval, "serverapp_pid": os.getpid()}
    strategy = TimedFedAvg(nodes, str(config["results"]), meta)
    run_grid = grid if interval == FLOWER_PULL_INTERVAL_S else _PollingGrid(grid, interval)
    strategy.start(grid=run_grid, initial_arrays=_model(str(config["layout"])), num_rounds=rounds)
