"""Render bench/attacks.py results (one or more JSON files) as one table: a rule x attack per row,
the attacker shares as columns, each cell final accuracy (change against the same rule's no-attack run).

    python bench/attacks_table.py [--without ATTACK,...] [--only-rules RULE,...] FILE.json ...

A later file's run of the same (rule, attack, strength, share) replaces an earlier one's; each
rule's no-attack accuracy is taken from the last file that ran it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _attack(result: dict[str, Any]) -> str:
    return result["attack"] + (f" ×{result['strength']:g}" if result["strength"] else "")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--without", default="", help="comma-separated attacks to leave out")
    parser.add_argument("--only-rules", default="", help="comma-separated rules to keep (default: all)")
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    without = {a for a in args.without.split(",") if a}
    only = {r for r in args.only_rules.split(",") if r}
    cells: dict[tuple[str, str, Any], float] = {}
    clean: dict[str, float] = {}
    order: list[tuple[str, str]] = []
    shares: set[Any] = set()
    for path in args.paths:
        with open(path) as handle:
            for result in json.load(handle)["results"]:
                if result["attack"] in without or (only and result["strategy"] not in only):
                    continue
                if result["attack"] == "none":
                    clean[result["strategy"]] = result["final_accuracy"]
                    continue
                row = (result["strategy"], _attack(result))
                if row not in order:
                    order.append(row)
                share = result["attackers"]
                shares.add(share)
                cells[(*row, share)] = result["final_accuracy"]
    columns = sorted(s for s in shares if not isinstance(s, str)) + sorted(s for s in shares if isinstance(s, str))
    names = [f"{s:.0%}" if not isinstance(s, str) else s for s in columns]
    print("| rule | no attack | attack | " + " | ".join(names) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in names) + " |")
    rules = list(dict.fromkeys(rule for rule, _ in order))
    for rule in rules:
        for _, attack in [r for r in order if r[0] == rule]:
            values = []
            for share in columns:
                value = cells.get((rule, attack, share))
                values.append("" if value is None else f"{value:.4f} ({value - clean[rule]:+.4f})")
            print(f"| {rule} | {clean[rule]:.4f} | {attack} | " + " | ".join(values) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
