"""`strata fleet status`, `strata ring show`, `strata models list`: the operator's view through the coordinator."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    return None
