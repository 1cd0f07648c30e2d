"""A local path, or a Hugging Face Hub repo: resolved to a local folder or file, with errors that
say how to fix them.

    resolve_dir("google/gemma-2-2b", allow_patterns=["*.json", "*.safetensors"])  # -> snapshot folder
    resolve_dir("runs/sae_l20")                        # an existing local folder wins
    resolve_file("google/gemma-2-2b", "tokenizer.json")
    resolve_file("google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/params.npz")

Rules, in order:
1. An existing local path wins.
2. A string that looks like a path (absolute, starting with `.` or `~`, with a backslash, `//` or a
   trailing slash, or whose first `/`-separated part is an existing local folder, as in
   `runs/jr/sea` for `runs/jr/sae`) but does not exist is an error; the Hub is not asked.
3. Otherwise the first two `/`-separated parts are a Hub repo id (`org/name`) and the rest, if
   any, a folder or file inside the repo. huggingface_hub downloads into (or reads from) its
   cache and honours HF_TOKEN, HF_HOME / HF_HUB_CACHE, HF_ENDPOINT, HF_HUB_ETAG_TIMEOUT and
   HF_HUB_OFFLINE (set it to never ask the Hub). A file not in the cache is asked for once
   before the download, so a Hub that cannot be reached fails at once, not after the library's
   retries (about 23 s).
Every failure is a `HubError` naming the repo (and file) and saying what to do.
"""

import os
from pathlib import Path

from minisae.errors import MinisaeError


class HubError(MinisaeError, RuntimeError):
    """A path or Hub reference that cannot be resolved; the message says how to fix it."""


def looks_like_path(s):
    # "runs/jr/sae" where ./runs exists is a mistyped local path, not the Hub repo "runs/jr"
    first = s.split("/", 1)[0]
    return (os.path.isabs(s) or s.startswith((".", "~")) or "\\" in s or s.endswith("/")
            or "//" in s or ("/" in s and bool(first) and Path(first).is_dir()))


def _split_ref(s):
    """'org/name/sub/path' -> ('org/name', 'sub/path' or None)."""
    parts = s.split("/")
    if len(parts) <= 2:
        return s, None
    return "/".join(parts[:2]), "/".join(parts[2:])


def _transport_errors():
    """Connection/timeout exception types of whichever HTTP client huggingface_hub uses."""
    found = []
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(found)


def _check_repo_id(repo_id, original):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{original!r} is neither an existing local path nor a valid Hub repo id "
                       f"(expected 'org/name'; {e})") from None


def _hf(name):
    """huggingface_hub's exception class `name` (from `utils`, where 0.23 to 2.x all export them,
    else `errors`), or () when this version lacks it, so that isinstance(x, _hf(name)) is False."""
    import huggingface_hub.utils

    cls = getattr(huggingface_hub.utils, name, None)
    if cls is None:
        try:
            import huggingface_hub.errors

            cls = getattr(huggingface_hub.errors, name, None)
        except ImportError:
            pass
    return cls or ()


def _hub_error(exc, repo_id, revision, filename=None, include=None):
    """Translate a huggingface_hub exception into a HubError that says how to fix it; the
    download it advises names `filename` (or the glob patterns `include`), not the whole repo."""
    from huggingface_hub import constants

    rev = f" (revision {revision!r})" if revision else ""
    asked = f" (asked for file {filename!r})" if filename else ""
    repo = f"Hub repo {repo_id!r}{rev}"
    what = f"file {filename!r} of Hub repo {repo_id!r}{rev}" if filename else repo
    page = f"{constants.ENDPOINT}/{repo_id}"
    login = ("log in with `hf auth login` (`huggingface-cli login` in older huggingface_hub) "
             "or set HF_TOKEN to an access token")
    # name just what is needed: the one file, or the folder's files, not the whole repo
    args = f"{repo_id} {filename}" if filename else repo_id
    if include and not filename:
        args += " " + " ".join(f"--include '{pat}'" for pat in include)
    predownload = (f"pre-download it where there is network with `hf download {args}` "
                   f"(`huggingface-cli download {args}` in older versions) into the same "
                   "HF_HOME and run with HF_HUB_OFFLINE=1")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, _hf("GatedRepoError")):  # before RepositoryNotFoundError, its parent
        msg = (f"{repo} is gated{asked} and this machine is not allowed to download it: accept the "
               f"licence on {page} while logged in, then {login} of that account")
    elif isinstance(exc, _hf("RepositoryNotFoundError")):
        msg = (f"{repo} was not found on the Hub{asked}, and no local path of that name exists: check "
               f"the name (as on {page}); if the repo is private, {login}")
    elif isinstance(exc, _hf("RevisionNotFoundError")):
        msg = (f"Hub repo {repo_id!r} has no revision {revision!r}{asked}: check the branch, tag or "
               f"commit hash on {page}")
    elif isinstance(exc, _hf("IncompleteSnapshotError")):
        msg = (f"the cached snapshot of {what} is incomplete and the Hub cannot be reached to "
               f"finish it: reconnect and run again, or {predownload}")
    elif isinstance(exc, _hf("LocalEntryNotFoundError")):
        cache = constants.HF_HUB_CACHE
        if constants.is_offline_mode():
            msg = (f"{what} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE "
                   f"forbids downloading it: unset HF_HUB_OFFLINE to download it now, or "
                   f"{predownload}")
        else:
            msg = (f"{what} could not be downloaded (the Hub is unreachable) and is not in the "
                   f"local cache ({cache}): check the network or proxy, or {predownload}")
    elif isinstance(exc, _hf("EntryNotFoundError")):
        msg = (f"{what} does not exist in the repo: check the path against "
               f"{page}/tree/{revision or 'main'}")
    elif isinstance(exc, _hf("HfHubHTTPError")) and status in (401, 403):
        msg = f"{what}: the Hub refused access (HTTP {status}); {login} that can read {page}"
    elif isinstance(exc, _hf("HfHubHTTPError")):
        msg = f"{what}: the Hub answered with an error (HTTP {status}); try again later"
    else:  # connection errors, offline mode raised from a plain request
        msg = (f"{what}: the Hub could not be reached ({type(exc).__name__}); check the network "
               f"or proxy, or {predownload}")
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return HubError(f"{msg}. [{type(exc).__name__}: {detail}]")


def _catchable():
    found = [_hf(n) for n in ("HfHubHTTPError", "EntryNotFoundError", "OfflineModeIsEnabled")]
    return tuple(c for c in found if c) + (ConnectionError, TimeoutError) + _transport_errors()


def resolve_dir(path_or_repo_id, *, revision=None, allow_patterns=None):
    """A local folder, or a Hub repo (or `org/name/sub/folder`) downloaded to the cache -> Path.

    `allow_patterns` (glob strings, relative to the folder asked for) limits what is downloaded.
    """
    s = os.fspath(path_or_repo_id)
    local = Path(s).expanduser()
    if local.exists():
        if not local.is_dir():
            raise HubError(f"{s!r} is a file; expected a folder")
        return local
    if looks_like_path(s):
        raise HubError(f"local folder {s!r} does not exist")
    repo_id, sub = _split_ref(s)
    _check_repo_id(repo_id, s)
    if isinstance(allow_patterns, str):
        allow_patterns = [allow_patterns]
    if sub is not None:
        allow_patterns = [f"{sub}/{p}" for p in (allow_patterns or ["*"])]

    import huggingface_hub

    try:
        snapshot = Path(huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                          allow_patterns=allow_patterns))
    except _catchable() as e:
        raise _hub_error(e, repo_id, revision, include=allow_patterns) from e
    folder = snapshot / sub if sub is not None else snapshot
    if not folder.is_dir():
        raise HubError(f"Hub repo {repo_id!r} has no folder {sub!r}" +
                       (f" with files matching {allow_patterns}" if allow_patterns else ""))
    return folder


def resolve_file(path_or_repo_id, filename=None, *, revision=None):
    """A local file, a file in a local folder, or a file of a Hub repo (cached) -> Path.

    Forms: `resolve_file("path/to/file")`, `resolve_file("local/folder", "name")`,
    `resolve_file("org/name", "path/in/repo")`, `resolve_file("org/name/path/in/repo")`.
    """
    s = os.fspath(path_or_repo_id)
    local = Path(s).expanduser()
    if local.is_file():
        if filename is not None and Path(filename).name != local.name:
            raise HubError(f"{s!r} is a file; expected {filename!r} or a folder containing it")
        return local
    if local.is_dir():
        if filename is None:
            raise HubError(f"{s!r} is a folder; expected a file (or name a file inside it)")
        path = local / filename
        if not path.is_file():
            raise HubError(f"local folder {s!r} has no file {filename!r}")
        return path
    if looks_like_path(s):
        raise HubError(f"local path {s!r} does not exist")
    repo_id, sub = _split_ref(s)
    if filename is None and sub is None:
        raise HubError(f"{s!r} is not a local file; to name a file on the Hub use "
                       "'org/name/path/in/repo' or pass filename=")
    _check_repo_id(repo_id, s)
    in_repo = "/".join(p for p in (sub, filename) if p)

    import huggingface_hub

    try:
        _ask_once_if_uncached(repo_id, in_repo, revision)
        return Path(huggingface_hub.hf_hub_download(repo_id, in_repo, revision=revision))
    except _catchable() as e:
        raise _hub_error(e, repo_id, revision, in_repo) from e


def _ask_once_if_uncached(repo_id, filename, revision):
    """Fail at once when the Hub cannot be reached and the file is not cached.

    hf_hub_download, for a file missing from the cache whose metadata request failed to connect
    or timed out, asks 6 more times with backoff (1, 2, 4, 8, 8 s waits: about 23 s, or minutes
    with its 60 s retry timeout) before giving up. So ask once first, without retries, with
    huggingface_hub's own metadata request (HF_HUB_ETAG_TIMEOUT honoured), and let a connection
    or timeout error through. An HTTP answer, even an error, is left to hf_hub_download to ask
    again and report (it retries 429 and 5xx, as it should). Skipped offline (HF_HUB_OFFLINE:
    nothing is asked) and for a cached file (the library then falls back to it without retrying).
    """
    import huggingface_hub
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return
    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision), str):
        return
    url = huggingface_hub.hf_hub_url(repo_id, filename, revision=revision)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except _hf("HfHubHTTPError"):
        pass  # the Hub answered
