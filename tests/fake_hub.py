"""A small stand-in for the Hugging Face Hub, serving real files over HTTP on 127.0.0.1, for huggingface_hub to talk to.

Only the routes huggingface_hub's downloads use (read from its hf_api.py and file_download.py):

    GET  /api/models/OWNER/NAME[/revision/REV]    model_info: {"id", "sha", "siblings": [{"rfilename"}], "gated"}
    HEAD /OWNER/NAME/resolve/REV/PATH              X-Repo-Commit, ETag (the file's SHA-256, as for LFS files),
                                                   Content-Length, Accept-Ranges
    GET  /OWNER/NAME/resolve/REV/PATH              the file; `Range: bytes=N-` gives 206 and Content-Range

Errors carry the Hub's X-Error-Code header, which huggingface_hub turns into its exceptions: RepoNotFound
(401 without a token, as the Hub answers for private and missing repositories alike; 404 with one),
RevisionNotFound, EntryNotFound (404, with X-Repo-Commit), GatedRepo (401 without a token, 403 with a
token that has no access). No Xet headers, so downloads take the plain HTTP path.

Faults for tests: `cut(path, after)` ends the next transfer of a file after `after` bytes (the client
sees the connection close mid-body), `outage(path)` answers 503 to its other GETs, `drop(path)` closes
the connection of its other GETs before answering (the network gone: logged with status 0),
`throttle(path, delay)` sleeps `delay` seconds after each MiB sent. Every request is logged in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_MIB = 1 << 20
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?/?$")


@dataclass
class Revision:
    commit: str
    files: dict[str, Path]


@dataclass
class Repo:
    name: str
    revisions: dict[str, Revision]
    gated: bool = False
    tokens: frozenset[str] = frozenset()

    def find(self, rev: str) -> Revision | None:
        return self.revisions.get(rev) or next((r for r in self.revisions.values() if r.commit == rev), None)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    _cuts: dict[str, int] = field(default_factory=dict)
    _outages: set[str] = field(default_factory=set)
    _drops: set[str] = field(default_factory=set)
    _throttles: dict[str, float] = field(default_factory=dict)
    _etags: dict[Path, str] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(
        self, name: str, files: dict[str, Path], *, tags: dict[str, dict[str, Path]] | None = None,
        gated: bool = False, tokens: tuple[str, ...] = (),
    ) -> Repo:
        """A repository whose `main` holds `files` (repo path -> file here); `tags` are other revisions."""
        revisions = {rev: Revision(_commit(name, rev), dict(f)) for rev, f in {"main": files, **(tags or {})}.items()}
        repo = Repo(name, revisions, gated, frozenset(tokens))
        self.repos[name] = repo
        return repo

    def cut(self, path: str, after: int) -> None:
        self._cuts[path] = after

    def outage(self, path: str, on: bool = True) -> None:
        (self._outages.add if on else self._outages.discard)(path)

    def drop(self, path: str, on: bool = True) -> None:
        (self._drops.add if on else self._drops.discard)(path)

    def throttle(self, path: str, delay: float | None) -> None:
        if delay is None:
            self._throttles.pop(path, None)
        else:
            self._throttles[path] = delay

    def gets(self, path: str) -> list[Request]:
        """The GET requests for the file at repo path `path` (any repo, any revision)."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + path)]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def etag(self, path: Path) -> str:
        with self._lock:
            if path not in self._etags:
                self._etags[path] = hashlib.sha256(path.read_bytes()).hexdigest()
            return self._etags[path]

    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def take_cut(self, path: str) -> int | None:
        with self._lock:
            return self._cuts.pop(path, None)


def _commit(repo: str, rev: str) -> str:
    return hashlib.sha1(f"{repo}@{rev}".encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def _dispatch(self, body: bool) -> None:
        path = urlsplit(self.path).path
        if match := _API.match(path):
            status = self._model_info(match["repo"], unquote(match["rev"] or "main"))
        elif match := _RESOLVE.match(path):
            status = self._resolve(match["repo"], unquote(match["rev"]), unquote(match["path"]), body)
        else:
            status = self._error(404, None, "Not found")
        self.fake.log(Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization"), status))

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth.removeprefix("Bearer ") or None

    def _model_info(self, name: str, rev: str) -> int:
        repo = self.fake.repos.get(name)
        if repo is None:
            return self._error(404 if self._token() else 401, "RepoNotFound", "Repository not found")
        revision = repo.find(rev)
        if revision is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        info = {
            "id": name,
            "modelId": name,
            "sha": revision.commit,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "siblings": [{"rfilename": f} for f in sorted(revision.files)],
        }
        return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _resolve(self, name: str, rev: str, file: str, body: bool) -> int:
        repo = self.fake.repos.get(name)
        if repo is None:
            return self._error(404 if self._token() else 401, "RepoNotFound", "Repository not found")
        if repo.gated and self._token() not in repo.tokens:
            if self._token():
                return self._error(403, "GatedRepo", f"Access to model {name} is restricted and you are not in the authorized list.")
            return self._error(401, "GatedRepo", f"Access to model {name} is restricted. You must be authenticated to access it.")
        revision = repo.find(rev)
        if revision is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        local = revision.files.get(file)
        if local is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": revision.commit})
        cut = self.fake.take_cut(file) if body else None
        if body and cut is None and file in self.fake._outages:
            return self._error(503, None, "Service unavailable")
        if body and cut is None and file in self.fake._drops:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return 0
        size = local.stat().st_size
        start = _range_start(self.headers.get("Range"))
        headers = {
            "X-Repo-Commit": revision.commit,
            "ETag": f'"{self.fake.etag(local)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        status = 200
        if start is not None and body and 0 < start < size:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        else:
            start = 0
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        if body:
            self._stream(local, start, size, cut, self.fake._throttles.get(file))
        return status

    def _stream(self, local: Path, start: int, size: int, cut: int | None, delay: float | None) -> None:
        sent, end = 0, size - start if cut is None else min(cut, size - start)
        try:
            with open(local, "rb") as f:
                f.seek(start)
                while sent < end:
                    chunk = f.read(min(_MIB, end - sent))
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if delay:
                        time.sleep(delay)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if cut is not None:  # end the connection mid-body: the client has fewer bytes than Content-Length
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> int:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        return self._send(status, json.dumps({"error": message}).encode(), {"Content-Type": "application/json", **headers})

    def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> int:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        return status


def _range_start(header: str | None) -> int | None:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match.group(1)) if match else None
