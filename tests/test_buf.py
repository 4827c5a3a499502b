"""Proto hygiene with buf: lint (style and a comment on everything) and breaking-change
checks against the stored image of the contract and against the last commit.

buf comes from the npm package @bufbuild/buf (scripts/install_client_toolchains.sh puts it
in examples/clients/node/node_modules); the tests skip, saying so, where it is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOS = REPO_ROOT / "protos"
IMAGE = PROTOS / "breaking" / "image.binpb"
NODE_BUF = REPO_ROOT / "examples" / "clients" / "node" / "node_modules" / ".bin" / "buf"


def _find_buf() -> str | None:
    if NODE_BUF.exists():
        return str(NODE_BUF)
    return shutil.which("buf")


BUF = _find_buf()
pytestmark = pytest.mark.skipif(
    BUF is None,
    reason="buf not found: run scripts/install_client_toolchains.sh (npm @bufbuild/buf)",
)


def buf(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    assert BUF is not None
    return subprocess.run(
        [BUF, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _copy_protos(tmp_path: Path) -> Path:
    dst = tmp_path / "protos"
    shutil.copytree(PROTOS, dst, ignore=shutil.ignore_patterns("breaking"))
    return dst


def test_lint_is_clean():
    result = buf("lint", "protos")
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_requires_comments(tmp_path: Path):
    """The COMMENTS rules are on: an undocumented field fails lint."""
    protos = _copy_protos(tmp_path)
    path = protos / "llmcluster" / "v1" / "generate.proto"
    text = path.read_text()
    edited = text.replace(
        "message ListModelsRequest {}", "message ListModelsRequest {\n  string filter = 1;\n}"
    )
    assert edited != text
    path.write_text(edited)
    result = buf("lint", str(protos))
    assert result.returncode != 0
    assert 'Field "filter" should have a non-empty comment' in result.stdout


def test_no_breaking_change_against_stored_image():
    result = buf("breaking", "protos", "--against", str(IMAGE.relative_to(REPO_ROOT)))
    assert result.returncode == 0, (
        result.stdout
        + result.stderr
        + "\nAn incompatible change to the contract. If it is intended (a new major "
        "version), see protos/buf.yaml for how to refresh the stored image."
    )


@pytest.mark.skipif(
    not (REPO_ROOT / ".git").exists() or shutil.which("git") is None,
    reason="not a git checkout: no last commit to compare against",
)
def test_no_breaking_change_against_last_commit():
    """Catches an incompatible edit in the working tree before it is committed."""
    result = buf("breaking", "protos", "--against", ".git#ref=HEAD,subdir=protos")
    assert result.returncode == 0, result.stdout + result.stderr


def test_breaking_check_catches_a_renumbered_field(tmp_path: Path):
    protos = _copy_protos(tmp_path)
    path = protos / "llmcluster" / "v1" / "generate.proto"
    text = path.read_text()
    edited, count = re.subn(r"string prompt = 4;", "string prompt = 40;", text)
    assert count == 1
    path.write_text(edited)
    result = buf("breaking", str(protos), "--against", str(IMAGE))
    assert result.returncode != 0
    assert 'field "4" with name "prompt" on message "GenerateRequest"' in result.stdout, (
        result.stdout
    )
