"""Regenerate the Python stubs from strata.proto: `python -m proto.generate` (or `make proto`).

The stubs are committed; tests/test_proto.py regenerates them into a temporary
directory and fails when the committed copies are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
SOURCES = ("strata.proto",)


def generate(out_root: Path = ROOT) -> list[Path]:
    """Run protoc on the sources, writing into out_root/proto/. Returns the files written."""
    from grpc_tools import protoc  # test/dev dependency only

    (out_root / "proto").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for source in SOURCES:
        args = [
            "protoc",
            f"-I{ROOT}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(PROTO_DIR / source),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {source}")
        stem = source.removesuffix(".proto")
        written += [out_root / "proto" / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT), file=sys.stderr)
