"""Models from the Hugging Face Hub, fetched with huggingface_hub.

Everything the library offers is used as it is: its cache (HF_HUB_CACHE, shared with every other
tool that uses it), its progress bars, its token (HF_TOKEN or `hf auth login`), its endpoint
(HF_ENDPOINT), offline mode (HF_HUB_OFFLINE=1) and its retries: a transfer cut mid-file is resumed
from where it stopped with an HTTP range request, up to five times in a row. One thing is added: when
the network stays away for longer than that, the bytes already downloaded are kept in the cache and
the next build resumes from them (see `_resumable_download` for why huggingface_hub cannot do that
itself). Nothing here writes anywhere but that cache.

A repository is named OWNER/REPO[:QUANT] (one GGUF, or one split model, picked by its quantization)
or hf://OWNER/REPO/PATH.gguf (one file, or the first part of a split model).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import inspect
import os
import posixpath
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import click

from bundler.sources import Fetched
from bundler.splits import split_name
from runtime.bundle_format import Source, SourceFile
from runtime.errors import ModelFileError

HF_PREFIX = "hf://"
DEFAULT_QUANT = "Q4_K_M"
# OWNER/REPO, optionally :QUANT. A name ending in .gguf is taken for a local path instead.
REPO_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<quant>[\w.+-]+))?$")
# A quantization as it appears in GGUF file names (Q4_K_M, IQ3_XXS, Q8_0, TQ1_0, BF16, UD-Q4_K_XL, MXFP4 ...).
_QUANT_LABEL = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|TQ\d_\d|BF16|F16|F32|FP16|FP8|MXFP4(?:_MOE)?))(?![A-Za-z0-9])",
    re.IGNORECASE,
)

try:  # the HTTP client huggingface_hub uses: httpx2 from 2.0 on, httpx before
    from httpx2 import TransportError as _TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError as _TransportError


def looks_like_repo(spec: str) -> bool:
    """Whether `spec` names a Hub repository (OWNER/REPO[:QUANT]) rather than a file."""
    return bool(REPO_SPEC.match(spec)) and not spec.lower().endswith(".gguf")


def fetch(spec: str, revision: str | None) -> Fetched:
    """Download (or find in the cache) the GGUF parts that `spec` names: OWNER/REPO[:QUANT] or hf://OWNER/REPO/FILE."""
    repo, quant, path = _parse(spec)
    commit, files, online = _listing(repo, revision)
    if path is not None:
        parts = _file_parts(repo, path, files, revision, online)
    else:
        parts = choose_parts(repo, files, quant, _where(revision, online))
    click.echo(f"{repo}: {_list_parts(parts)}, commit {commit[:12]}{'' if online else ' (offline, from the cache)'}", err=True)
    local = [_download(repo, part, revision, commit, online) for part in parts]
    from huggingface_hub import constants

    source = Source(
        kind="hub",
        repo=repo,
        revision=revision or "main",
        commit=commit,
        endpoint=constants.ENDPOINT,
        files=[SourceFile(name=part, size=p.stat().st_size, sha256="") for part, p in zip(parts, local)],
    )
    return Fetched(parts=local, source=source)


def _list_parts(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{parts[0]} and {len(parts) - 1} more parts"


def _parse(spec: str) -> tuple[str, str | None, str | None]:
    """(repo, quant, path in the repo) from OWNER/REPO[:QUANT] or hf://OWNER/REPO[/PATH]."""
    if spec.startswith(HF_PREFIX):
        owner, _, rest = spec[len(HF_PREFIX) :].partition("/")
        name, _, path = rest.partition("/")
        if not owner or not name:
            raise ModelFileError(f"{spec} names no repository: write hf://OWNER/REPO/FILE.gguf")
        if path and not path.lower().endswith(".gguf"):
            raise ModelFileError(f"{spec} is not a GGUF file: write hf://OWNER/REPO/FILE.gguf")
        if not path:
            spec = f"{owner}/{name}"
        else:
            return f"{owner}/{name}", None, path
    match = REPO_SPEC.match(spec)
    if not match:
        raise ModelFileError(f"{spec!r} is not a Hugging Face repository: write OWNER/REPO or OWNER/REPO:QUANT")
    return match["repo"], match["quant"], None


def quant_label(path: str) -> str | None:
    """The quantization a GGUF's name states (upper case), e.g. 'Q4_K_M' for 'model-q4_k_m.gguf'."""
    found = _QUANT_LABEL.findall(path.rsplit("/", 1)[-1]) or _QUANT_LABEL.findall(path)
    return found[-1].upper() if found else None


def choose_parts(repo: str, files: list[str], quant: str | None, where: str = "") -> list[str]:
    """The repository paths of the model to bundle: one GGUF, or every part of a split one.

    With `quant`, the GGUF of that quantization (case-insensitive); without, Q4_K_M if there is one,
    else the only GGUF. Vision projectors (mmproj) are never picked. Anything else is an error that
    lists the choices.
    """
    models = _models(files)
    if not models:
        raise ModelFileError(f"{repo} has no GGUF files{where}")
    wanted = quant or DEFAULT_QUANT
    matches = [m for m in models if quant_label(m) == wanted.upper()]
    if not matches and quant:
        token = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)
        matches = [m for m in models if token.search(m)]
    if not matches and not quant and len(models) == 1:
        matches = list(models)
    if len(matches) == 1:
        chosen = models[matches[0]]
        _check_parts(repo, matches[0], 1, chosen, files, where)
        return chosen
    if len(matches) > 1:
        raise ModelFileError(
            f"{repo} has several {wanted.upper()} GGUFs ({', '.join(matches)}); name one with hf://{repo}/FILE.gguf"
        )
    choices = ", ".join(_choices(models))
    if quant:
        raise ModelFileError(f"{repo} has no {quant} GGUF{where}; it has {choices}")
    raise ModelFileError(f"{repo} has {len(models)} GGUF models{where}; pick one with {repo}:QUANT: {choices}")


def _models(files: list[str]) -> dict[str, list[str]]:
    """Each model in `files` (a GGUF, or the first part of a split one) with the paths of all its parts."""
    models: dict[str, list[str]] = {}
    for path in sorted(files):
        folder, base = posixpath.split(path)
        if not base.lower().endswith(".gguf") or "mmproj" in base.lower():
            continue
        name = split_name(base)
        if name is None or name.count == 1:
            models[path] = [path]
        elif name.number == 1:
            models[path] = [posixpath.join(folder, part) for part in name.parts]
    return models


def _choices(models: dict[str, list[str]]) -> list[str]:
    labels = [quant_label(m) for m in models]
    return [
        label if label and labels.count(label) == 1 else m + (f" ({len(parts)} parts)" if len(parts) > 1 else "")
        for (m, parts), label in zip(models.items(), labels)
    ]


def _file_parts(repo: str, path: str, files: list[str], revision: str | None, online: bool) -> list[str]:
    """The parts of the file hf://REPO/PATH names: itself, or all parts of the split model it belongs to."""
    folder, base = posixpath.split(path)
    name = split_name(base)
    parts = [path] if name is None or name.count == 1 else [posixpath.join(folder, p) for p in name.parts]
    if path not in files:
        others = ", ".join(_choices(_models(files))) or "none"
        raise ModelFileError(f"{repo} has no file {path}{_where(revision, online)}; its GGUFs: {others}")
    if name is not None:
        _check_parts(repo, path, name.number, parts, files, _where(revision, online))
    return parts


def _check_parts(repo: str, given: str, number: int, parts: list[str], files: list[str], where: str) -> None:
    """Refuse a split model some of whose parts the repository lacks, before anything is downloaded."""
    missing = [p for p in parts if p not in files]
    if missing:
        raise ModelFileError(
            f"{repo}: {given} is part {number} of {len(parts)}, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing{where}"
        )


def _where(revision: str | None, online: bool) -> str:
    at = f" at revision {revision}" if revision else ""
    return at + ("" if online else " in the Hugging Face cache (offline)")


def _listing(repo: str, revision: str | None) -> tuple[str, list[str], bool]:
    """(commit, paths of its files, whether the Hub answered): from the Hub, else from the cache."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    with _hub_errors(repo, revision=revision):
        try:
            info = HfApi().model_info(repo, revision=revision)
            assert info.sha is not None, "the Hub gave no commit for the repository"
            return info.sha, [s.rfilename for s in info.siblings or []], True
        except (OfflineModeIsEnabled, _TransportError) as exc:
            problem: Exception = exc
        except HfHubHTTPError as exc:
            if _status(exc) < 500:
                raise
            problem = exc
    commit, files = _cached_listing(repo, revision, problem)
    return commit, files, False


def _cached_listing(repo: str, revision: str | None, problem: Exception) -> tuple[str, list[str]]:
    """The files of `repo` at `revision` that huggingface_hub's cache holds."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import OfflineModeIsEnabled

    wanted = revision or "main"
    try:
        cached = [r for r in scan_cache_dir().repos if r.repo_id == repo and r.repo_type == "model"]
    except Exception:  # CacheNotFound, or an unreadable cache: the same as an empty one
        cached = []
    for entry in cached:
        for rev in entry.revisions:
            if wanted in rev.refs or rev.commit_hash == wanted:
                files = [f.file_path.relative_to(rev.snapshot_path).as_posix() for f in rev.files]
                return rev.commit_hash, files
    if isinstance(problem, OfflineModeIsEnabled) or constants.HF_HUB_OFFLINE:
        raise ModelFileError(
            f"{repo}{_at(revision)} is not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it; "
            "build once while online"
        )
    raise ModelFileError(
        f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({_short(problem)}) and {repo}{_at(revision)} "
        "is not in the cache; check the connection or HF_ENDPOINT and run the command again"
    )


def _download(repo: str, path: str, revision: str | None, commit: str, online: bool) -> Path:
    """The local path of `path` in the cache, downloading it first if needed (with huggingface_hub's progress bar)."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo, path=path, revision=revision):
        if online:
            _resumable_download(repo, path, commit)
        # Links the file into the cache's snapshot (and records the branch or tag), or downloads it itself
        # where _resumable_download left it alone.
        local = Path(hf_hub_download(repo_id=repo, filename=path, revision=revision))
    # The cache keeps files at snapshots/COMMIT/PATH: the commit the file came from.
    snapshot = local
    for _ in PurePosixPath(path).parts:
        snapshot = snapshot.parent
    if snapshot.name != commit:
        raise ModelFileError(
            f"{repo} changed while it was being downloaded (now at commit {snapshot.name[:12]}); run the command again, "
            "or pin a commit with --revision"
        )
    return local


def _resumable_download(repo: str, path: str, commit: str) -> None:
    """Download `path` at `commit` into huggingface_hub's cache so that a transfer the network cut for good resumes
    on the next build; does nothing if the file is cached, or stored with Xet and hf_xet is installed.

    Written by hand because huggingface_hub cannot do it: since 2.x (huggingface_hub PR 4228) its
    `_download_to_tmp_and_move` downloads into `blobs/ETAG.RANDOM.incomplete`, a name unique to that call, and
    deletes it on every failure, so each call starts from zero (its issue 4196). Only that part is replaced:
    huggingface_hub's own `http_get` still does the transfer (Range requests, five retries within a build, its
    progress bar), into `blobs/ETAG.incomplete` (the name older huggingface_hub versions resumed from) under
    the same lock file as its own downloads; once complete it becomes the blob `blobs/ETAG`, and hf_hub_download
    then only links it into the snapshot. The partial file is kept when the network or the Hub fails, and
    deleted on anything else (interrupts, a full disk). A resumed file is checked against the SHA-256 the Hub
    gives as its ETag.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    http_get = _http_get_with_resume()
    if http_get is None or isinstance(try_to_load_from_cache(repo, path, revision=commit), str):
        return
    url = hf_hub_url(repo, path, revision=commit)
    meta = get_hf_file_metadata(url)
    if meta.etag is None or (meta.xet_file_data is not None and _xet_available()):
        return  # hf_hub_download says what is wrong, or downloads with hf_xet
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    cache = Path(constants.HF_HUB_CACHE).expanduser().resolve()
    folder = repo_folder_name(repo_id=repo, repo_type="model")
    blob = cache / folder / "blobs" / meta.etag
    if blob.exists():
        return
    headers = build_hf_headers()
    if _host(meta.location) != _host(url):
        headers.pop("authorization", None)  # a signed CDN address: the token stays with the Hub, as in hf_hub_download

    def get(f: BinaryIO, done: int) -> None:
        http_get(meta.location, f, resume_size=done, headers=headers, expected_size=meta.size, displayed_filename=path)

    lock = cache / ".locks" / folder / f"{meta.etag}.lock"
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if blob.exists():  # another build finished it meanwhile
            return
        partial = blob.with_name(blob.name + ".incomplete")
        if _fill(partial, get, meta.size, f"{path} from {repo}", cache):
            _check_resumed(partial, meta.etag, f"{path} from {repo}")
        os.replace(partial, blob)


def _fill(partial: Path, get: Callable[[BinaryIO, int], None], size: int | None, what: str, cache: Path) -> bool:
    """Complete `partial` with `get(file, bytes already there)`; whether it resumed bytes an earlier build left."""
    done = partial.stat().st_size if partial.exists() else 0
    if size is not None and done > size:  # not the start of this file: begin again
        done = 0
    if size is not None:
        _check_room(cache, size - done, what)
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        with os.fdopen(fd, "r+b") as f:
            f.truncate(done)
            f.seek(done)
            get(f, done)
    except BaseException as exc:
        kept = partial.stat().st_size if partial.exists() else 0
        if not _network_failure(exc) or kept == 0:
            partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise ModelFileError(_cache_full(cache, what)) from None
        if _network_failure(exc) and kept > 0 and _status(exc) not in _NOT_TRANSIENT:
            total = f" of {size / 1e6:,.1f}" if size is not None else ""
            raise ModelFileError(
                f"the download of {what} was interrupted ({_short(exc)}) with {kept / 1e6:,.1f}{total} MB done; "
                "run the same command again to resume it"
            ) from None
        raise
    return done > 0


# HTTP answers that another try will not change: left to _hub_errors' messages (the partial file is kept).
_NOT_TRANSIENT = {400, 401, 403, 404, 410, 416}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _network_failure(exc: BaseException) -> bool:
    """A transfer the network or the Hub cut short (what a later try can resume), not a local problem."""
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(exc, (_TransportError, HfHubHTTPError))


def _check_room(cache: Path, needed: int, what: str) -> None:
    """Refuse to start a download that cannot fit (huggingface_hub itself only warns)."""
    try:
        free = shutil.disk_usage(cache).free
    except OSError:
        return
    if free < needed:
        raise ModelFileError(_cache_full(cache, what, f" ({needed / 1e6:,.1f} MB needed, {free / 1e6:,.1f} MB free)"))


def _cache_full(cache: Path, what: str, room: str = "") -> str:
    return (
        f"the disk holding the Hugging Face cache {cache} is full{room}, so {what} cannot be downloaded; free some "
        "space there, or set HF_HUB_CACHE to a folder on a disk with room, and run the command again"
    )


def _check_resumed(partial: Path, etag: str, what: str) -> None:
    """Check a download resumed from an earlier build against the Hub's SHA-256 (the ETag of files stored with LFS)."""
    if not re.fullmatch(r"[0-9a-f]{64}", etag):
        return
    digest = hashlib.sha256()
    with open(partial, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != etag:
        partial.unlink(missing_ok=True)
        raise ModelFileError(
            f"{what} did not come out whole when its download was resumed (its SHA-256 differs from the Hub's); "
            "the partial download was deleted: run the command again to download it afresh"
        )


def _http_get_with_resume() -> Callable[..., None] | None:
    """huggingface_hub's http_get, if it still takes what resuming needs (else None: builds do not resume downloads)."""
    try:
        from huggingface_hub.file_download import http_get
    except ImportError:  # pragma: no cover
        return None
    wanted = {"resume_size", "headers", "expected_size", "displayed_filename"}
    return http_get if wanted <= set(inspect.signature(http_get).parameters) else None


def _xet_available() -> bool:
    """Whether huggingface_hub downloads files stored with Xet through hf_xet (its own transfer, not http_get)."""
    from huggingface_hub import constants

    return not constants.HF_HUB_DISABLE_XET and importlib.util.find_spec("hf_xet") is not None


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc


@contextlib.contextmanager
def _hub_errors(repo: str, path: str | None = None, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line ModelFileErrors that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{path} from {repo}" if path else repo
    page = f"{constants.ENDPOINT}/{repo}"
    try:
        yield
    except GatedRepoError as exc:
        if _status(exc) == 403:
            raise ModelFileError(f"{repo} is gated and your Hugging Face token has no access yet: ask for it on {page}") from None
        raise ModelFileError(
            f"{repo} is gated: accept its conditions on {page}, then log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelFileError(
            f"no model repository {repo} on the Hugging Face Hub ({constants.ENDPOINT}); check the name "
            "(if it is private, log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelFileError(f"{repo} has no revision {revision!r} (a branch, tag or commit)") from None
    except LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:
            raise ModelFileError(
                f"{what} is not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
            ) from None
        cause = exc.__cause__ or exc
        raise ModelFileError(
            f"cannot download {what}: the Hub at {constants.ENDPOINT} cannot be reached ({_short(cause)}); "
            "check the connection and run the command again"
        ) from None
    except EntryNotFoundError:
        raise ModelFileError(f"{repo} has no file {path}{_at(revision)}") from None
    except OfflineModeIsEnabled:
        raise ModelFileError(f"{what} is not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it") from None
    except HfHubHTTPError as exc:
        raise ModelFileError(
            f"the Hugging Face Hub answered HTTP {_status(exc)} for {what}; run the command again later"
        ) from None
    except HFValidationError:
        raise ModelFileError(f"{repo!r} is not a valid Hugging Face repository name (OWNER/REPO)") from None
    except _TransportError as exc:
        raise ModelFileError(
            f"downloading {what} failed ({_short(exc)}); run the command again (files already downloaded are kept)"
        ) from None
    except OSError as exc:  # a download cut short for good, or a full disk while writing the cache
        if exc.errno in _DISK_FULL:
            raise ModelFileError(_cache_full(Path(constants.HF_HUB_CACHE), what)) from None
        raise ModelFileError(
            f"downloading {what} failed ({exc.strerror or _short(exc)}); run the command again "
            "(files already downloaded are kept)"
        ) from None


def _status(exc: Exception) -> int:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", 0) or 0


def _at(revision: str | None) -> str:
    return f" at revision {revision}" if revision else ""


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__
