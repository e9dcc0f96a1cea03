"""A checkpoint's location as a local path: a file, an http(s) URL downloaded once into the cache,
or an official checkpoint's name (``blip/model_base``, ``utils.zoo``: the name stands for its URL).

The one download engine of the project: a download goes to a temp file (``utils.atomic``) and is
checked against ``Content-Length``, so a server that hangs up early never leaves a short file in the
cache; every network failure is one line naming the URL and the cause.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

from utils import zoo
from utils.atomic import _atomic_write
from utils.errors import CheckpointDownloadError, CheckpointValueError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """`$CONTEXTBLIP_CACHE`, else `~/.cache/contextblip/checkpoints`."""
    env = os.environ.get("CONTEXTBLIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "contextblip" / "checkpoints"


def _is_url(source: str | Path) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def _cache_path(url: str, cache_dir: Path) -> Path:
    # The URL hash prefix keeps `.../coco/model.pth` and `.../flickr/model.pth` apart.
    basename = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "checkpoint.pth"
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    return cache_dir / f"{digest}_{basename}"


def _copy_response(response: Any, f: IO[bytes], url: str, progress: bool) -> None:
    total = response.headers.get("Content-Length")
    total = int(total) if total and total.isdigit() else None
    bar = None
    if progress and sys.stderr.isatty():
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name)
        except ImportError:
            pass
    written = 0
    try:
        while chunk := response.read(_CHUNK):
            f.write(chunk)
            written += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if total is not None and written != total:
        raise CheckpointDownloadError(f"connection closed after {written} of {total} bytes")


def _describe(err: BaseException, timeout: float) -> str:
    if isinstance(err, CheckpointDownloadError):
        return str(err)
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, TimeoutError):
        return f"no answer within the {timeout:g} s timeout"
    return f"{type(reason).__name__}: {reason}"


def resolve_checkpoint(source: str | Path, cache_dir: str | Path | None = None,
                       timeout: float = 30.0, progress: bool = True) -> Path:
    """Return a local path for `source`: an existing file, an http(s) URL downloaded once, or an
    official checkpoint's name (`blip/model_base`: `utils.zoo`), which stands for its URL.

    URLs are cached as `<cache_dir>/<sha256(url)[:12]>_<basename>` and reused without network.
    `timeout` (seconds) bounds the connect and every single read, so a dead server never hangs us.
    Raises FileNotFoundError for a missing local path, ZooError for an unknown name (before any
    download) and CheckpointDownloadError (a RuntimeError) naming the URL and the cause for any
    network failure.
    """
    if zoo.is_zoo_name(source):
        source = zoo.zoo_url(source)
    if not _is_url(source):
        if isinstance(source, str) and "://" in source:
            raise CheckpointValueError(f"unsupported checkpoint location {source!r}: give a local path "
                             "or an http(s):// URL")
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {str(path)!r} (local path; URLs must "
                                    "start with http:// or https://)")
        if path.is_dir():
            raise IsADirectoryError(f"checkpoint path {str(path)!r} is a directory, not a file")
        return path

    url = str(source)
    dest = _cache_path(url, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    if dest.is_file():
        logger.info("using cached checkpoint %s for %s", dest, url)
        return dest
    logger.info("downloading %s to %s", url, dest)
    # Not torch.hub.download_url_to_file: when a server hangs up early it moves the short file into
    # place as if complete (http.client reports EOF, not IncompleteRead), and it takes no timeout.
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            _atomic_write(dest, lambda f: _copy_response(response, f, url, progress))
    # HTTPError < URLError < OSError, and TimeoutError / ConnectionResetError are OSErrors too;
    # HTTPException covers malformed answers (BadStatusLine, IncompleteRead).
    except (OSError, http.client.HTTPException, CheckpointDownloadError) as err:
        raise CheckpointDownloadError(
            f"could not download checkpoint {url}: {_describe(err, timeout)}. You can download the "
            "file manually and pass its local path instead.") from err
    return dest
