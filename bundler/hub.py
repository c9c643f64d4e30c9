"""Models from the Hugging Face Hub, fetched with huggingface_hub.

Everything the library offers is used as it is: its cache (HF_HUB_CACHE, shared with every other
tool that uses it), its progress bars, its token (HF_TOKEN or `hf auth login`), its endpoint
(HF_ENDPOINT), offline mode (HF_HUB_OFFLINE=1) and its retries: a transfer cut mid-file is resumed
from where it stopped with an HTTP range request, up to five times in a row. Nothing here writes
anywhere but that cache.

A repository is named OWNER/REPO[:QUANT] (one GGUF, or one split model, picked by its quantization)
or hf://OWNER/REPO/PATH.gguf (one file, or the first part of a split model).
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

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
    local = [_download(repo, part, revision, commit) for part in parts]
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
        missing = [p for p in chosen if p not in files]
        if missing:
            raise ModelFileError(
                f"{repo}: {matches[0]} is part 1 of {len(chosen)}, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing{where}"
            )
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
    missing = [p for p in parts if p not in files]
    if missing:
        raise ModelFileError(
            f"{repo}: {path} is part {name.number} of {len(parts)}, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing{_where(revision, online)}"
        )
    return parts


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


def _download(repo: str, path: str, revision: str | None, commit: str) -> Path:
    """The local path of `path` in the cache, downloading it first if needed (with huggingface_hub's progress bar)."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo, path=path, revision=revision):
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
