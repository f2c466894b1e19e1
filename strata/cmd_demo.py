"""`strata demo`: start a fleet on this machine, train on real data, show progress and lineage."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    return None
