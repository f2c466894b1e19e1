"""McMahan et al.'s MNIST CNN for the convergence bench: two 5x5 convolutions (32 and 64 channels,
'same' padding, each followed by 2x2 max pooling), a 512-unit ReLU layer and the 10-way output,
1,663,370 parameters, against the built-in task's 16/32 channels and 128 units (~105k).

Loaded by the agents as the custom trainer "_wide_cnn:WideMnistTask" (bench/ is on sys.path when
a bench script runs): same data, options and training loop as task "mnist", only the model differs.
"""

from __future__ import annotations

import torch
from torch import nn

from agent.tasks import MnistTask


class McMahanCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.head = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.relu(self.fc1(x.flatten(1))))


class WideMnistTask(MnistTask):
    name = "mnist_wide"

    @classmethod
    def _build_model(cls) -> nn.Module:
        return McMahanCNN()
