"""Ingestion: a path or any fsspec URL (s3://, gs://, az://, hf://, http(s)://, file://) made a
verified local file, each store read with its own credentials chain into the download cache;
and the config's series, fetched or generated."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import fsspec

from tasks import file_name
from tasks.config import TimeSeriesConfig
from tasks.data import SERIES_SUFFIXES, DataError, Series, generate_series, load_series
from tasks.panel import PanelData, load_panel


class TransientDataError(DataError):
    """A download failure worth retrying (network trouble, 5xx, 429)."""


# URL scheme -> the extra of rnnflow (pyproject.toml) that installs fsspec's backend for it
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "adl": "azure",
          "hf": "hf"}


def _scheme(location: str) -> str:
    """The scheme of a URL that fsspec reads (s3, gs, az, hf, https, ...); '' for a local path or file:// URL."""
    protocol, _ = fsspec.core.split_protocol(location)
    return "" if protocol in (None, "file", "local") else protocol


def _transient(exc: BaseException) -> bool:
    """Worth retrying: network trouble and server-side errors, not 4xx, a missing file or a bad checksum.
    Every backend has its own network errors (aiohttp's ClientConnectorError, botocore's
    EndpointConnectionError, httpx's ConnectError, ...): they say so in their names."""
    status = getattr(exc, "status", None)  # aiohttp's ClientResponseError: fsspec's http raises it past a 404
    if isinstance(status, int):
        return status >= 500 or status == 429
    return isinstance(exc, (ConnectionError, TimeoutError)) or any(
        word in cls.__name__ for cls in type(exc).__mro__ for word in ("Connect", "Timeout"))


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_handed_over: dict[tuple, tuple[str, str]] = {}  # downloads made by a run's pre-flight check


def fetch_data(location: str, sha256: str = "", suffixes: tuple[str, ...] = (), hand_over: bool = False
               ) -> tuple[str, str]:
    """Make ``location`` (a path or any fsspec URL: s3://, gs://, az://, hf://, http(s)://, file://)
    a verified local file; returns (path, sha256). ``hand_over``: keep a download for the next
    call with the same arguments (a run's pre-flight check, then the run), which takes it instead
    of downloading again."""
    key = (location, sha256, tuple(suffixes))
    if not hand_over and key in _handed_over and Path(_handed_over[key][0]).is_file():
        return _handed_over.pop(key)
    if _scheme(location):
        path, digest = _download(location, sha256)
    else:
        path = Path(fsspec.core.split_protocol(location)[1]).expanduser()
        if path.is_dir():
            raise DataError(f"{location}: is a directory, not a file")
        if not path.is_file():
            raise DataError(f"{location}: no such file")
        digest = sha256_file(path)
        _check_sha(location, digest, sha256)
    if suffixes and path.suffix.lower() not in suffixes:
        raise DataError(f"{location}: unsupported file type {path.suffix!r}; expected one of {', '.join(suffixes)}")
    if hand_over and _scheme(location):
        _handed_over[key] = (str(path), digest)
    return str(path), digest


def _download(location: str, sha256: str) -> tuple[Path, str]:
    """Copy through fsspec (each store with its own credentials chain) into a temporary file,
    renamed once complete and verified: nothing half-written is ever read, and the temporary file
    never outlives the call."""
    fs, remote = _filesystem(location)
    dest_dir = Path(os.environ.get("RNNFLOW_DOWNLOADS", Path.cwd() / "data" / "downloads"))
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".part-")
    os.close(fd)  # each backend opens the file by its name
    try:
        try:
            fs.get_file(remote, tmp)
        except Exception as e:  # each backend raises its own types: aiohttp's, botocore's, google's, ...
            raise (TransientDataError if _transient(e) else DataError)(f"{location}: {_reason(location, e)}") from e
        digest = sha256_file(Path(tmp))
        _check_sha(location, digest, sha256)
        path = dest_dir / f"{digest[:12]}-{file_name(location) or 'download'}"
        os.replace(tmp, path)
        return path, digest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _filesystem(location: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem for the URL's scheme, and the path in it; a missing backend named with its extra."""
    try:
        return fsspec.core.url_to_fs(location)
    except ImportError as e:  # fsspec says which package reads the scheme
        extra = EXTRAS.get(_scheme(location))
        raise DataError(f"{location}: {e}" + (f" (pip install 'rnnflow[{extra}]')" if extra else "")) from None
    except ValueError as e:  # an unknown scheme, or options fsspec refuses
        raise DataError(f"{location}: cannot be read ({e})") from None


def _reason(location: str, e: BaseException) -> str:
    """Why a store refused the download, in one line: an HTTP status as HTTP 404 Not Found, else the store's words."""
    message = " ".join(str(e).split()) or type(e).__name__  # one line: botocore's messages hold newlines
    if isinstance(e, FileNotFoundError):
        return "HTTP 404 Not Found" if _scheme(location) in ("http", "https") else f"not found ({message})"
    if isinstance(getattr(e, "status", None), int):  # aiohttp's ClientResponseError
        return f"HTTP {e.status} {getattr(e, 'message', '')}".rstrip()
    if isinstance(e, PermissionError):
        return f"access denied ({message})"
    return f"cannot download ({message})"


def _check_sha(location: str, actual: str, expected: str) -> None:
    if expected and actual.lower() != expected.lower():
        raise DataError(f"{location}: sha256 is {actual}, expected {expected}")


def read_series(cfg: TimeSeriesConfig, hand_over: bool = False) -> Series | PanelData:
    """The config's series (many with --id-column), fetched or generated: where a sweep trial runs,
    when a registered version's data is rebuilt (a path or URL travels, not the data), or when the
    command line checks its input before Prefect starts (``hand_over``: see ``fetch_data``)."""
    if cfg.source == "file":
        return (load_panel if cfg.panel else load_series)(*fetch_data(cfg.data, cfg.sha256, SERIES_SUFFIXES,
                                                                       hand_over), cfg)
    return generate_series(cfg)
