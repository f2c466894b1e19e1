"""The ClientApp: the same trivial training as Strata's side (bench/vs_flower_trainer.py).

It adds N(0, 1e-3) float32 noise to every array it received and returns them with
num-examples 100, so each reply is exactly as big as the model it answers.
"""

import os

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    rng = np.random.default_rng([context.node_id % (1 << 32), os.getpid()])
    received = msg.content["arrays"]
    noisy = {
        name: Array(array.numpy() + rng.standard_normal(array.shape, dtype=np.float32) * np.float32(1e-3))
        for name, array in received.items()
    }
    content = RecordDict({"arrays": ArrayRecord(noisy), "metrics": MetricRecord({"num-examples": 100, "loss": 1.0})})
    return Message(content=content, reply_to=msg)
