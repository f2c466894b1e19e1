"""Keep the README's config tables true: `python -m strata.readme` (or `make docs`) regenerates them.

Each `<!-- config:ROLE -->` … `<!-- /config -->` block is replaced by the table of
that daemon's config keys and defaults; tests/test_readme.py fails when a block is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from strata.cmd_daemons import CONFIG_CLASSES, config_table

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(<!-- config:(\w+) -->\n).*?(<!-- /config -->)", re.S)


def render(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        role = match.group(2)
        if role not in CONFIG_CLASSES:
            raise SystemExit(f"README names an unknown config block {role!r}")
        return match.group(1) + config_table(role) + match.group(3)

    return _BLOCK.sub(replace, text)


def main() -> int:
    current = README.read_text()
    updated = render(current)
    if updated != current:
        README.write_text(updated)
        print(f"updated {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
