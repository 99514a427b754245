"""A fake Hugging Face Hub on 127.0.0.1 that serves model repositories from local folders.

It speaks what ``huggingface_hub.snapshot_download`` asks (``HF_ENDPOINT`` points it here):
``GET /api/models/{repo}/revision/{rev}`` (the commit and its files), ``GET /api/models/{repo}/tree/{rev}``
(each file's size, git blob id and LFS sha256), and ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``
with the ``X-Repo-Commit`` and ``ETag`` headers the client checks. A size name's first download
can then be tested offline, from the model a package ships.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

from benchmarks.fakeserver import serve_local

LFS_FROM_BYTES = 1_000_000  # bigger files are LFS files, as the hub stores model weights


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, repos: dict[str, str]):
        """``repos``: repo id ("Systran/faster-whisper-tiny.en") -> a folder whose files it holds."""
        self.repos = {repo: self._load(Path(folder)) for repo, folder in repos.items()}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd = None

    @staticmethod
    def _load(folder: Path) -> dict:
        files = {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}
        commit = hashlib.sha1(b"".join(hashlib.sha1(data).digest() for data in files.values())).hexdigest()
        return {"commit": commit, "files": files}

    def start(self) -> "FakeHub":
        self._httpd = serve_local(self._dispatch, name="fake-hub")
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def downloads(self) -> list[str]:
        """The files whose bytes were sent (GET on a resolve URL), in order."""
        with self._lock:
            return [path.rsplit("/", 1)[-1] for method, path in self.requests
                    if method == "GET" and "/resolve/" in path]

    # -- serving ------------------------------------------------------------------------------
    def _dispatch(self, handler) -> None:
        path = handler.path.split("?", 1)[0]
        with self._lock:
            self.requests.append((handler.command, path))
        for pattern, answer in ((r"/api/models/(.+)/revision/([^/]+)", self._revision),
                                (r"/api/models/(.+)/tree/([^/]+)(?:/.*)?", self._tree),
                                (r"/(.+)/resolve/([^/]+)/(.+)", self._resolve)):
            match = re.fullmatch(pattern, path)
            if match and match.group(1) in self.repos:
                answer(handler, self.repos[match.group(1)], *match.groups())
                return
        self._send(handler, 404, json.dumps({"error": "Repository Not Found"}).encode(),
                   {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"})

    def _revision(self, handler, repo, repo_id, _revision) -> None:
        body = {"id": repo_id, "modelId": repo_id, "sha": repo["commit"], "private": False, "disabled": False,
                "gated": False, "tags": ["ctranslate2"], "siblings": [{"rfilename": name} for name in repo["files"]]}
        self._send(handler, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _tree(self, handler, repo, *_ids) -> None:
        entries = []
        for name, data in repo["files"].items():
            entry = {"type": "file", "oid": _git_blob_id(data), "size": len(data), "path": name}
            if len(data) >= LFS_FROM_BYTES:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._send(handler, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

    def _resolve(self, handler, repo, _repo_id, _revision, name) -> None:
        data = repo["files"].get(name)
        if data is None:
            self._send(handler, 404, b'{"error": "Entry not found"}',
                       {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"})
            return
        etag = hashlib.sha256(data).hexdigest() if len(data) >= LFS_FROM_BYTES else _git_blob_id(data)
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": repo["commit"],
                   "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        self._send(handler, 200, data, headers, head=handler.command == "HEAD")

    @staticmethod
    def _send(handler, status: int, body: bytes, headers: dict, *, head: bool = False) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(body)
        handler.wfile.flush()


def serve_model(repo_id: str, folder: str | os.PathLike) -> FakeHub:
    return FakeHub({repo_id: str(folder)}).start()
