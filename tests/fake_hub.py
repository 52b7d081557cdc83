"""A local stand-in for the Hugging Face Hub, for testing `python -m engine fetch` without a network.

It answers the calls huggingface_hub (2.x) makes for `model_info(files_metadata=True)`,
`snapshot_download` and `hf_hub_download`:

    GET  /api/models/{repo}/revision/{rev}        repository info with its files and sizes ("siblings")
    GET  /api/models/{repo}/tree/{rev}[/{path}]   file listing (one page)
    HEAD /{repo}/resolve/{rev}/{path}             X-Repo-Commit, ETag (sha256 for LFS files, the git
                                                  blob id otherwise), Content-Length
    GET  /{repo}/resolve/{rev}/{path}             the bytes, honouring `Range: bytes=a-[b]` with 206

with the hub's error codes (X-Error-Code RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound).
Every request is logged; `cut_once(repo, path, at)` makes the next full GET of a file stop after `at`
bytes and drop the connection, as a network failure would.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")


@dataclass
class Repo:
    files: dict[str, bytes]
    token: Optional[str] = None  # gated: only this Bearer token gets in

    @property
    def sha(self) -> str:
        h = hashlib.sha1()
        for path in sorted(self.files):
            h.update(path.encode() + b"\0" + hashlib.sha1(self.files[path]).digest())
        return h.hexdigest()

    @staticmethod
    def blob_id(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def entry(self, path: str) -> dict:
        data = self.files[path]
        info: dict = {"size": len(data), "blobId": self.blob_id(data)}
        if path.endswith(LFS_SUFFIXES):
            info["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return info

    def etag(self, path: str) -> str:
        e = self.entry(path)
        return e["lfs"]["sha256"] if "lfs" in e else e["blobId"]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: Optional[str]
    authorized: bool


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    cuts: dict[tuple[str, str], int] = field(default_factory=dict)
    served: dict[tuple[str, str], int] = field(default_factory=dict)  # body bytes sent per file
    _server: Optional[ThreadingHTTPServer] = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo_id: str, files: dict[str, bytes], token: Optional[str] = None) -> Repo:
        self.repos[repo_id] = Repo(dict(files), token)
        return self.repos[repo_id]

    def cut_once(self, repo_id: str, path: str, at: int) -> None:
        self.cuts[(repo_id, path)] = at

    def gets(self, path_suffix: str = "") -> list[Request]:
        return [r for r in self.log if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(path_suffix)]

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


_API = re.compile(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, *args: object) -> None:  # quiet
        pass

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

    def _json(self, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _repo(self, repo_id: str, rev: str) -> Optional[Repo]:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        auth = self.headers.get("authorization", "")
        if repo.token is not None and auth != f"Bearer {repo.token}":
            self._error(401, "GatedRepo", "Access to this repository is restricted")
            return None
        if rev not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo

    def _record(self) -> str:
        path = unquote(urlsplit(self.path).path)
        with self.hub._lock:
            self.hub.log.append(Request(self.command, path, self.headers.get("Range"),
                                        bool(self.headers.get("authorization"))))
        return path

    def do_GET(self) -> None:
        path = self._record()
        if m := _API.match(path):
            repo_id, kind, rev, sub = m.groups()
            repo = self._repo(repo_id, unquote(rev))
            if repo is None:
                return
            if kind == "revision":
                siblings = [{"rfilename": p, **repo.entry(p)} for p in sorted(repo.files)]
                self._json({"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                            "gated": "manual" if repo.token else False, "siblings": siblings})
            else:
                prefix = f"{sub}/" if sub else ""
                tree = []
                for p in sorted(repo.files):
                    if p.startswith(prefix):
                        e = repo.entry(p)
                        item = {"type": "file", "path": p, "size": e["size"], "oid": e["blobId"]}
                        if "lfs" in e:
                            item["lfs"] = {"oid": e["lfs"]["sha256"], "size": e["size"], "pointerSize": 134}
                        tree.append(item)
                self._json(tree)
            return
        self._resolve(path, body=True)

    def do_HEAD(self) -> None:
        self._resolve(self._record(), body=False)

    def _resolve(self, path: str, body: bool) -> None:
        m = _RESOLVE.match(path)
        if not m:
            self._error(404, "NotFound", "no such route")
            return
        repo_id, rev, file = m.groups()
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        if file not in repo.files:
            self._error(404, "EntryNotFound", f"{file} does not exist")
            return
        data = repo.files[file]
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range") if body else None
        if rng:
            r = _RANGE.match(rng)
            if not r or int(r.group(1)) >= len(data):
                self._error(416, "RangeNotSatisfiable", f"bad range {rng}")
                return
            start = int(r.group(1))
            end = int(r.group(2)) if r.group(2) else end
        self.send_response(206 if rng else 200)
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("ETag", f'"{repo.etag(file)}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if not body:
            return
        chunk = data[start:end + 1]
        with self.hub._lock:
            cut = self.hub.cuts.pop((repo_id, file), None) if not rng else None
        if cut is not None:
            chunk = chunk[:cut]  # then the connection drops before the promised length
            self.close_connection = True
        self.wfile.write(chunk)
        self.wfile.flush()
        with self.hub._lock:
            key = (repo_id, file)
            self.hub.served[key] = self.hub.served.get(key, 0) + len(chunk)
