"""The model store: atomic versioned publishing, references, names, checksums, formats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import grpc
import pytest

from common.errors import InvalidArgument, NotFound, status_of
from common.model_store import (
    METADATA_FILE,
    ArtifactNotFound,
    IntegrityError,
    ModelStore,
    pick_version,
    sha256_file,
    split_point,
)

REPO = Path(__file__).resolve().parents[1]


def _safetensors_bytes(payload: bytes = b"\x00" * 16) -> bytes:
    """A valid safetensors file without torch: one uint8 tensor."""
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + payload


def make_adapter(folder: Path, payload: bytes = b"\x01" * 16) -> Path:
    """A PEFT-shaped folder: adapter_config.json + adapter_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(_safetensors_bytes(payload))
    return folder


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def test_publish_writes_version_files_and_metadata(store: ModelStore, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    meta = {"base_model": "SmolLM2-135M-Instruct", "method": "lora", "trace_id": "ab" * 16}
    ref = store.publish("support-bot", src, meta)

    assert (ref.name, ref.version, ref.ref) == ("support-bot", 1, "support-bot@1")
    assert ref.path == store.root / "support-bot" / "1"
    assert sorted(p.name for p in ref.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        METADATA_FILE,
    ]
    weights_sha = sha256_file(src / "adapter_model.safetensors")
    assert ref.sha256 == weights_sha
    record = json.loads((ref.path / METADATA_FILE).read_text())
    assert record["base_model"] == "SmolLM2-135M-Instruct"
    assert record["trace_id"] == "ab" * 16
    assert record["version"] == 1 and record["created_unix_ms"] > 0 and record["created"]
    assert record["files"] == {
        "adapter_config.json": sha256_file(src / "adapter_config.json"),
        "adapter_model.safetensors": weights_sha,
    }
    # Stored files are read-only: a version is immutable.
    assert not os.stat(ref.path / "adapter_model.safetensors").st_mode & 0o222


def test_versions_increment_and_resolve_forms(store: ModelStore, tmp_path: Path) -> None:
    refs = [store.publish("bot", make_adapter(tmp_path / f"a{i}", bytes([i]) * 8)) for i in (1, 2)]
    assert [r.version for r in refs] == [1, 2]
    assert store.resolve("bot").version == 2
    assert store.resolve("bot@latest").version == 2
    assert store.resolve("bot@1").sha256 == refs[0].sha256
    assert store.resolve("bot@2").path == refs[1].path
    with pytest.raises(ArtifactNotFound) as missing_version:
        store.resolve("bot@3")
    assert missing_version.value.args[0] == (
        "version 3 of bot not found (versions are 1, 2; bot@2 is the latest)"
    )
    with pytest.raises(ArtifactNotFound, match=r"'nobody' not found \(stored: bot\)") as info:
        store.resolve("nobody")
    assert isinstance(info.value, (KeyError, NotFound))
    assert status_of(info.value)[0] == grpc.StatusCode.NOT_FOUND

    store.publish("other", make_adapter(tmp_path / "b"))
    listed = [(r.name, r.version) for r in store.list()]
    assert listed == [("bot", 1), ("bot", 2), ("other", 1)]
    assert all(r.metadata["files"] for r in store.list())
    assert [r.version for r in store.list("bot")] == [1, 2]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../x", "slashes"),
        ("a/b", "slashes"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("", "non-empty"),
        ("-lead", "must match"),
        (".hidden", "must match"),
        ("a" * 65, "must match"),
        ("sp ace", "must match"),
        ("ünï", "must match"),
    ],
)
def test_bad_names_are_invalid_argument_and_write_nothing(
    store: ModelStore, tmp_path: Path, name: str, problem: str
) -> None:
    src = make_adapter(tmp_path / "a")
    with pytest.raises(ValueError, match=problem) as info:
        store.publish(name, src)
    assert isinstance(info.value, InvalidArgument)
    assert status_of(info.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert not store.root.exists() or not any(store.root.iterdir())


@pytest.mark.parametrize("spec", ["bot@0", "bot@-1", "bot@v2", "bot@", "../etc@1", "a/b@latest"])
def test_bad_references(store: ModelStore, spec: str) -> None:
    with pytest.raises(InvalidArgument):
        store.resolve(spec)


def test_good_names(store: ModelStore, tmp_path: Path) -> None:
    for name in ("a", "Bot_2.v-1", "9" * 64):
        assert store.publish(name, make_adapter(tmp_path / name)).name == name


@pytest.mark.parametrize("bad_file", ["adapter_model.bin", "pytorch_model.pt", "x.pkl", "x.ckpt"])
def test_only_safetensors_weights_are_accepted(
    store: ModelStore, tmp_path: Path, bad_file: str
) -> None:
    src = make_adapter(tmp_path / "a")
    (src / bad_file).write_bytes(b"\x80\x04pickle")
    with pytest.raises(InvalidArgument, match=bad_file):
        store.publish("bot", src)
    assert not (store.root / "bot" / "1").exists()


def test_refuses_missing_or_fake_safetensors(store: ModelStore, tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    with pytest.raises(InvalidArgument, match="no .safetensors"):
        store.publish("bot", src)
    (src / "adapter_model.safetensors").write_bytes(b"\x80\x04 not a safetensors file")
    with pytest.raises(InvalidArgument, match="not a valid safetensors"):
        store.publish("bot", src)
    with pytest.raises(InvalidArgument, match="does not exist"):
        store.publish("bot", tmp_path / "missing")


def test_refuses_reserved_or_unserialisable_metadata(store: ModelStore, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    with pytest.raises(InvalidArgument, match="written by the store"):
        store.publish("bot", src, {"version": 7})
    with pytest.raises(InvalidArgument, match="JSON"):
        store.publish("bot", src, {"x": object()})
    assert store.list() == []


def test_checksum_mismatch_is_detected(store: ModelStore, tmp_path: Path) -> None:
    ref = store.publish("bot", make_adapter(tmp_path / "a"))
    assert store.load_adapter_dir("bot@1") == ref.path
    weights = ref.path / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum mismatch for adapter_model.safetensors"):
        store.verify(ref)
    with pytest.raises(IntegrityError) as info:
        store.load_adapter_dir("bot")
    assert status_of(info.value)[0] == grpc.StatusCode.DATA_LOSS


def test_rewritten_metadata_is_detected_against_a_resolved_ref(
    store: ModelStore, tmp_path: Path
) -> None:
    ref = store.publish("bot", make_adapter(tmp_path / "a"))
    meta_path = ref.path / METADATA_FILE
    record = json.loads(meta_path.read_text())
    record["weights_sha256"] = "0" * 64
    meta_path.chmod(0o644)
    meta_path.write_text(json.dumps(record))
    with pytest.raises(IntegrityError, match="weights changed since it was resolved"):
        store.verify(ref)


def test_missing_or_extra_file_is_detected(store: ModelStore, tmp_path: Path) -> None:
    ref = store.publish("bot", make_adapter(tmp_path / "a"))
    (ref.path / "adapter_model.bin").write_bytes(b"planted")
    with pytest.raises(IntegrityError, match="unexpected files"):
        store.verify("bot@1")
    (ref.path / "adapter_model.bin").unlink()
    (ref.path / "adapter_config.json").unlink()
    with pytest.raises(IntegrityError, match="adapter_config.json is missing"):
        store.verify("bot@1")


def test_failure_mid_publish_leaves_no_version(
    store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_adapter(tmp_path / "a")
    (src / "tokenizer.json").write_text("{}")
    calls = []
    real_copy = ModelStore._copy

    def failing_copy(self: ModelStore, s: Path, d: Path) -> None:
        calls.append(s.name)
        if len(calls) == 2:
            raise OSError("disk full")
        real_copy(self, s, d)

    monkeypatch.setattr(ModelStore, "_copy", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        store.publish("bot", src)
    assert store.list() == []
    assert [p.name for p in (store.root / "bot").iterdir() if p.name != ".lock"] == []
    monkeypatch.undo()
    assert store.publish("bot", src).version == 1


def test_killed_publisher_leaves_no_visible_version(store: ModelStore, tmp_path: Path) -> None:
    """SIGKILL a real publishing process half way through copying: nothing appears."""
    src = make_adapter(tmp_path / "a")
    (src / "tokenizer.json").write_text("{}")
    script = textwrap.dedent(
        f"""
        import sys, time
        from common.model_store import ModelStore
        orig = ModelStore._copy
        def slow_copy(self, s, d):
            orig(self, s, d)
            print("copied", s.name, flush=True)
            time.sleep(60)  # killed here, after the first file of the copy
        ModelStore._copy = slow_copy
        ModelStore({str(store.root)!r}).publish("bot", {str(src)!r})
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("copied")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    leftovers = [p.name for p in (store.root / "bot").iterdir() if p.name != ".lock"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")  # the half copy
    assert store.list() == []
    with pytest.raises(NotFound):
        store.resolve("bot")
    assert store.publish("bot", src).version == 1
    assert store.clean_temporary(max_age_s=0) == 1


def test_concurrent_publishers_get_distinct_versions(store: ModelStore, tmp_path: Path) -> None:
    sources = [make_adapter(tmp_path / f"a{i}", bytes([i]) * 8) for i in range(6)]
    refs: list = [None] * len(sources)
    barrier = threading.Barrier(len(sources))

    def publish(i: int) -> None:
        barrier.wait()
        refs[i] = store.publish("bot", sources[i], {"i": i})

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(len(sources))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.version for r in refs) == [1, 2, 3, 4, 5, 6]
    for i, ref in enumerate(refs):
        assert store.verify(ref.ref).metadata["i"] == i
        assert ref.sha256 == sha256_file(sources[i] / "adapter_model.safetensors")


def test_rename_race_with_another_host_takes_next_version(
    store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version folder that appears between numbering and rename (a publisher on another
    host sharing the filesystem, invisible to our lock) is never replaced."""
    first = store.publish("bot", make_adapter(tmp_path / "a", b"\x01" * 8))
    real_rename = os.rename
    intruder = make_adapter(tmp_path / "intruder", b"\x09" * 8)

    def racing_rename(src: str, dst: str) -> None:
        if str(dst).endswith("/2") and not (store.root / "bot" / "2").exists():
            other = ModelStore(store.root)
            monkeypatch.setattr(os, "rename", real_rename)
            assert other.publish("bot", intruder).version == 2
            monkeypatch.setattr(os, "rename", racing_rename)
        real_rename(src, dst)

    monkeypatch.setattr(ModelStore, "_name_lock", lambda self, d: _null())
    monkeypatch.setattr(os, "rename", racing_rename)
    ref = store.publish("bot", make_adapter(tmp_path / "b", b"\x02" * 8))
    monkeypatch.undo()
    assert ref.version == 3
    assert store.verify("bot@2").sha256 == sha256_file(intruder / "adapter_model.safetensors")
    assert store.verify("bot@1").sha256 == first.sha256


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_split_resolution_and_republish_and_remove(store: ModelStore, tmp_path: Path) -> None:
    """A split picks the version of a bare name by the caller key's point; pinned refs
    bypass it; republish copies a version under another name; remove takes a name away."""
    for i in (1, 2):
        store.publish("bot", make_adapter(tmp_path / f"a{i}", bytes([i]) * 16))
    assert store.get_split("bot") == {}
    store.set_split("bot", {1: 30, 2: 70})
    assert store.get_split("bot") == {1: 30, 2: 70} and store.split_updated_unix_ms("bot") > 0
    for key in ("alice", "bob", "carol"):
        expected = 1 if split_point(key, "bot") < 30 else 2
        assert store.resolve("bot", key).version == expected
        assert store.resolve("bot@latest", key).version == expected
        assert store.resolve("bot@1", key).version == 1
    assert pick_version({1: 0, 2: 100}, 0.0) == 2 and pick_version({1: 50, 2: 50}, 49.9) == 1
    with pytest.raises(ArtifactNotFound, match="version\\(s\\) 3 not found"):
        store.set_split("bot", {1: 50, 3: 50})
    store.set_split("bot", {})
    assert store.get_split("bot") == {} and store.resolve("bot", "alice").version == 2

    copy = store.republish(store.resolve("bot@1"), "best-bot", {"sweep_best": True})
    assert copy.ref == "best-bot@1" and copy.sha256 == store.resolve("bot@1").sha256
    assert copy.metadata["sweep_best"] is True
    assert store.remove("bot") is True and store.remove("bot") is False
    assert [r.ref for r in store.list()] == ["best-bot@1"]
    with pytest.raises(ArtifactNotFound):
        store.resolve("bot")
