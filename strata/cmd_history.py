"""`strata history` and `strata plot`: an aggregator's per-round table, from its journal."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    return None
