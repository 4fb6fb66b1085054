"""Where Ray Train and Tune keep checkpoints and results: a local directory or any ``pyarrow.fs`` URI.

On one machine the default -- the job's ``--workdir`` -- is right. On a cluster of several nodes
Ray Train persists each checkpoint from the worker that reports it and the driver reads it back, so
the storage must be one that every node sees: ``s3://bucket/prefix``, ``gs://bucket/prefix``, or a
path on a mount every node has (NFS). Ray removed head-node syncing in 2.7: a node-local path fails
at the first checkpoint (``Unable to set up cluster storage``). See ``docs/storage.md``.

A *location* below is a local path or a URI (``file:///...``, ``s3://...``, ...). Plain paths are read
directly; URIs through the ``pyarrow.fs`` filesystem that opens them (``file://`` ones too, so the same
code reads local and remote storage). A job's results sit under its storage root exactly as they
sit under the workdir by default::

    <root>/ray/<run_name>/epoch_NNNN/           amad distill (with job.json, Ray Train's snapshot)
    <root>/sweeps/<name>/tune/                  amad sweep: Ray Tune's experiment
    <root>/sweeps/<name>/trials/<trial_id>/     amad sweep: each trial's Ray Train run

The driver's own files (MLflow run records, ``summary.json``, ``best.json``, plots) stay under the
workdir. Readers of a checkpoint in storage given by a URI (export, the sweep's measurements, the
run's report) copy it once to ``<workdir>/checkpoint_cache/``.

Imports no Ray: a config is checked with this module before Ray starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from pipeline.config import ConfigError

CONFIG_KEY = "storage.path"
FLAG = "--storage-path"
CACHE_DIR = "checkpoint_cache"  # under the workdir: local copies of checkpoints read from a URI
REMOTE_EXAMPLES = "s3://bucket/prefix, gs://bucket/prefix, or a path on a mount every node has (NFS)"


# ---------------------------------------------------------------- locations: a local path or a URI


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` and ``file:...`` (a one-letter scheme would be a Windows drive)."""
    return len(urlsplit(str(location)).scheme) > 1


_FILESYSTEMS: dict[tuple[str, str, str], tuple[object, str]] = {}  # (scheme, netloc, query) -> (filesystem, path prefix)


def open_location(location: str | os.PathLike) -> tuple[object, str]:
    """``(pyarrow filesystem, path on it)`` of a location; a plain path is made absolute.

    The filesystem of a URI's bucket is opened once per process (``FileSystem.from_uri`` may ask the
    network, e.g. S3's bucket region) and reused for every location under it.
    """
    import pyarrow.fs

    text = str(location)
    if not is_uri(text):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
    parts = urlsplit(text)
    key, tail = (parts.scheme, parts.netloc, parts.query), parts.path.strip("/")
    if key in _FILESYSTEMS:
        filesystem, prefix = _FILESYSTEMS[key]
        return filesystem, (prefix + tail) if tail else (prefix.rstrip("/") or prefix)
    filesystem, path = pyarrow.fs.FileSystem.from_uri(text)
    path = path.rstrip("/") or path
    if tail and path.endswith(tail):  # e.g. s3://bucket/a/b -> "bucket/a/b": the prefix is "bucket/"
        _FILESYSTEMS[key] = (filesystem, path[: len(path) - len(tail)])
    return filesystem, path


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...``: a path joined as a path, a URI inside its path (its query kept)."""
    text = str(location)
    if not is_uri(text):
        return str(Path(text, *parts))
    split = urlsplit(text)
    path = PurePosixPath(split.path or "/", *parts).as_posix()
    return urlunsplit((split.scheme, split.netloc, path, split.query, ""))


def parent(location: str | os.PathLike) -> str:
    text = str(location)
    if not is_uri(text):
        return str(Path(text).parent)
    split = urlsplit(text)
    return urlunsplit((split.scheme, split.netloc, PurePosixPath(split.path or "/").parent.as_posix(), split.query, ""))


def name(location: str | os.PathLike) -> str:
    text = str(location)
    return PurePosixPath(urlsplit(text).path).name if is_uri(text) else Path(text).name


def _info(location: str | os.PathLike):
    filesystem, path = open_location(location)
    return filesystem.get_file_info(path)


def is_dir(location: str | os.PathLike) -> bool:
    import pyarrow.fs

    return _info(location).type == pyarrow.fs.FileType.Directory


def is_file(location: str | os.PathLike) -> bool:
    import pyarrow.fs

    return _info(location).type == pyarrow.fs.FileType.File


def read_bytes(location: str | os.PathLike) -> bytes:
    """The file's bytes; FileNotFoundError if there is none."""
    filesystem, path = open_location(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.readall()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def read_text_or_none(location: str | os.PathLike) -> str | None:
    """The file's text, or None if it is missing or unreadable."""
    try:
        return read_text(location)
    except (OSError, ValueError):
        return None


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write (or replace) a small file, creating its directory."""
    filesystem, path = open_location(location)
    filesystem.create_dir(PurePosixPath(path).parent.as_posix(), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())


def delete_file(location: str | os.PathLike) -> None:
    """Remove a file; nothing happens if it is not there."""
    filesystem, path = open_location(location)
    with contextlib.suppress(FileNotFoundError):
        filesystem.delete_file(path)


def list_names(location: str | os.PathLike) -> list[str]:
    """Names of the entries of a directory, sorted; empty if it does not exist."""
    import pyarrow.fs

    filesystem, path = open_location(location)
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(PurePosixPath(entry.path).name for entry in entries)


def download(location: str | os.PathLike, destination: Path) -> Path:
    """Copy the directory at ``location`` (any filesystem) into the local directory ``destination``."""
    import pyarrow.fs

    filesystem, path = open_location(location)
    destination.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(destination), source_filesystem=filesystem, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return destination


def local_checkpoint(location: str | os.PathLike, workdir: Path, what: str = "checkpoint") -> Path:
    """A local directory holding the checkpoint at ``location``.

    A plain path is returned as it is (made absolute). A URI is copied once to
    ``<workdir>/checkpoint_cache/<hash>/<name>`` (a checkpoint directory is written once and never
    changed, so a copy that finished is reused). ConfigError naming ``what`` if it is not a directory.
    """
    text = str(location)
    if not is_uri(text):
        return Path(text).expanduser().resolve()
    try:
        found = is_dir(text)
    except Exception as err:  # noqa: BLE001 -- credentials, network, a bucket that is gone: one clear line
        raise ConfigError(f"{what}: cannot read {text}: {_first_line(err)}") from None
    if not found:
        raise ConfigError(f"{what}: {text} is not a directory")
    copy = Path(workdir).resolve() / CACHE_DIR / hashlib.sha256(text.encode()).hexdigest()[:16] / (name(text) or "checkpoint")
    if copy.is_dir():
        return copy
    copy.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=copy.parent))
    try:
        download(text, partial)
        os.replace(partial, copy)  # whole or not at all: an interrupted copy is never taken for a checkpoint
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return copy


@contextlib.contextmanager
def local_directory(location: str | os.PathLike, scratch: Path) -> Iterator[Path]:
    """The directory at ``location`` as a local path for the ``with`` block: a plain path as it is, a
    URI copied into a temporary directory under ``scratch`` and removed afterwards."""
    text = str(location)
    if not is_uri(text):
        yield Path(text)
        return
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=scratch) as directory:
        yield download(text, Path(directory))


# ---------------------------------------------------------------- a job's storage root


@dataclass(frozen=True)
class Storage:
    """A job's storage root, resolved and opened.

    ``root``: an absolute local path, or a URI (``file://`` URIs stay URIs). ``source``: what set it
    (``--storage-path``, ``storage.path`` or ``--workdir``), named in messages.
    """

    root: str
    source: str
    filesystem: object = field(compare=False, repr=False)
    path: str = field(compare=False)  # the root on ``filesystem`` (a URI without its scheme, as Ray reports paths)

    @property
    def node_local(self) -> bool:
        """A path on this machine's filesystem (``file://`` included): only a shared mount makes it
        visible to other nodes, and nothing here can tell one from a local disk."""
        return getattr(self.filesystem, "type_name", "") == "local"

    def location(self, *parts: str) -> str:
        return join(self.root, *parts)

    def location_of(self, fs_path: str) -> str:
        """The location of a path Ray reports on this storage (Ray strips a URI's scheme and host)."""
        fs_path = str(fs_path)
        if not is_uri(self.root) or is_uri(fs_path):
            return fs_path
        root = self.path.rstrip("/")
        if fs_path != root and not fs_path.startswith(root.rstrip("/") + "/"):
            raise ValueError(f"{fs_path} is not under the storage {self.root} ({self.path})")
        return join(self.root, *PurePosixPath(fs_path[len(root):].lstrip("/")).parts)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# a value already opened in this process -> (root, filesystem, path, source): the CLI opens it first, naming its
# flag or file, and a job's main() that opens it again under the plain key keeps that name for its messages
_RESOLVED: dict[str, tuple[str, object, str, str]] = {}


def resolve(value: str | os.PathLike | None, workdir: Path, source: str = CONFIG_KEY) -> Storage:
    """The storage root of ``value`` (a path or a URI); None: ``workdir``.

    ConfigError naming ``source`` and the value when no filesystem opens it (an unknown scheme, a
    filesystem library that is missing, a bucket that cannot be reached) or when the path is a file.
    Asks no Ray and writes nothing: called before a job connects to Ray.
    """
    if value is None or str(value) == "":
        root = str(Path(workdir).expanduser().resolve())
        import pyarrow.fs

        return Storage(root, "--workdir", pyarrow.fs.LocalFileSystem(), root)
    text = str(value)
    if text in _RESOLVED:
        root, filesystem, path, first = _RESOLVED[text]
        return Storage(root, first if source == CONFIG_KEY else source, filesystem, path)
    if is_uri(text):
        split = urlsplit(text)
        root = urlunsplit((split.scheme, split.netloc, split.path.rstrip("/") or "/", split.query, ""))
        try:
            filesystem, path = open_location(root)
        except Exception as err:  # noqa: BLE001 -- pyarrow raises ArrowInvalid, OSError, ...: one clear line
            raise ConfigError(
                f"{source}={text!r}: no filesystem opens it ({_first_line(err)}); give a local path or a URI that "
                f"pyarrow.fs opens, with its library and credentials on every node: {REMOTE_EXAMPLES}, or file:///path"
            ) from None
    else:
        root = str(Path(text).expanduser().resolve())
        filesystem, path = open_location(root)
    import pyarrow.fs

    try:
        kind = filesystem.get_file_info(path).type if getattr(filesystem, "type_name", "") == "local" else None
    except OSError as err:
        raise ConfigError(f"{source}={text!r}: cannot be read ({_first_line(err)})") from None
    if kind == pyarrow.fs.FileType.File:
        raise ConfigError(f"{source}={text!r}: {path} is a file; give a directory (it is created if missing)")
    _RESOLVED[text] = (root, filesystem, path, source)
    return Storage(root, source, filesystem, path)


def check(value: str | os.PathLike | None, source: str = CONFIG_KEY) -> None:
    """Resolve a configured value now (nothing for None: the workdir), so a bad one is named by
    ``source`` (e.g. ``--storage-path``) before anything starts."""
    if value is not None:
        resolve(value, Path.cwd(), source)


def apply_flag(cfg, value: str | None, config_file: str | os.PathLike):
    """``cfg`` (a job config with ``storage``) with ``--storage-path`` applied when given, its storage
    checked now: a value no filesystem opens is a ConfigError naming the flag, or the file and key."""
    from pipeline.config import parse_config, with_overrides

    if value is not None:
        values = with_overrides(cfg.model_dump(mode="json"), {CONFIG_KEY: value})
        cfg = parse_config(values, type(cfg), f"{config_file} with {FLAG}={value}")
    check(cfg.storage.path, FLAG if value is not None else f"{config_file}: {CONFIG_KEY}")
    return cfg


def without_default_storage(values: dict) -> dict:
    """A dumped job config (and its ``job``, in a sweep) without ``storage`` where it is the default, so
    a job recorded before ``storage`` existed compares equal to the same job now."""
    values = dict(values)
    if (values.get("storage") or {}).get("path") is None:
        values.pop("storage", None)
    if isinstance(values.get("job"), dict):
        values["job"] = without_default_storage(values["job"])
    return values


# ---------------------------------------------------------------- a multi-node cluster needs shared storage


def shared_storage_warning(storage: Storage, alive_nodes: int, cluster_started_here: bool) -> str | None:
    """The warning to print before training, or None.

    Warn when the job joined a cluster of more than one node (not one it started on this machine, whose
    nodes all share its disk) and the storage is a path on this machine's filesystem (a plain path or
    ``file://``). A warning, not an error: an NFS mount at the same path on every node looks just the same.
    """
    if alive_nodes <= 1 or cluster_started_here or not storage.node_local:
        return None
    setting = "the default, under --workdir" if storage.source == "--workdir" else f"set by {storage.source}"
    return (
        f"WARNING: the Ray cluster has {alive_nodes} nodes and checkpoints go to {storage.root} ({setting}), a path on "
        f"this machine. Every node must see this same path (Ray Train writes each checkpoint from the worker that "
        f"reports it, and the driver reads it back), or the run fails at its first checkpoint. Unless it is a "
        f"shared mount (NFS) on every node, use {FLAG} s3://bucket/prefix or gs://bucket/prefix "
        f"(or storage: {{path: ...}} in the config); see docs/storage.md."
    )


def warn_if_not_shared(storage: Storage) -> str | None:
    """After connecting to Ray: print :func:`shared_storage_warning` for this cluster (stderr); returns it."""
    import ray

    from pipeline.local_cluster import started_here

    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    message = shared_storage_warning(storage, alive, started_here())
    if message:
        print(message, file=sys.stderr, flush=True)
    return message
