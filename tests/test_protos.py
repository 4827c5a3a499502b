"""The committed stubs in common/pb are exactly what the protos generate."""

from __future__ import annotations

from pathlib import Path

from common.protogen import STUB_DIR, generate_stubs


def test_committed_stubs_match_protos(tmp_path: Path):
    written = generate_stubs(tmp_path)
    names = sorted(p.name for p in written)
    committed = sorted(p.name for p in STUB_DIR.iterdir() if p.suffix in (".py", ".pyi"))
    assert names == committed
    for path in written:
        assert path.read_text() == (STUB_DIR / path.name).read_text(), (
            f"{path.name} is stale: run `make proto`"
        )


def test_every_proto_sets_per_language_options():
    for proto in sorted((STUB_DIR.parent.parent / "protos" / "llmcluster" / "v1").glob("*.proto")):
        text = proto.read_text()
        for option in ("go_package", "java_package", "java_multiple_files", "csharp_namespace"):
            assert f"option {option}" in text, f"{proto.name} lacks option {option}"
