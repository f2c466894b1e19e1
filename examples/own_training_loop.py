"""Federated training from your own loop, with the client library.

Start an aggregator first (in another terminal):

    strata aggregator serve

then run this file. It joins the aggregator, and for each round waits for the
new base model, trains it with a plain PyTorch loop on its share of the digits
data, and submits the result. Any framework works: weights cross the boundary
as a dict of numpy arrays.

    python examples/own_training_loop.py --rounds 3 --address 127.0.0.1:7070
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from agent.client import Client


class DigitsMLP(nn.Module):
    """The same architecture and tensor names as the built-in digits task the aggregator starts from."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pixels in [0, 1], standardized with the same fixed constants as the built-in task
        return self.head(torch.relu(self.fc1((x - 0.305) / 0.376)))


def train(weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    model = DigitsMLP()
    model.load_state_dict({name: torch.from_numpy(array) for name, array in weights.items()})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(20):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
    accuracy = (model(inputs).argmax(1) == targets).float().mean().item()
    new_weights = {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()}
    return new_weights, {"loss": float(loss.item()), "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:7070", help="an aggregator (or relay) address")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    digits = load_digits()
    x = (digits.data[:400] / 16.0).astype(np.float32)
    y = digits.target[:400].astype(np.int64)

    with Client([args.address], federation="digits", display_name="my-own-loop") as client:
        for _ in range(args.rounds):
            weights = client.wait_for_model(timeout=120)
            print(f"round {client.round}: training from {client.model_cid}")
            new_weights, metrics = train(weights, x, y)
            receipt = client.submit(new_weights, num_samples=len(x), metrics=metrics)
            print(f"  submitted {receipt.update_cid} (loss {metrics['loss']:.3f}, accuracy {metrics['accuracy']:.3f})")


if __name__ == "__main__":
    main()
