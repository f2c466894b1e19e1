"""Every bench script still imports: a rename elsewhere must not leave a benchmark that no longer runs.

The scripts are not run (each is minutes of training); importing them runs their top-level imports
and definitions, which is where a moved helper breaks them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# vs_flower_trainer runs inside Flower's own app environment (bench/flower_app), not ours
SCRIPTS = sorted(p.stem for p in BENCH.glob("[a-z]*.py") if p.stem != "vs_flower_trainer")


@pytest.mark.slow
def test_every_bench_script_imports() -> None:
    assert len(SCRIPTS) >= 20, SCRIPTS
    # loaded by path under a prefixed name: bench/encodings.py would otherwise be the stdlib's encodings
    program = (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "failed = []\n"
        f"for name in {SCRIPTS!r}:\n"
        "    try:\n"
        f"        spec = importlib.util.spec_from_file_location('bench_' + name, {str(BENCH)!r} + '/' + name + '.py')\n"
        "        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
        "        spec.loader.exec_module(module)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
