"""A small Hugging Face Hub look-alike over real HTTP, for tests that download models.

It serves folders as model repos with the part of the Hub protocol that huggingface_hub's
``snapshot_download`` and transformers' loaders use:

- ``GET /api/models/{org}/{name}[/revision/{rev}]``: ``{"id", "sha", "siblings"}``;
- ``GET /api/models/{org}/{name}/tree/{rev}[/{path}]``: ``[{type, path, size, oid, lfs?}]``;
- ``GET|HEAD /{org}/{name}/resolve/{rev}/{file}``: the bytes, with ``ETag``, ``X-Repo-Commit``
  and ``Content-Length``; ``Range: bytes=N-`` answers 206.

A repo may require a token (401 with ``X-Error-Code: GatedRepo`` otherwise, as the Hub does for
gated repos); unknown repos are 404 ``RepoNotFound``. ``cut_once(path, after)`` makes the next
full GET of ``path`` stop after ``after`` bytes and drop the connection, as a flaky network
would; ``stall(path, seconds)`` holds every GET of it that long before the body (a slow link,
so that concurrent downloads overlap). Every request is recorded in ``requests`` (method,
path, Range header).

    with HubServer() as hub:
        hub.add_repo("org/model", "/path/to/folder", extra_files={"pytorch_model.bin": b"..."})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".gguf", ".onnx")
CHUNK = 1 << 20


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, Path | bytes]  # repo path -> file on disk, or literal content
    token: str | None = None  # set: a gated repo that needs "Authorization: Bearer <token>"
    revisions: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit sha

    def commit(self, rev: str) -> str | None:
        if rev in self.revisions.values():
            return rev
        return self.revisions.get(rev)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int, lfs: bool) -> str:
    """sha256 for LFS files, the git blob sha1 for the others (the Hub's oids and ETags)."""
    h = hashlib.sha256() if lfs else hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _oid(content: Path | bytes, repo_path: str) -> tuple[str, int, bool]:
    lfs = repo_path.endswith(LFS_SUFFIXES)
    if isinstance(content, bytes):
        h = hashlib.sha256(content) if lfs else hashlib.sha1(f"blob {len(content)}\0".encode() + content)
        return h.hexdigest(), len(content), lfs
    st = content.stat()
    return _digest(str(content), st.st_size, st.st_mtime_ns, lfs), st.st_size, lfs


class HubServer:
    """A threaded HTTP server on 127.0.0.1; a context manager that starts and stops it."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[Request] = []
        self._cuts: dict[str, int] = {}
        self._stalls: dict[str, float] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def add_repo(self, repo_id: str, folder: str | os.PathLike | None = None, *, token: str | None = None,
                 extra_files: dict[str, bytes] | None = None, revisions: dict[str, str] | None = None) -> HubRepo:
        """Serve ``folder``'s files (recursively) plus ``extra_files`` as ``repo_id``."""
        files: dict[str, Path | bytes] = {}
        if folder is not None:
            root = Path(folder)
            files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
                     if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}
        files.update(extra_files or {})
        sha = hashlib.sha1(f"{repo_id}@main".encode()).hexdigest()
        repo = HubRepo(repo_id, files, token, revisions or {"main": sha})
        self.repos[repo_id] = repo
        return repo

    def cut_once(self, repo_path: str, after: int) -> None:
        """The next full GET of ``repo_path`` sends ``after`` bytes, then drops the connection."""
        self._cuts[repo_path] = after

    def stall(self, repo_path: str, seconds: float) -> None:
        """Every GET of ``repo_path`` waits ``seconds`` before its body."""
        self._stalls[repo_path] = seconds

    def gets(self, repo_path: str) -> list[Request]:
        """The GET requests for one file of any repo."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path
                and r.path.split("/resolve/", 1)[1].split("/", 1)[1] == repo_path]

    def _take_cut(self, repo_path: str) -> int | None:
        with self._lock:
            return self._cuts.pop(repo_path, None)

    def _record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:  # quiet: the requests are recorded
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        # ---- routing ------------------------------------------------------------------
        def _serve(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub._record(Request(self.command, path, self.headers.get("Range")))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if not rest:
                    return self._info(repo, "main")
                if rest[0] == "revision" and len(rest) == 2:
                    return self._info(repo, rest[1])
                if rest[0] == "tree" and len(rest) >= 2:
                    return self._tree(repo, rest[1], "/".join(rest[2:]))
            elif len(parts) >= 5 and parts[2] == "resolve":
                repo = self._repo("/".join(parts[:2]))
                if repo is None:
                    return
                return self._file(repo, parts[3], "/".join(parts[4:]), head)
            self._error(404, "EntryNotFound", f"no route for {path}")

        def _repo(self, repo_id: str) -> HubRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                                              "to it and be authenticated to access it. Please log in.")
                return None
            return repo

        def _commit(self, repo: HubRepo, rev: str) -> str | None:
            commit = repo.commit(rev)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return commit

        # ---- endpoints ----------------------------------------------------------------
        def _info(self, repo: HubRepo, rev: str) -> None:
            commit = self._commit(repo, rev)
            if commit is not None:
                self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": False,
                            "gated": "manual" if repo.token else False,
                            "siblings": [{"rfilename": name} for name in repo.files]})

        def _tree(self, repo: HubRepo, rev: str, under: str) -> None:
            if self._commit(repo, rev) is None:
                return
            entries, folders = [], set()
            for name, content in repo.files.items():
                if under and not name.startswith(under.rstrip("/") + "/"):
                    continue
                oid, size, lfs = _oid(content, name)
                entry = {"type": "file", "path": name, "size": size, "oid": oid}
                if lfs:
                    entry["lfs"] = {"oid": oid, "size": size, "pointerSize": 134}
                entries.append(entry)
                folders.update("/".join(name.split("/")[:i]) for i in range(1, name.count("/") + 1))
            entries += [{"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()}
                        for d in sorted(folders) if not under or d.startswith(under)]
            self._json(entries)

        def _file(self, repo: HubRepo, rev: str, name: str, head: bool) -> None:
            commit = self._commit(repo, rev)
            if commit is None:
                return
            content = repo.files.get(name)
            if content is None:
                return self._error(404, "EntryNotFound", f"{name} does not exist at {rev}")
            oid, size, _ = _oid(content, name)
            start = 0
            range_header = self.headers.get("Range")
            if range_header and range_header.startswith("bytes=") and not head:
                start = int(range_header[6:].split("-", 1)[0] or 0)
            self.send_response(206 if start else 200)
            self.send_header("ETag", f'"{oid}"')
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            if head:
                return
            cut = None if start else hub._take_cut(name)
            time.sleep(hub._stalls.get(name, 0.0))
            self._send_body(content, start, size if cut is None else cut)
            if cut is not None:  # a network failure mid-file: the client sees a short body
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

        # ---- responses ----------------------------------------------------------------
        def _send_body(self, content: Path | bytes, start: int, end: int) -> None:
            if isinstance(content, bytes):
                self.wfile.write(content[start:end])
                return
            with open(content, "rb") as f:
                f.seek(start)
                left = end - start
                while left > 0 and (block := f.read(min(CHUNK, left))):
                    self.wfile.write(block)
                    left -= len(block)

        def _json(self, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler
