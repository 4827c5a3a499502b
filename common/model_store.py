"""The model store: immutable, versioned, checksummed fine-tuning artifacts on disk.

Layout: ``<root>/<name>/<version>/`` with versions 1, 2, 3, ... Each version folder
holds the artifact (PEFT ``adapter_config.json`` + ``adapter_model.safetensors``, or a
full HF model folder) and ``metadata.json`` (base model, method, hyperparameters,
metrics, the sha256 of every file, creation time, and any extra keys the publisher
passed such as a trace id).

Publishing copies into a hidden temporary folder beside the versions, checksums it, and
renames it into place: a crash at any point leaves either no new version or a complete
one. Concurrent publishers of one name are serialised by a lock file, and the rename
itself refuses to replace an existing version, so none can clobber another.

A name may also carry a traffic split, ``<root>/<name>/split.json`` (version → weight,
summing to 100): :meth:`ModelStore.resolve` then picks the version a bare ``name`` (or
``name@latest``) serves, by a deterministic hash of the caller's key (see
:func:`split_point`), so one caller stays on one version; ``name@3`` bypasses it.

Only safetensors weights are accepted (pickle-based ``.bin``/``.pt``/... files can run
code when loaded). No torch here: the router imports ``common``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from common.config import home_dir
from common.errors import InvalidArgument, NotFound, RequestError

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Files an artifact may contain: weights in safetensors, configs and tokenizer files.
# Everything else is refused, above all pickle formats (.bin .pt .pth .pkl .ckpt).
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".jinja", ".model")
_RESERVED_KEYS = ("name", "version", "files", "weights_sha256", "created_unix_ms", "created")
_TMP_PREFIX = ".tmp-"
SPLIT_FILE = "split.json"
SPLIT_TOTAL = 100  # split weights are percentages
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class InvalidArtifactName(InvalidArgument, ValueError):
    """A name or reference that breaks the naming rules (INVALID_ARGUMENT)."""


class InvalidArtifact(InvalidArgument, ValueError):
    """A folder that cannot be published: pickle files, no weights, bad metadata."""


class ArtifactNotFound(NotFound, KeyError):
    """No such name, or no such version of it (NOT_FOUND)."""


class IntegrityError(RequestError):
    """A stored file no longer matches its recorded sha256 (DATA_LOSS)."""

    code = grpc.StatusCode.DATA_LOSS


@dataclass(frozen=True)
class ArtifactRef:
    """One stored version. ``sha256`` is that of the weights (see :func:`weights_sha256`)."""

    name: str
    version: int
    path: Path
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def ref(self) -> str:
        """``name@version``, as GenerateRequest.adapter takes it."""
        return f"{self.name}@{self.version}"


def default_store_root() -> Path:
    """Where artifacts live unless configured: ``<llmcluster home>/store``."""
    return home_dir() / "store"


def validate_name(name: Any) -> str:
    """Returns ``name`` if it is a valid artifact name, else raises InvalidArtifactName."""
    if not isinstance(name, str) or not name:
        raise InvalidArtifactName(f"artifact name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name:
        raise InvalidArtifactName(f"artifact name {name!r} must not contain slashes")
    if ".." in name:
        raise InvalidArtifactName(f"artifact name {name!r} must not contain '..'")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArtifactName(
            f"artifact name {name!r} must match {NAME_PATTERN.pattern} "
            "(letters, digits, '.', '_', '-'; starting with a letter or digit; at most 64)"
        )
    return name


def parse_ref(spec: str) -> tuple[str, int | None]:
    """``name`` / ``name@latest`` → (name, None); ``name@3`` → (name, 3)."""
    if not isinstance(spec, str):
        raise InvalidArtifactName(f"artifact reference must be a string, got {spec!r}")
    name, sep, version = spec.partition("@")
    validate_name(name)
    if not sep or version == "latest":
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise InvalidArtifactName(
            f"version in {spec!r} must be a positive integer or 'latest', got {version!r}"
        )
    return name, int(version)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(files: dict[str, str]) -> str:
    """The artifact's weights hash: the sha256 of its one ``.safetensors`` file, or for
    sharded weights the sha256 of the sorted "path sha256" lines of all of them."""
    weights = sorted((p, s) for p, s in files.items() if p.endswith(".safetensors"))
    if len(weights) == 1:
        return weights[0][1]
    return hashlib.sha256("".join(f"{p} {s}\n" for p, s in weights).encode()).hexdigest()


def _check_safetensors(path: Path, rel: str) -> None:
    """Parses the safetensors header (8-byte length + JSON) without loading tensors."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_SAFETENSORS_HEADER:
                raise ValueError("header too large")
            header = json.loads(fh.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidArtifact(f"{rel} is not a valid safetensors file: {exc}") from None


def _scan(folder: Path) -> list[str]:
    """Relative paths of the files to publish; refuses links, pickle and unknown files."""
    if not folder.is_dir():
        raise InvalidArtifact(f"artifact folder {folder} does not exist")
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise InvalidArtifact(f"{rel} is a symbolic link; artifacts hold plain files only")
        if path.is_dir():
            continue
        if rel == METADATA_FILE:
            continue  # the store writes its own
        if not path.name.endswith(ALLOWED_SUFFIXES):
            raise InvalidArtifact(
                f"{rel}: only safetensors weights and {', '.join(ALLOWED_SUFFIXES[1:])} "
                "files are accepted (pickle formats like .bin/.pt are refused)"
            )
        if path.name.endswith(".safetensors"):
            _check_safetensors(path, rel)
        files.append(rel)
    if not any(f.endswith(".safetensors") for f in files):
        raise InvalidArtifact(f"artifact folder {folder} has no .safetensors weights")
    return files


def split_point(key: str, name: str) -> float:
    """Where caller ``key`` falls in [0, 100) for adapter ``name``: the first 8 bytes of
    sha256(name NUL key) scaled, so the same key always lands on the same point (sticky)
    and different names spread one caller independently."""
    digest = hashlib.sha256(f"{name}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * SPLIT_TOTAL


def pick_version(weights: dict[int, int], point: float) -> int:
    """The version whose cumulative-weight interval (versions in ascending order) holds
    ``point`` in [0, 100)."""
    upper = 0
    chosen = None
    for version in sorted(weights):
        if weights[version] <= 0:
            continue
        upper += weights[version]
        chosen = version
        if point < upper:
            return version
    if chosen is None:
        raise ValueError("a split needs a version with weight > 0")
    return chosen  # point == 100 cannot happen; float rounding lands on the last


class ModelStore:
    """Versioned artifacts under ``root`` (see the module docstring for the layout)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_store_root()

    # ------------------------------------------------------------ publishing

    @contextlib.contextmanager
    def _name_lock(self, name_dir: Path) -> Iterator[None]:
        """Serialises version numbering between processes publishing the same name."""
        with open(name_dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def publish(
        self, name: str, src_dir: str | Path, metadata: dict[str, Any] | None = None
    ) -> ArtifactRef:
        """Copies ``src_dir`` in as the next version of ``name`` and returns its ref.

        ``metadata`` (base_model, method, hyperparameters, metrics, trace_id, ...) must be
        JSON-serialisable and must not use the keys the store writes itself.
        """
        validate_name(name)
        src = Path(src_dir)
        metadata = dict(metadata or {})
        clash = sorted(set(metadata) & set(_RESERVED_KEYS))
        if clash:
            raise InvalidArtifact(f"metadata keys {clash} are written by the store")
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as exc:
            raise InvalidArtifact(f"metadata is not JSON-serialisable: {exc}") from None
        rel_files = _scan(src)

        name_dir = self.root / name
        name_dir.mkdir(parents=True, exist_ok=True)
        tmp = name_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            files: dict[str, str] = {}
            for rel in rel_files:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                self._copy(src / rel, target)
                files[rel] = sha256_file(target)  # hash the copy: what is stored is checked
            for rel in rel_files:
                (tmp / rel).chmod(0o444)  # immutable by convention and by mode
            ref = self._claim_version(name, name_dir, tmp, files, metadata)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("published %s (%s files, weights %s)", ref.ref, len(files), ref.sha256[:12])
        return ref

    def republish(
        self, ref: ArtifactRef, name: str, metadata: dict[str, Any] | None = None
    ) -> ArtifactRef:
        """Publishes a stored version again as the next version of ``name`` (a sweep's
        best trial under the sweep's name): its files, checked first, and its metadata
        with ``metadata`` added."""
        ref = self.verify(ref)
        carried = {k: v for k, v in ref.metadata.items() if k not in _RESERVED_KEYS}
        return self.publish(name, ref.path, {**carried, **(metadata or {})})

    def remove(self, name: str) -> bool:
        """Removes every version of ``name`` (a sweep's trial adapters it discards):
        renamed to a hidden folder first, so readers see all of it or none. An adapter
        already loaded by a worker keeps serving from memory. False if there was none."""
        validate_name(name)
        name_dir = self.root / name
        if not name_dir.is_dir():
            return False
        doomed = self.root / f".removed-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(name_dir, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        logger.info("removed %s from the model store", name)
        return True

    def _copy(self, src: Path, dst: Path) -> None:
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as fh:
            os.fsync(fh.fileno())  # data on disk before the rename makes it visible

    def _claim_version(
        self,
        name: str,
        name_dir: Path,
        tmp: Path,
        files: dict[str, str],
        metadata: dict[str, Any],
    ) -> ArtifactRef:
        with self._name_lock(name_dir):
            # The lock serialises publishers on this host; the rename refusing to replace
            # a non-empty folder still protects publishers on other hosts (shared FS).
            for _ in range(100):
                version = max(self._versions(name_dir), default=0) + 1
                now = time.time()
                record = {
                    **metadata,
                    "name": name,
                    "version": version,
                    "created_unix_ms": int(now * 1000),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                    "files": files,
                    "weights_sha256": weights_sha256(files),
                }
                meta_path = tmp / METADATA_FILE
                if meta_path.exists():
                    meta_path.chmod(0o644)
                meta_path.write_text(json.dumps(record, indent=2, sort_keys=True))
                meta_path.chmod(0o444)
                target = name_dir / str(version)
                try:
                    os.rename(tmp, target)
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        continue  # another publisher took this number: try the next
                    raise
                _fsync_dir(name_dir)
                return ArtifactRef(name, version, target, record["weights_sha256"], record)
        raise RuntimeError(f"could not claim a version of {name!r}")

    # ------------------------------------------------------------ reading

    @staticmethod
    def _versions(name_dir: Path) -> list[int]:
        """Published versions: folders named by a number (temporary folders are hidden)."""
        if not name_dir.is_dir():
            return []
        return sorted(
            int(p.name)
            for p in name_dir.iterdir()
            if p.name.isdigit() and (p / METADATA_FILE).is_file()
        )

    def _ref(self, name: str, version: int) -> ArtifactRef:
        path = self.root / name / str(version)
        try:
            record = json.loads((path / METADATA_FILE).read_text())
        except FileNotFoundError:
            raise ArtifactNotFound(f"artifact {name}@{version} not found") from None
        return ArtifactRef(name, version, path, record.get("weights_sha256", ""), record)

    def resolve(self, spec: str, split_key: str | None = None) -> ArtifactRef:
        """``name`` or ``name@latest`` → the newest version, or, when the name carries a
        traffic split, the version the split gives ``split_key`` (sticky; no key: a
        random draw); ``name@3`` → version 3 always."""
        name, version = parse_ref(spec)
        versions = self._versions(self.root / name)
        if not versions:
            stored = sorted({r.name for r in self.list()})
            raise ArtifactNotFound(
                f"artifact {name!r} not found (stored: {', '.join(stored) or 'none'})"
            )
        if version is None:
            weights = self.get_split(name)
            if weights:
                point = split_point(split_key, name) if split_key else random.random() * SPLIT_TOTAL
                version = pick_version(weights, point)
            else:
                version = versions[-1]
        elif version not in versions:
            # Name and version are told apart: the name exists, this version does not.
            raise ArtifactNotFound(
                f"version {version} of {name} not found (versions are "
                f"{', '.join(map(str, versions))}; {name}@{versions[-1]} is the latest)"
            )
        return self._ref(name, version)

    def list(self, name: str | None = None) -> list[ArtifactRef]:
        """Every stored version (of ``name`` only, if given), by name then version."""
        if name is not None:
            names = [validate_name(name)]
        elif self.root.is_dir():
            names = sorted(p.name for p in self.root.iterdir() if NAME_PATTERN.fullmatch(p.name))
        else:
            names = []
        return [self._ref(n, v) for n in names for v in self._versions(self.root / n)]

    # ------------------------------------------------------------ traffic splits

    def get_split(self, name: str) -> dict[int, int]:
        """``name``'s split, version → weight ({} when it has none)."""
        path = self.root / validate_name(name) / SPLIT_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        return {int(v): int(w) for v, w in raw.get("weights", {}).items()}

    def split_updated_unix_ms(self, name: str) -> int:
        """When ``name``'s split was set (0: no split)."""
        path = self.root / validate_name(name) / SPLIT_FILE
        try:
            return int(json.loads(path.read_text()).get("updated_unix_ms", 0))
        except FileNotFoundError:
            return 0

    def set_split(self, name: str, weights: dict[int, int]) -> None:
        """Stores ``name``'s split (already validated: common.validation.traffic_split);
        every version must be published. Written whole (tmp + rename); ``{}`` clears."""
        validate_name(name)
        name_dir = self.root / name
        path = name_dir / SPLIT_FILE
        if not weights:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        versions = self._versions(name_dir)
        if not versions:
            raise ArtifactNotFound(f"adapter {name!r} not found: no version is published")
        missing = sorted(set(weights) - set(versions))
        if missing:
            raise ArtifactNotFound(
                f"adapter {name}: version(s) {', '.join(map(str, missing))} not found "
                f"(versions are {', '.join(map(str, versions))})"
            )
        record = {
            "weights": {str(v): w for v, w in sorted(weights.items())},
            "updated_unix_ms": int(time.time() * 1000),
        }
        tmp = name_dir / f".{SPLIT_FILE}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)

    def verify(self, ref: ArtifactRef | str) -> ArtifactRef:
        """Recomputes every file's sha256; raises IntegrityError on a changed, missing or
        unexpected file. Returns the (resolved) ref."""
        if isinstance(ref, str):
            ref = self.resolve(ref)
        else:
            expected_sha = ref.sha256
            ref = self._ref(validate_name(ref.name), ref.version)
            # A ref resolved earlier must still describe the same weights (the worker
            # keys loaded adapters by this hash).
            if expected_sha and expected_sha != ref.sha256:
                raise IntegrityError(
                    f"{ref.ref}: weights changed since it was resolved "
                    f"({expected_sha[:16]}... -> {ref.sha256[:16]}...)"
                )
        recorded: dict[str, str] = ref.metadata.get("files", {})
        present = {
            p.relative_to(ref.path).as_posix()
            for p in ref.path.rglob("*")
            if p.is_file() or p.is_symlink()
        } - {METADATA_FILE}
        extra = sorted(present - set(recorded))
        if extra:
            raise IntegrityError(f"{ref.ref}: unexpected files {extra}")
        for rel, expected in sorted(recorded.items()):
            path = ref.path / rel
            if path.is_symlink() or not path.is_file():
                raise IntegrityError(f"{ref.ref}: file {rel} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise IntegrityError(
                    f"{ref.ref}: checksum mismatch for {rel}: "
                    f"expected {expected[:16]}..., found {actual[:16]}..."
                )
        if weights_sha256(recorded) != ref.sha256:
            raise IntegrityError(f"{ref.ref}: weights checksum does not match metadata")
        return ref

    def load_adapter_dir(self, ref: ArtifactRef | str) -> Path:
        """The verified folder of ``ref`` (``name``, ``name@3``, or a ref): what the worker
        hands to peft / from_pretrained after this check passes."""
        return self.verify(ref).path

    def clean_temporary(self, max_age_s: float = 3600.0) -> int:
        """Removes temporary folders older than ``max_age_s`` left by crashed publishers."""
        removed = 0
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - max_age_s
        for name_dir in self.root.iterdir():
            if not name_dir.is_dir():
                continue
            for p in name_dir.glob(f"{_TMP_PREFIX}*"):
                if p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)
                    removed += 1
        return removed


def _fsync_dir(path: Path) -> None:
    """Makes a rename in ``path`` durable (POSIX needs the directory synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
