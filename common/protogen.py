"""Regenerates the Python stubs in ``common/pb`` from ``protos/``.

protoc writes absolute imports (``from llmcluster.v1 import generate_pb2``); the
stubs live flat in ``common.pb``, so the imports are rewritten to match. The test
suite runs the same function into a temporary folder and compares.

Usage: ``python -m common.protogen [OUT_DIR]``.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE_DIR = PROTO_ROOT / "llmcluster" / "v1"
STUB_DIR = Path(__file__).resolve().parent / "pb"

_IMPORT_RE = re.compile(r"^from llmcluster\.v1 import (\w+) as (\w+)$", re.MULTILINE)


def generate_stubs(out_dir: Path) -> list[Path]:
    """Runs protoc on every proto and writes flat, import-rewritten stubs to out_dir."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTO_PACKAGE_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for src in sorted((Path(raw) / "llmcluster" / "v1").iterdir()):
            text = _IMPORT_RE.sub(r"from common.pb import \1 as \2", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    init = out_dir / "__init__.py"
    init.write_text(
        '"""Generated gRPC stubs of protos/llmcluster/v1 (see common/protogen.py)."""\n'
    )
    return [init, *written]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else STUB_DIR
    if out == STUB_DIR:
        shutil.rmtree(STUB_DIR, ignore_errors=True)
    for path in generate_stubs(out):
        print(path)


if __name__ == "__main__":
    main()
