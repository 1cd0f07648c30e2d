"""minisae.io.hub: local paths, the real huggingface_hub code path offline (empty and pre-populated
caches), and its error handling against a small fake Hub served on 127.0.0.1 (no network).

The fake Hub answers the four requests huggingface_hub makes (repo info, tree listing, file HEAD
and GET) with the status codes and X-Error-Code headers the real Hub uses, so the library's own
exception classes reach `minisae.io.hub` exactly as they would in the field.
"""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.parse

import pytest

from minisae.io.hub import HubError, resolve_dir, resolve_file

SHA = "0123456789abcdef0123456789abcdef01234567"
FILES = {"config.json": b'{"hidden_size": 8}', "tokenizer.json": b'{"tok": 1}',
         "layer_3/width_16k/params.npz": b"npz bytes", "layer_3/width_16k/cfg.json": b"{}",
         "README.md": b"# never downloaded by the tests"}


# --- local paths --------------------------------------------------------------------------------

def test_local_paths_win(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    assert resolve_dir(tmp_path) == tmp_path
    assert resolve_dir(str(tmp_path)) == tmp_path
    assert resolve_file(tmp_path, "tokenizer.json") == tmp_path / "tokenizer.json"
    assert resolve_file(tmp_path / "tokenizer.json") == tmp_path / "tokenizer.json"
    assert resolve_file(tmp_path / "tokenizer.json", "tokenizer.json") == tmp_path / "tokenizer.json"


def test_local_path_errors(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    cases = [
        (lambda: resolve_dir(tmp_path / "a.json"), "is a file; expected a folder"),
        (lambda: resolve_file(tmp_path), "is a folder; expected a file"),
        (lambda: resolve_file(tmp_path, "b.json"), "has no file 'b.json'"),
        (lambda: resolve_file(tmp_path / "a.json", "config.json"), "is a file; expected 'config.json'"),
        (lambda: resolve_dir(tmp_path / "missing"), "local folder"),
        (lambda: resolve_file(tmp_path / "missing.json"), "local path"),
    ]
    for call, message in cases:
        with pytest.raises(HubError, match=message):
            call()


@pytest.mark.parametrize("ref", ["./no/such/dir", "../nope", "~/no-such-minisae-dir", "/abs/nope",
                                 "org\\name", "org/name/", "org//name"])
def test_path_like_strings_never_reach_the_hub(ref, offline_hub):
    """Path-like strings fail as missing local paths (the offline Hub would say 'HF_HUB_OFFLINE')."""
    for call in (lambda: resolve_dir(ref), lambda: resolve_file(ref, "x.json")):
        with pytest.raises(HubError, match="does not exist") as err:
            call()
        assert "HF_HUB_OFFLINE" not in str(err.value)


def test_invalid_repo_ids(offline_hub):
    with pytest.raises(HubError, match="neither an existing local path nor a valid Hub repo id"):
        resolve_dir("org/na me")
    with pytest.raises(HubError, match="use 'org/name/path/in/repo' or pass filename="):
        resolve_file("org/name")


# --- offline, in process ------------------------------------------------------------------------

@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty HF_HOME, made effective in this process.

    huggingface_hub reads its environment once, at import, into `huggingface_hub.constants`, and
    its functions read those constants at call time; so both are set.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def populate_cache(cache, repo_id, files, sha=SHA, ref="main"):
    """The cache layout huggingface_hub writes: models--org--name/{refs/<ref>, snapshots/<sha>/...}."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(sha)  # no trailing newline, as the library writes it
    snapshot = repo_dir / "snapshots" / sha
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    return snapshot


def test_offline_empty_cache_names_repo_and_fix(offline_hub):
    with pytest.raises(HubError) as err:
        resolve_dir("google/gemma-2-2b")
    message = str(err.value)
    assert "'google/gemma-2-2b'" in message and "HF_HUB_OFFLINE" in message
    assert "hf download google/gemma-2-2b" in message and str(offline_hub) in message

    with pytest.raises(HubError, match="file 'tokenizer.json' of Hub repo 'google/gemma-2-2b'"):
        resolve_file("google/gemma-2-2b", "tokenizer.json")


def test_offline_cache_hit(offline_hub):
    snapshot = populate_cache(offline_hub, "org/model", FILES)
    assert resolve_dir("org/model") == snapshot
    assert resolve_dir("org/model", revision=SHA) == snapshot
    assert resolve_dir("org/model/layer_3/width_16k") == snapshot / "layer_3/width_16k"
    path = resolve_file("org/model", "config.json")
    assert path == snapshot / "config.json" and path.read_bytes() == FILES["config.json"]
    path = resolve_file("org/model/layer_3/width_16k/params.npz")
    assert path.read_bytes() == b"npz bytes"
    assert resolve_file("org/model/layer_3", "width_16k/cfg.json").read_bytes() == b"{}"


def test_offline_cache_misses(offline_hub):
    populate_cache(offline_hub, "org/model", FILES)
    with pytest.raises(HubError, match="file 'missing.json' of Hub repo 'org/model'.*not in the local"):
        resolve_file("org/model", "missing.json")
    with pytest.raises(HubError, match="Hub repo 'org/model' \\(revision 'v2'\\).*not in the local"):
        resolve_dir("org/model", revision="v2")
    with pytest.raises(HubError, match="Hub repo 'org/model' has no folder 'layer_9'"):
        resolve_dir("org/model/layer_9")


# --- a fake Hub on 127.0.0.1, driven through environment variables in a subprocess -------------

REPOS = {"org/model": {"sha": SHA, "files": FILES, "gated": False},
         "google/gated-model": {"sha": SHA, "files": FILES, "gated": True}}


class FakeHub(http.server.BaseHTTPRequestHandler):
    requests = []  # (method, path) of every request, for the tests to inspect

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", headers=(), send_body=True):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def error(self, status, code, send_body):
        self.reply(status, b'{"error": "' + code.encode() + b'"}',
                   [("X-Error-Code", code), ("Content-Type", "application/json")], send_body)

    def route(self, send_body):
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        self.requests.append((self.command, path))
        api = path.startswith("/api/models/")
        parts = path.split("/")[3:] if api else path.split("/")[1:]
        repo_id = "/".join(parts[:2])
        if repo_id not in REPOS or len(parts) < 4:
            return self.error(404 if len(parts) >= 4 else 404, "RepoNotFound", send_body)
        repo = REPOS[repo_id]
        if repo["gated"]:
            return self.error(401, "GatedRepo", send_body)
        kind, rev, rest = parts[2], parts[3], "/".join(parts[4:])
        if rev not in ("main", repo["sha"]):
            return self.error(404, "RevisionNotFound", send_body)
        if api and kind == "revision":
            info = {"id": repo_id, "modelId": repo_id, "sha": repo["sha"], "private": False,
                    "siblings": [{"rfilename": f} for f in repo["files"]]}
            return self.reply(200, json.dumps(info).encode(), [("Content-Type", "application/json")])
        if api and kind == "tree":
            tree = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                    for f, d in repo["files"].items() if f.startswith(rest)]
            return self.reply(200, json.dumps(tree).encode(), [("Content-Type", "application/json")])
        if not api and kind == "resolve":
            if rest not in repo["files"]:
                return self.error(404, "EntryNotFound", send_body)
            data = repo["files"][rest]
            etag = hashlib.sha1(data).hexdigest()
            return self.reply(200, data, [("X-Repo-Commit", repo["sha"]), ("ETag", f'"{etag}"')],
                              send_body)
        return self.reply(404, b"", send_body=send_body)

    def do_GET(self):
        self.route(True)

    def do_HEAD(self):
        self.route(False)


@pytest.fixture(scope="module")
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


RUNNER = """
import json, sys
from minisae.io.hub import HubError, resolve_dir, resolve_file
out = []
for fn, args, kwargs in json.loads(sys.argv[1]):
    try:
        p = {"resolve_dir": resolve_dir, "resolve_file": resolve_file}[fn](*args, **kwargs)
        out.append({"path": str(p), "data": p.read_text() if p.is_file() else None})
    except HubError as e:
        out.append({"error": str(e), "cause": type(e.__cause__).__name__})
print(json.dumps(out))
"""


def run_in_subprocess(calls, *, home, endpoint, offline=False, env=None):
    """Run resolve_* calls in a fresh interpreter configured only through the environment
    (plus the variables in `env`)."""
    extra, env = env or {}, {k: v for k, v in os.environ.items()
                             if not k.startswith(("HF_", "HUGGINGFACE_")) and "proxy" not in k.lower()}
    env.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(calls)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def online_results(fake_hub, tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    calls = {
        "file": ("resolve_file", ["org/model", "config.json"], {}),
        "nested": ("resolve_file", ["org/model/layer_3/width_16k/params.npz"], {}),
        "dir": ("resolve_dir", ["org/model"], {"allow_patterns": ["*.json"]}),
        "subdir": ("resolve_dir", ["org/model/layer_3/width_16k"], {}),
        "gated_dir": ("resolve_dir", ["google/gated-model"], {}),
        "gated_file": ("resolve_file", ["google/gated-model", "config.json"], {}),
        "no_repo_dir": ("resolve_dir", ["org/no-such-model"], {}),
        "no_repo_file": ("resolve_file", ["org/no-such-model", "config.json"], {}),
        "no_revision": ("resolve_dir", ["org/model"], {"revision": "v9"}),
        "no_revision_file": ("resolve_file", ["org/model", "config.json"], {"revision": "v9"}),
        "no_entry": ("resolve_file", ["org/model", "nope.json"], {}),
        "path_like": ("resolve_dir", ["./org/model"], {}),
    }
    FakeHub.requests.clear()
    results = run_in_subprocess(list(calls.values()), home=home, endpoint=fake_hub)
    requests = list(FakeHub.requests)
    offline = run_in_subprocess([calls["file"], calls["dir"], ("resolve_file", ["org/model", "README.md"], {})],
                                home=home, endpoint=fake_hub, offline=True)
    return dict(zip(calls, results)), requests, offline, home


def test_fake_hub_downloads(online_results):
    r, requests, _, home = online_results
    assert r["file"]["data"] == FILES["config.json"].decode()
    assert r["file"]["path"].startswith(str(home / "hub" / "models--org--model" / "snapshots" / SHA))
    assert r["nested"]["data"] == "npz bytes"
    snapshot = r["dir"]["path"]
    assert snapshot == str(home / "hub" / "models--org--model" / "snapshots" / SHA)
    assert sorted(os.listdir(snapshot)) == ["config.json", "layer_3", "tokenizer.json"]  # no README
    assert r["subdir"]["path"] == os.path.join(snapshot, "layer_3", "width_16k")
    assert sorted(os.listdir(r["subdir"]["path"])) == ["cfg.json", "params.npz"]
    assert any(path.startswith("/org/model/resolve/") for _, path in requests)


def test_fake_hub_offline_reads_what_was_downloaded(online_results):
    r, _, offline, _ = online_results
    assert offline[0] == r["file"] and offline[1]["path"] == r["dir"]["path"]
    assert "HF_HUB_OFFLINE" in offline[2]["error"] and "'README.md'" in offline[2]["error"]


def test_fake_hub_gated(online_results):
    r = online_results[0]
    for key in ("gated_dir", "gated_file"):
        message = r[key]["error"]
        assert r[key]["cause"] == "GatedRepoError"
        assert "Hub repo 'google/gated-model' is gated" in message
        assert "accept the licence" in message and "HF_TOKEN" in message and "hf auth login" in message
    assert "asked for file 'config.json'" in r["gated_file"]["error"]


def test_fake_hub_not_found(online_results):
    r = online_results[0]
    for key in ("no_repo_dir", "no_repo_file"):
        assert r[key]["cause"] == "RepositoryNotFoundError"
        assert "Hub repo 'org/no-such-model' was not found" in r[key]["error"]
        assert "check the name" in r[key]["error"]
    for key in ("no_revision", "no_revision_file"):
        assert r[key]["cause"] == "RevisionNotFoundError"
        assert "Hub repo 'org/model' has no revision 'v9'" in r[key]["error"]
    assert r["no_entry"]["cause"] == "RemoteEntryNotFoundError"
    assert "file 'nope.json' of Hub repo 'org/model' does not exist in the repo" in r["no_entry"]["error"]


def test_fake_hub_never_asked_about_path_like_strings(online_results):
    r, requests, _, _ = online_results
    assert "local folder './org/model' does not exist" in r["path_like"]["error"]
    assert not any(path.startswith(("/api/models/./org", "/./org")) for _, path in requests)


def test_unreachable_hub(tmp_path):
    """A Hub that refuses connections: the error names the repo and suggests pre-downloading."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = run_in_subprocess([("resolve_dir", ["org/model"], {}),
                                 ("resolve_file", ["org/model", "config.json"], {})],
                                home=tmp_path, endpoint=f"http://127.0.0.1:{port}")
    for result in results:
        assert "Hub repo 'org/model'" in result["error"]
        assert "hf download org/model" in result["error"] and "network" in result["error"]
    assert "file 'config.json'" in results[1]["error"]



def test_silent_hub_is_asked_once(tmp_path):
    """A Hub that accepts connections and never answers: hf_hub_download alone would ask again 6
    times with backoff and a 60 s timeout each (minutes) for a file not in the cache; resolve_file
    fails after its one request times out (HF_HUB_ETAG_TIMEOUT), naming the file and repo."""
    import socket

    held = []  # the accepted connections, kept open and unanswered
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def hold_every_connection():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # the server socket was closed: the test is over
                return

    threading.Thread(target=hold_every_connection, daemon=True).start()
    try:
        (result,) = run_in_subprocess([("resolve_file", ["org/model", "config.json"], {})], home=tmp_path,
                                      endpoint=f"http://127.0.0.1:{server.getsockname()[1]}",
                                      env={"HF_HUB_ETAG_TIMEOUT": "1"})
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert len(held) == 1
    assert "file 'config.json' of Hub repo 'org/model'" in result["error"]
    assert "could not be reached" in result["error"] and "hf download org/model" in result["error"]
