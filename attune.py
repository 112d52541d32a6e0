#!/usr/bin/env python3
"""attune.py: a one-file command-line client for the Attune automation platform.

Copy it onto any server or container and run it with the system python3
(CPython 3.6 to 3.13, or PyPy 3); it needs nothing outside the standard library.

Credentials live in one JSON file (mode 0600) holding named profiles. Access
tokens are refreshed shortly before they expire and once more after a 401, and
this stays correct when many copies of the script run at the same moment: every
write is a read-modify-write under a lock file, and every refresh goes through
one compare-and-refresh function.

Table of contents: grep -n '^# ===' attune.py
"""

import binascii
import errno
import json
import os
import sys
import time

# === Compatibility ===========================================================
# Each shim says why it exists, so it can go when the floor rises.

try:  # POSIX advisory locks
    import fcntl
except ImportError:  # Windows has msvcrt instead
    fcntl = None

try:  # Windows byte-range locks
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

WINDOWS = os.name == "nt"


def replace_file(src, dst):
    """os.replace, retried briefly on Windows, where a reader holding dst open
    makes the rename fail with PermissionError for a moment."""
    for attempt in range(10):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if not WINDOWS or attempt == 9:
                raise
            time.sleep(0.02 * (attempt + 1))


# === Constants ===============================================================

__version__ = "0.1.0"

DEFAULT_API_URL = "http://localhost:8080"
DEFAULT_PROFILE = "default"
FILE_VERSION = 1                 # credential file schema this script writes
LOCK_TIMEOUT = 30.0              # seconds; ATTUNE_LOCK_TIMEOUT
HTTP_TIMEOUT = 60.0              # seconds; ATTUNE_TIMEOUT
MARGIN_MIN, MARGIN_MAX = 30, 300  # proactive refresh margin bounds, seconds
STILL_USABLE = 30                # an old token with more left survives a failed refresh
RETRY_DELAYS = (0.25, 0.75)      # idempotent requests: two retries
RETRY_STATUSES = (502, 503, 504)
OUTPUT_FORMATS = ("table", "json", "yaml")
TOKEN_KEYS = ("auth_token", "refresh_token", "auth_token_expires_at",
              "refresh_token_expires_at", "invalidated_at")

EXIT_CODES = (
    (0, "success"),
    (1, "API or other error (4xx other than 401, failed execution when waiting, ...)"),
    (2, "usage error, or input needed but no terminal"),
    (3, "configuration error: unknown profile, unreadable, corrupt or unsafe credential file"),
    (4, "authentication required: not logged in, session expired or revoked, second 401"),
    (5, "network or TLS error"),
    (6, "server error (5xx) after retries"),
    (130, "interrupted"),
)

ENVIRONMENT = (
    ("ATTUNE_CONFIG", "credential file (default $XDG_CONFIG_HOME/attune/credentials.json)"),
    ("ATTUNE_PROFILE", "profile to use, unless -p/--profile is given"),
    ("ATTUNE_API_URL", "API URL, unless --api-url is given"),
    ("ATTUNE_API_TOKEN", "access token to use instead of the stored one (alias ATTUNE_AUTH_TOKEN)"),
    ("ATTUNE_TOKEN_FILE", "file holding an access token, re-read on every run"),
    ("ATTUNE_REFRESH_TOKEN", "refresh token paired with ATTUNE_API_TOKEN (never stored)"),
    ("ATTUNE_PASSWORD", "password for auth login when no terminal is available"),
    ("ATTUNE_CA_BUNDLE", "extra CA certificates (PEM) to trust, like --ca-bundle"),
    ("ATTUNE_TIMEOUT", "seconds to wait for each HTTP request (default 60)"),
    ("ATTUNE_LOCK_TIMEOUT", "seconds to wait for the credential lock (default 30)"),
    ("HTTPS_PROXY, HTTP_PROXY, NO_PROXY", "proxies, as curl reads them (NO_PROXY takes CIDRs)"),
)


# === Errors ==================================================================
# Code deep inside raises one of these; only main() prints it and picks the exit.

class AttuneError(Exception):
    """An error the user can act on: main() prints it and exits with exit_code."""
    exit_code = 1


class UsageError(AttuneError):
    exit_code = 2


class ConfigError(AttuneError):
    exit_code = 3


class AuthRequired(AttuneError):
    exit_code = 4


class NetworkError(AttuneError):
    exit_code = 5

    def __init__(self, message, retryable=False):
        AttuneError.__init__(self, message)
        self.retryable = retryable


class ApiError(AttuneError):
    """The server answered with an error status (exit 1)."""

    def __init__(self, message, status=None):
        AttuneError.__init__(self, message)
        self.status = status


class ServerError(ApiError):
    exit_code = 6


def session_expired(profile):
    return AuthRequired("Session for profile '%s' has expired; run: attune auth login --profile %s"
                        % (profile, profile))


def not_logged_in():
    return AuthRequired("Not logged in. Use 'attune auth login'")


# === Helpers: time, base64url, JWT ===========================================

def epoch(value):
    """A stored time or JWT claim as integer epoch seconds, or None when it is not a sane number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value != value or not -1e11 < value < 1e11:  # NaN or absurd
        return None
    return int(value)


def b64url_decode(text):
    """Decode base64url with the padding restored (binascii avoids importing base64)."""
    text = text.replace("-", "+").replace("_", "/")
    return binascii.a2b_base64(text + "=" * (-len(text) % 4))


def jwt_claims(token):
    """The payload of a JWT as a dict, or None for anything malformed. No signature check:
    the client only wants to know when the token expires."""
    if not isinstance(token, str) or token.count(".") != 2:
        return None
    try:
        claims = json.loads(b64url_decode(token.split(".")[1]).decode("utf-8"))
    except (ValueError, UnicodeError, binascii.Error, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def jwt_expiry(token):
    claims = jwt_claims(token)
    return epoch(claims.get("exp")) if claims else None


def jwt_lifetime(token):
    """exp - iat of a JWT in seconds, or None."""
    claims = jwt_claims(token)
    if not claims:
        return None
    iat, exp = epoch(claims.get("iat")), epoch(claims.get("exp"))
    if iat is None or exp is None or exp <= iat:
        return None
    return exp - iat


def refresh_margin(lifetime):
    """Refresh this long before expiry: 10% of the lifetime, kept within 30 s .. 300 s."""
    if not lifetime:
        return MARGIN_MIN
    return max(MARGIN_MIN, min(MARGIN_MAX, lifetime // 10))


DURATION_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_duration(seconds):
    """'6d 23h', '59m 12s', '1h', '45s': the largest unit and the next one when nonzero."""
    seconds = int(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    for i, (name, size) in enumerate(DURATION_UNITS):
        if seconds >= size or size == 1:
            text = "%d%s" % (seconds // size, name)
            if size > 1:
                next_name, next_size = DURATION_UNITS[i + 1]
                rest = seconds % size // next_size
                if rest:
                    text += " %d%s" % (rest, next_name)
            return text


def format_time(when):
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def describe_expiry(expires_at, now):
    if expires_at is None:
        return "unknown expiry"
    left = expires_at - now
    if left <= 0:
        return "expired %s ago (%s)" % (format_duration(-left), format_time(expires_at))
    return "expires in %s (%s)" % (format_duration(left), format_time(expires_at))


def secret_key(key):
    key = str(key).lower()
    return "token" in key or "password" in key or "secret" in key


def redact(value):
    """A copy of JSON-shaped data with every token/password/secret string masked."""
    if isinstance(value, dict):
        return {k: ("***" if secret_key(k) and isinstance(v, str) else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def env_seconds(env, name, default, positive=False):
    """A number of seconds from the environment; a bad value is a usage error."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 if positive else value >= 0) or value == float("inf"):
        raise UsageError("%s must be a %snumber of seconds, not %r"
                         % (name, "positive " if positive else "", raw))
    return value


# === Credential file =========================================================

def credential_path(args, env):
    """Where the credential file is, and what chose it: (path, 'flag'|'env'|'default')."""
    if getattr(args, "config", None):
        return os.path.abspath(os.path.expanduser(args.config)), "flag"
    if env.get("ATTUNE_CONFIG"):
        return os.path.abspath(os.path.expanduser(env["ATTUNE_CONFIG"])), "env"
    if WINDOWS and env.get("APPDATA"):
        return os.path.join(env["APPDATA"], "attune", "credentials.json"), "default"
    xdg = env.get("XDG_CONFIG_HOME", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, "attune", "credentials.json"), "env"
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".config", "attune", "credentials.json"), "default"


def make_private_dirs(directory):
    """Create missing directories with mode 0700; an existing one is never chmod-ed."""
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # another process made it first
            continue
        os.chmod(path, 0o700)  # ours, so exact, whatever the umask


def write_atomic(path, data):
    """Write bytes to path so that a reader sees the old or the new file, never a mix:
    temp file in the same directory (mkstemp makes it 0600), fsync, rename over."""
    import tempfile
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if not WINDOWS:  # make the rename itself durable; best effort
        try:
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


def empty_document():
    return {"version": FILE_VERSION, "profiles": {}}


class CredentialStore:
    """The JSON credential file. Reads are lock-free (writes are atomic renames);
    every write re-reads the file under the lock and changes only what it must."""

    def __init__(self, path, warn, log, lock_timeout=LOCK_TIMEOUT, command="attune"):
        self.path = path
        self.warn = warn
        self.log = log
        self.lock_timeout = lock_timeout
        self.command = command
        self.exists = False
        self._doc = None
        self._checked_safety = False

    # -- reading ---------------------------------------------------------------
    def load(self):
        """The document, read once per run unless reload() is called."""
        if self._doc is None:
            self._doc = self._read()
        return self._doc

    def reload(self):
        self._doc = None
        return self.load()

    def _read(self):
        for attempt in (1, 2):
            try:
                with open(self.path, "rb") as f:
                    raw = f.read()
                    st = os.fstat(f.fileno())
            except FileNotFoundError:
                self.exists = False
                return empty_document()
            except OSError as e:
                raise ConfigError("cannot read credential file %s: %s" % (self.path, e.strerror or e))
            self.exists = True
            self._check_safety(st)
            try:
                return self._parse(raw)
            except ValueError as e:
                if attempt == 2:
                    raise ConfigError(
                        "credential file %s is not valid (%s); fix it, or move it aside "
                        "(mv %s %s.broken) and log in again" % (self.path, e, self.path, self.path))
                time.sleep(0.1)  # a writer on a filesystem without atomic rename?

    def _parse(self, raw):
        try:
            doc = json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise ValueError("not UTF-8: %s" % e.reason)
        except RecursionError:
            raise ValueError("nested too deeply")
        if not isinstance(doc, dict):
            raise ValueError("the top level is not a JSON object")
        version = doc.get("version", FILE_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError("'version' is not an integer")
        profiles = doc.setdefault("profiles", {})
        if not isinstance(profiles, dict):
            raise ValueError("'profiles' is not an object")
        current = doc.get("current_profile")
        if current is not None and not isinstance(current, str):
            raise ValueError("'current_profile' is not a string")
        return doc

    def _check_safety(self, st):
        """Warn (once) about a file others can read or that someone else owns; never fix it silently."""
        if self._checked_safety or WINDOWS:
            return
        self._checked_safety = True
        if st.st_mode & 0o077:
            self.warn("credential file %s is accessible by other users (mode %03o); run: chmod 600 %s"
                      % (self.path, st.st_mode & 0o777, self.path))
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            self.warn("credential file %s is owned by uid %d, not by you (uid %d)"
                      % (self.path, st.st_uid, os.geteuid()))

    @property
    def version(self):
        return self.load().get("version", FILE_VERSION)

    def profiles(self):
        return self.load()["profiles"]

    def profile(self, name):
        """The stored profile dict, or None. A malformed entry is a configuration error."""
        entry = self.profiles().get(name)
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError("profile '%s' in credential file %s is not a JSON object; "
                              "fix it or remove it (attune config remove-profile %s)"
                              % (name, self.path, name))
        return entry

    def current_profile(self):
        return self.load().get("current_profile")

    # -- writing ---------------------------------------------------------------
    def check_writable(self):
        version = self.version
        if version > FILE_VERSION:
            raise ConfigError("credential file %s was written by a newer attune.py (version %d); "
                              "not rewriting it. Upgrade attune.py, or use --config FILE for another file"
                              % (self.path, version))

    def lock(self):
        real = os.path.realpath(self.path)
        try:
            make_private_dirs(os.path.dirname(real))
        except OSError as e:
            raise self._write_error(e)
        return FileLock(real + ".lock", self.lock_timeout, self.command, self.warn, self.log)

    def modify(self, change):
        """Read-modify-write under the lock; change(doc) edits the freshly read document."""
        with self.lock():
            return self.modify_locked(change)

    def modify_locked(self, change):
        """The same, for a caller that already holds the lock (or gave up waiting for it)."""
        self.reload()
        self.check_writable()
        doc = self._doc
        result = change(doc)
        doc.setdefault("version", FILE_VERSION)
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        try:
            write_atomic(os.path.realpath(self.path), data)
        except OSError as e:
            raise self._write_error(e)
        self.exists = True
        return result

    def _write_error(self, e):
        return ConfigError("cannot write credential file %s: %s; choose another location with "
                           "--config FILE or ATTUNE_CONFIG" % (self.path, e.strerror or e))


# === Lock ====================================================================

LOCK_BUSY = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, getattr(errno, "EDEADLK", -1)}


class FileLock:
    """Exclusive lock on '<credential file>.lock', held around each read-modify-write.

    The lock file is never deleted: deleting it would let a waiter lock an unlinked
    file while a newcomer locks a fresh one. Its content (pid and command of the
    holder) is informational only. When locking is impossible or the deadline
    passes, work goes on unlocked: atomic writes and compare-and-refresh keep that
    safe, the lock only saves refresh calls and lost updates."""

    def __init__(self, path, timeout, command, warn, log):
        self.path = path
        self.timeout = timeout
        self.command = command
        self.warn = warn
        self.log = log
        self.fd = None
        self.held = False
        self._method = 0  # POSIX: 0 flock, 1 lockf, 2 none works here

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            self.log("cannot open lock file %s (%s); continuing without the lock" % (self.path, e))
            return False
        start = time.monotonic()
        deadline = start + self.timeout
        delay, announced = 0.002, False
        while True:
            state = self._try_lock()
            if state:
                self.held = True
                self._write_holder()
                return True
            if state is None:
                self.log("the file system refuses locks on %s; continuing without the lock" % self.path)
                return False
            now = time.monotonic()
            if now >= deadline:
                self.warn("gave up waiting %gs for the lock %s%s; continuing without it"
                          % (self.timeout, self.path, self._holder(" held by ")))
                return False
            if not announced and now - start >= 1.0:
                announced = True
                self.warn("waiting for %s ..." % (self._holder() or "another attune process"))
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 1.5, 0.05)  # short, growing: waiters wake soon after release

    def _try_lock(self):
        """True if locked, False if another process holds it, None if locking is unsupported."""
        if fcntl is None:
            return self._try_msvcrt()
        while self._method < 2:
            try:
                if self._method == 0:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as e:
                if e.errno in LOCK_BUSY:
                    return False
                # ENOLCK, ENOSYS, EOPNOTSUPP (NFS, some FUSE): try the next method
                self.log("%s failed on %s (%s)" % (("flock", "lockf")[self._method], self.path, e))
                self._method += 1
        return None

    def _try_msvcrt(self):
        os.lseek(self.fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(self.fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _write_holder(self):
        try:
            info = ("%d %s\n" % (os.getpid(), self.command)).encode("utf-8", "replace")
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.write(self.fd, info)
            os.ftruncate(self.fd, len(info))
        except OSError:
            pass

    def _holder(self, prefix=""):
        """'pid 4121 (attune auth login)' from the lock file, or '' when unreadable."""
        try:
            with open(self.path, "rb") as f:
                pid, _, command = f.read(300).decode("utf-8", "replace").strip().partition(" ")
        except OSError:
            return ""
        if not pid.isdigit():
            return ""
        return "%spid %s (%s)" % (prefix, pid, command or "?")

    def release(self):
        if self.fd is None:
            return
        try:
            if self.held:
                if fcntl is None:
                    os.lseek(self.fd, 0, os.SEEK_SET)
                    msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)
                elif self._method == 0:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                else:
                    fcntl.lockf(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd, self.held = None, False


# === HTTP transport ==========================================================
# urllib is imported inside these functions: `auth token` with a fresh cached token
# never touches the network and must not pay for importing it.

def user_agent():
    return "attune.py/%s python/%d.%d" % ((__version__,) + tuple(sys.version_info[:2]))


def origin(url):
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def no_proxy_matches(host, port, no_proxy):
    """curl/Go NO_PROXY semantics: '*', host names and domain suffixes, host:port, IPs and CIDRs."""
    for entry in no_proxy.replace(" ", ",").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            import ipaddress
            try:
                if ipaddress.ip_address(host.strip("[]")) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        name = name.strip("[]").lstrip("*").lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def proxy_for(url, env):
    """The proxy for url from *_PROXY variables (lowercase first, like curl), or None.
    Loopback is never proxied, as in Go."""
    scheme, host, port = origin(url)
    if host in ("localhost", "::1") or host.startswith("127.") or host.endswith(".localhost"):
        return None
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    if no_proxy and no_proxy_matches(host, port, no_proxy):
        return None
    for name in (scheme + "_proxy", "all_proxy"):
        value = env.get(name) or env.get(name.upper())
        if value:
            return value
    return None


class Response:
    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason or ""
        self.headers = headers
        self.body = body

    @property
    def ok(self):
        return 200 <= self.status < 300

    def json(self):
        """The body parsed as JSON; None for an empty body; ApiError when it is not JSON."""
        if not self.body.strip():
            return None
        try:
            return json.loads(self.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError("the server answered %d %s with a body that is not JSON: %s"
                           % (self.status, self.reason, snippet(self.body)), self.status)


def snippet(body, limit=200):
    text = " ".join(body.decode("utf-8", "replace").split())
    return text[:limit] + ("..." if len(text) > limit else "")


def error_message(resp):
    """The server's message from either error shape; otherwise the start of the raw body."""
    try:
        body = json.loads(resp.body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, str) and error:
            return error
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(body.get("message"), str) and body["message"]:
            return body["message"]
    return snippet(resp.body) or "(empty body)"


def api_error(resp):
    """The AttuneError for a non-2xx response, with the exit code design.md section 7 gives it."""
    message = "API error (%d %s): %s" % (resp.status, resp.reason, error_message(resp))
    if resp.status == 401:
        return AuthRequired(message)
    if resp.status >= 500:
        return ServerError(message, resp.status)
    return ApiError(message, resp.status)


def describe_body(body):
    """A body for the -v log: JSON with secrets masked, or just its size."""
    if not body:
        return None
    try:
        return json.dumps(redact(json.loads(body.decode("utf-8"))), ensure_ascii=False)[:2000]
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "<%d bytes>" % len(body)


class Transport:
    """HTTP over urllib: timeouts, TLS settings, proxies, same-origin redirects only,
    retries for idempotent requests, and a redacted -v log."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._openers = {}

    def request(self, method, url, body=None, token=None, content_type="application/json"):
        """Send one request (retrying GETs on refused/reset connections and 502/503/504);
        return a Response for any status, raise NetworkError when there is none."""
        delays = RETRY_DELAYS if method in ("GET", "HEAD") else ()
        for attempt in range(len(delays) + 1):
            last = attempt == len(delays)
            try:
                resp = self._send(method, url, body, token, content_type)
            except NetworkError as e:
                if last or not e.retryable:
                    raise
                self.ctx.log("%s; retrying in %gs" % (e, delays[attempt]))
            else:
                if last or resp.status not in RETRY_STATUSES:
                    return resp
                self.ctx.log("%d %s; retrying in %gs" % (resp.status, resp.reason, delays[attempt]))
            time.sleep(delays[attempt])

    def _send(self, method, url, body, token, content_type):
        import urllib.request
        import urllib.error
        import http.client
        req = urllib.request.Request(url, data=body, method=method)
        req.add_header("User-Agent", user_agent())
        req.add_header("Accept", "application/json")
        if body is not None:
            req.add_header("Content-Type", content_type)
        if token:
            # never copied onto a redirected request; see same_origin_redirects()
            req.add_unredirected_header("Authorization", "Bearer " + token)
        log = self.ctx.log
        log("> %s %s" % (method, url))
        if token:
            log("> Authorization: Bearer ***")
        if body is not None:
            log(">   %s" % describe_body(body))
        started = time.monotonic()
        try:
            with self._opener(url).open(req, timeout=self.ctx.timeout) as r:
                resp = Response(r.getcode(), r.reason, r.headers, r.read())
        except urllib.error.HTTPError as e:
            try:
                data = e.read()
            except (OSError, http.client.HTTPException):
                data = b""
            resp = Response(e.code, e.reason, e.headers, data)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise network_error(url, e, self.ctx.timeout)
        except ValueError as e:  # Python 3.6 raises ssl.CertificateError (a ValueError) bare
            if type(e).__name__ != "CertificateError":
                raise
            raise network_error(url, e, self.ctx.timeout)
        log("< %d %s (%d ms)" % (resp.status, resp.reason, (time.monotonic() - started) * 1000))
        if resp.body and self.ctx.verbose:
            log("<   %s" % describe_body(resp.body))
        return resp

    def _opener(self, url):
        import urllib.request
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise UsageError("the API URL must start with http:// or https://, not %r" % url)
        proxy = proxy_for(url, self.ctx.env)
        key = (scheme, proxy)
        if key not in self._openers:
            handlers = [urllib.request.ProxyHandler({scheme: proxy} if proxy else {}),
                        same_origin_redirects()]
            if scheme == "https":
                handlers.append(urllib.request.HTTPSHandler(context=self.ctx.ssl_context()))
            self._openers[key] = urllib.request.build_opener(*handlers)
        return self._openers[key]


def same_origin_redirects():
    """A redirect handler that follows only same scheme, host and port, and carries the
    bearer token (an unredirected header, so urllib drops it) over to the same origin."""
    import urllib.request

    class SameOriginRedirectHandler(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            from urllib.parse import urljoin
            newurl = urljoin(req.full_url, newurl)
            old, new = origin(req.full_url), origin(newurl)
            if old != new:
                if old[0] == "https" and new[0] == "http":
                    raise ApiError("refusing to follow a redirect from https to http (%s://%s:%s)"
                                   % new)
                raise ApiError("refusing to follow a redirect to another origin (%s://%s:%s)" % new)
            new_req = urllib.request.HTTPRedirectHandler.redirect_request(
                self, req, fp, code, msg, headers, newurl)
            auth = req.unredirected_hdrs.get("Authorization")
            if new_req is not None and auth:
                new_req.add_unredirected_header("Authorization", auth)
            return new_req

    return SameOriginRedirectHandler()


def network_error(url, exc, timeout):
    """A NetworkError saying what failed and what to try."""
    import socket
    import ssl
    reason = getattr(exc, "reason", None) or exc
    where = "%s://%s:%s" % origin(url)
    if isinstance(reason, ssl.SSLError) or isinstance(exc, ssl.SSLError):
        text = str(reason)
        if "CERTIFICATE_VERIFY_FAILED" in text or type(reason).__name__ == "SSLCertVerificationError":
            return NetworkError("TLS certificate of %s is not trusted (%s); if it uses a private CA, "
                                "pass --ca-bundle FILE or set ATTUNE_CA_BUNDLE" % (where, text))
        return NetworkError("TLS error talking to %s: %s" % (where, text))
    if isinstance(reason, ssl.CertificateError):  # Python 3.6: hostname mismatch
        return NetworkError("TLS certificate of %s does not match: %s" % (where, reason))
    if isinstance(reason, (socket.timeout,)) or "timed out" in str(reason):
        return NetworkError("no answer from %s within %gs (set ATTUNE_TIMEOUT to wait longer)"
                            % (where, timeout))
    if isinstance(reason, socket.gaierror):
        return NetworkError("cannot resolve host of %s: %s" % (where, reason), retryable=True)
    if isinstance(reason, ConnectionRefusedError):
        return NetworkError("cannot connect to %s: connection refused (is the server running?)"
                            % where, retryable=True)
    if isinstance(reason, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)) or \
            type(reason).__name__ in ("RemoteDisconnected", "IncompleteRead", "BadStatusLine"):
        return NetworkError("connection to %s was closed unexpectedly (%s)"
                            % (where, type(reason).__name__), retryable=True)
    return NetworkError("cannot talk to %s: %s" % (where, getattr(reason, "strerror", None) or reason))


# === Session: tokens and refresh =============================================

class Credentials:
    """The tokens a command will send, where they came from, and their known expiry."""

    def __init__(self, access=None, refresh=None, access_expires_at=None, refresh_expires_at=None,
                 source=None, origin=None, invalidated_at=None):
        self.access = access
        self.refresh = refresh
        self.access_expires_at = access_expires_at
        self.refresh_expires_at = refresh_expires_at
        self.source = source    # 'env', 'token_file', 'file' or None
        self.origin = origin    # variable name, token file path, or profile name
        self.invalidated_at = invalidated_at

    @classmethod
    def from_profile(cls, name, profile):
        """Stored tokens; a hand-seeded token without a stored expiry uses its JWT exp."""
        profile = profile or {}

        def text(key):
            value = profile.get(key)
            return value if isinstance(value, str) and value else None

        access, refresh = text("auth_token"), text("refresh_token")

        def expiry(key, token):
            return epoch(profile[key]) if profile.get(key) is not None else jwt_expiry(token)

        return cls(access, refresh, expiry("auth_token_expires_at", access),
                   expiry("refresh_token_expires_at", refresh), "file", name,
                   epoch(profile.get("invalidated_at")))

    def same_tokens(self, other):
        return (self.access, self.refresh) == (other.access, other.refresh)

    @property
    def lifetime(self):
        return jwt_lifetime(self.access)

    def access_left(self, now):
        return None if self.access_expires_at is None else self.access_expires_at - now

    def refresh_usable(self, now):
        return bool(self.refresh) and (self.refresh_expires_at is None or self.refresh_expires_at > now)


def describe_source(source, origin):
    """'environment (ATTUNE_API_TOKEN)', 'token file /run/token', ... for messages."""
    if source is None:
        return "none"
    return {"env": "environment (%s)", "token_file": "token file %s",
            "file": "credential file, profile '%s'"}[source] % origin


def read_token_file(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeError) as e:
        raise ConfigError("cannot read token file %s (ATTUNE_TOKEN_FILE): %s"
                          % (path, getattr(e, "strerror", None) or e))
    if not token:
        raise ConfigError("token file %s (ATTUNE_TOKEN_FILE) is empty" % path)
    return token


def token_pair(data, sent_at, received_at, old_refresh=None, old_refresh_expiry=None):
    """Tokens and expiries from a login or refresh answer. The access expiry is
    send time + expires_in on our own clock, so server clock skew does not matter."""
    if not isinstance(data, dict) or not isinstance(data.get("access_token"), str) \
            or not data["access_token"]:
        raise ApiError("the server's answer has no access token; stored tokens are unchanged")
    access = data["access_token"]
    expires_in = epoch(data.get("expires_in"))
    access_expires_at = int(sent_at) + expires_in if expires_in and expires_in > 0 else jwt_expiry(access)
    refresh = data.get("refresh_token")
    if isinstance(refresh, str) and refresh:
        lifetime = jwt_lifetime(refresh)
        refresh_expires_at = int(received_at) + lifetime if lifetime else jwt_expiry(refresh)
    else:  # a server that does not rotate refresh tokens
        refresh, refresh_expires_at = old_refresh, old_refresh_expiry
    return {"auth_token": access, "refresh_token": refresh,
            "auth_token_expires_at": access_expires_at,
            "refresh_token_expires_at": refresh_expires_at}


def envelope_data(body):
    """The object of a {"data": ...} envelope; a bare body is returned as is."""
    if isinstance(body, dict) and "data" in body:
        return body["data"]
    return body


class Session:
    """One profile's connection to the server: which token to send, and when and how
    to renew it. At most one proactive and one reactive refresh per run."""

    def __init__(self, ctx, profile=None, api_url=None, use_env=True):
        self.ctx = ctx
        self.profile = profile or ctx.profile
        self.api_url = (api_url or ctx.api_url_for(self.profile)[0]).rstrip("/")
        self.creds = ctx.credentials_for(self.profile, use_env)
        self._proactive_done = False
        self._reactive_done = False
        self._transport = None

    @property
    def transport(self):
        if self._transport is None:
            self._transport = Transport(self.ctx)
        return self._transport

    def url(self, path, query=None):
        if not path.startswith("/"):
            path = "/" + path
        if not path.startswith(("/auth", "/health", "/api/")):
            path = "/api/v1" + path
        if query:
            from urllib.parse import urlencode
            pairs = [(k, v) for k, v in query.items() if v is not None]
            if pairs:
                path += ("&" if "?" in path else "?") + urlencode(pairs, doseq=True)
        return self.api_url + path

    # -- the token to send -----------------------------------------------------
    def expired_error(self):
        """The AuthRequired for tokens that are expired (or rejected) and cannot be renewed."""
        c = self.creds
        if c.source == "env":
            return AuthRequired("the access token in %s has expired or was rejected; set a fresh one%s"
                                % (c.origin, "" if c.refresh else " or ATTUNE_REFRESH_TOKEN"))
        if c.source == "token_file":
            return AuthRequired("the access token in %s (ATTUNE_TOKEN_FILE) has expired or was "
                                "rejected" % c.origin)
        return session_expired(self.profile)

    def token(self, min_ttl=0):
        """The access token to send, refreshed first when it has less than
        max(margin, min_ttl) left. A valid token costs no request at all."""
        c = self.creds
        if not c.access:
            raise not_logged_in()
        now = self.ctx.now()
        left = c.access_left(now)
        if left is None:  # not a JWT and never told its lifetime: the 401 path decides
            return c.access
        margin = refresh_margin(c.lifetime)
        if left >= max(margin, min_ttl) or self._proactive_done:
            return c.access
        self._proactive_done = True
        if c.invalidated_at or not c.refresh_usable(now):  # no refresh possible
            if left > 0 and left >= min_ttl:
                return c.access
            if left > 0:
                raise AuthRequired("the access token has %s left, less than --min-ttl %ds, and cannot "
                                   "be refreshed (%s)" % (format_duration(left), min_ttl,
                                                          describe_source(c.source, c.origin)))
            raise self.expired_error()
        self.ctx.log("access token for profile '%s' %s (refresh margin %ds); refreshing"
                     % (self.profile, describe_expiry(c.access_expires_at, now), margin))
        try:
            self.refresh()
        except (NetworkError, ServerError) as e:
            if left > STILL_USABLE:
                self.ctx.log("refresh failed (%s); the current token is still valid for %s"
                             % (e, format_duration(left)))
                return c.access
            raise
        return self.creds.access

    # -- compare-and-refresh ---------------------------------------------------
    def refresh(self):
        """Renew the tokens: the one refresh path for proactive, reactive and `auth refresh`."""
        if self.creds.source == "file":
            self._refresh_stored()
        elif self.creds.source == "token_file":
            fresh = read_token_file(self.creds.origin)
            if fresh != self.creds.access:  # rotated by an agent since we read it
                self.creds = self.ctx.credentials_from_token(fresh, "token_file", self.creds.origin,
                                                             self.creds.refresh)
            elif self.creds.refresh:
                self._refresh_in_memory()
            else:
                raise self.expired_error()
        else:
            self._refresh_in_memory()

    def _refresh_stored(self):
        """Compare-and-refresh: under the lock, re-read the profile; if another process
        already changed the tokens, use theirs; otherwise POST /auth/refresh and store."""
        store, started, name = self.ctx.store, self.creds, self.profile
        with store.lock():
            stored = self.stored_credentials()
            if not stored.same_tokens(started):
                if not stored.access:
                    raise not_logged_in()
                self.ctx.log("profile '%s' was refreshed by another process; using its token" % name)
                self.creds = stored
                return
            now = self.ctx.now()
            if stored.invalidated_at or not stored.refresh_usable(now):
                raise session_expired(name)
            store.check_writable()
            pair = self._post_refresh(stored)
            if pair is None:  # rejected; an unlocked writer may have stored new tokens meanwhile
                again = self.stored_credentials()
                if again.access and again.access != stored.access:
                    self.creds = again
                    return
                if again.refresh and again.refresh != stored.refresh:
                    pair = self._post_refresh(again)
            if pair is None:
                store.modify_locked(lambda doc: self._mark_invalidated(doc, now))
                raise session_expired(name)
            store.modify_locked(lambda doc: self._store_pair(doc, pair))
            self.creds = Credentials.from_profile(name, pair)
            self.ctx.log("stored new tokens for profile '%s'; access token %s"
                         % (name, describe_expiry(self.creds.access_expires_at, self.ctx.now())))

    def stored_credentials(self):
        self.ctx.store.reload()
        return Credentials.from_profile(self.profile, self.ctx.store.profile(self.profile))

    def _store_pair(self, doc, pair):
        profile = doc["profiles"].setdefault(self.profile, {})
        profile.update(pair)
        profile["invalidated_at"] = None

    def _mark_invalidated(self, doc, now):
        profile = doc["profiles"].get(self.profile)
        if isinstance(profile, dict):
            profile["invalidated_at"] = int(now)

    def _refresh_in_memory(self):
        """Refresh tokens that came from the environment: they are never written anywhere."""
        c = self.creds
        if not c.refresh_usable(self.ctx.now()):
            raise self.expired_error()
        pair = self._post_refresh(c)
        if pair is None:
            raise AuthRequired("the refresh token in ATTUNE_REFRESH_TOKEN was rejected by the server")
        self.creds = Credentials(pair["auth_token"], pair["refresh_token"], pair["auth_token_expires_at"],
                                 pair["refresh_token_expires_at"], c.source, c.origin)

    def _post_refresh(self, creds):
        """POST /auth/refresh: the new tokens, or None when the server rejects the refresh
        token (400/401/403/422). Network and 5xx failures raise and change nothing."""
        sent_at = self.ctx.now()
        body = json.dumps({"refresh_token": creds.refresh}).encode("utf-8")
        resp = self.transport.request("POST", self.url("/auth/refresh"), body)
        if resp.status in (400, 401, 403, 422):
            self.ctx.log("refresh token rejected: %s" % error_message(resp))
            return None
        if not resp.ok:
            raise api_error(resp)
        try:
            data = envelope_data(resp.json())
        except ApiError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
            raise ApiError("the server's answer to the token refresh is not understood (%s); "
                           "stored tokens are unchanged" % snippet(resp.body, 80), resp.status)
        return token_pair(data, sent_at, self.ctx.now(), creds.refresh, creds.refresh_expires_at)

    # -- requests --------------------------------------------------------------
    def request(self, method, path, body=None, query=None, auth=True, raw_body=None,
                content_type="application/json"):
        """Send a request; on a 401 with token T, compare-and-refresh and retry once with
        the same bytes. A second 401 means authentication is required (exit 4)."""
        url = self.url(path, query)
        data = raw_body if raw_body is not None else (
            None if body is None else json.dumps(body).encode("utf-8"))
        token = self.token() if auth and self.creds.access else None
        resp = self.transport.request(method, url, data, token, content_type)
        if resp.status != 401 or not token:
            if resp.status == 401 and auth:
                raise not_logged_in()
            return resp
        if self._reactive_done:
            raise AuthRequired("the server rejected the token (%s); run: attune auth login --profile %s"
                               % (error_message(resp), self.profile))
        self._reactive_done = True
        self.ctx.log("401 from the server; refreshing and retrying once")
        self.refresh()
        resp = self.transport.request(method, url, data, self.creds.access, content_type)
        if resp.status == 401:
            raise AuthRequired("the server rejected the refreshed token too (%s); run: attune auth "
                               "login --profile %s" % (error_message(resp), self.profile))
        return resp

    def call(self, method, path, body=None, query=None, auth=True):
        """request() for JSON APIs: the parsed body of a 2xx answer, or the matching error."""
        resp = self.request(method, path, body, query, auth)
        if not resp.ok:
            raise api_error(resp)
        return resp.json()


# === Output ==================================================================

ASCII_FALLBACK = (("✓", "OK"), ("✗", "x"), ("ℹ", "i"), ("⚠", "!"), ("…", "..."), ("•", "*"),
                  ("─", "-"))


def write_text(stream, text):
    """Write text; if the stream's encoding cannot carry it (LANG=C on Python 3.6),
    use ASCII stand-ins for our symbols and escapes for the rest, never crash."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        for symbol, plain in ASCII_FALLBACK:
            text = text.replace(symbol, plain)
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding))


def to_json(data, ascii_only=False):
    return json.dumps(data, indent=2, ensure_ascii=ascii_only)


YAML_WORDS = {"", "~", "null", "true", "false", "yes", "no", "on", "off", "y", "n"}
YAML_INDICATORS = "-?:,[]{}#&*!|>'\"%@`"


def yaml_needs_quotes(s):
    """True when YAML would read the plain scalar s as something other than this string."""
    if s.lower() in YAML_WORDS or s != s.strip() or s[0] in YAML_INDICATORS:
        return True
    if ": " in s or " #" in s or s.endswith(":") or any(c < " " or c == "\x7f" for c in s):
        return True
    first = s[0]
    return first.isdigit() or (first in "+." and len(s) > 1) or s.lower() in (".inf", ".nan")


def yaml_scalar(value, ascii_only=False):
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if value != value:
            return ".nan"
        if value in (float("inf"), float("-inf")):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    text = str(value)
    if yaml_needs_quotes(text) or (ascii_only and not all(ord(c) < 128 for c in text)):
        return json.dumps(text, ensure_ascii=ascii_only)
    return text


def yaml_lines(value, indent, ascii_only):
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        lines = []
        for key, item in value.items():
            head = pad + yaml_scalar(str(key), ascii_only) + ":"
            if isinstance(item, dict) and item:
                lines.append(head)
                lines.extend(yaml_lines(item, indent + 2, ascii_only))
            elif isinstance(item, list) and item:
                lines.append(head)
                lines.extend(yaml_lines(item, indent, ascii_only))  # block sequences sit at key level
            else:
                lines.append(head + " " + yaml_lines(item, 0, ascii_only)[0])
        return lines
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        lines = []
        for item in value:
            sub = yaml_lines(item, indent + 2, ascii_only)
            sub[0] = pad + "- " + sub[0][indent + 2:]
            lines.extend(sub)
        return lines
    return [pad + yaml_scalar(value, ascii_only)]


def to_yaml(data, ascii_only=False):
    """A small YAML emitter for JSON-shaped data: block style, quoting only when needed."""
    return "\n".join(yaml_lines(data, 0, ascii_only))


def cell_text(value):
    if value is None:
        return ""
    if value is True or value is False:
        return "✓" if value else "✗"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return " ".join(str(value).split("\n"))


def fit_widths(widths, limit):
    """Shrink the widest columns until the row fits in limit characters."""
    widths = list(widths)
    gaps = 2 * (len(widths) - 1)
    while sum(widths) + gaps > limit:
        widest = max(range(len(widths)), key=lambda i: widths[i])
        if widths[widest] <= 6:
            break
        widths[widest] -= 1
    return widths


def clip(text, width):
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


def render_table(columns, rows, width=None):
    """Aligned columns under a header and a rule; cut with '…' to fit width."""
    cells = [[cell_text(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(columns)]
    if width:
        widths = fit_widths(widths, width)
    rule = ["─" * w for w in widths]
    lines = []
    for row in [list(columns), rule] + cells:
        parts = [clip(text, w).ljust(w) for text, w in zip(row, widths)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def render_pairs(pairs, width=None):
    """'Key   value' lines; multi-line values are indented under their first line."""
    keywidth = max([len(k) for k, _ in pairs] or [0])
    lines = []
    for key, value in pairs:
        text = value if isinstance(value, str) else cell_text(value)
        first, *rest = text.split("\n") if text else [""]
        lines.append((key + ":").ljust(keywidth + 3) + first)
        lines.extend(" " * (keywidth + 3) + line for line in rest)
    return "\n".join(lines)


# === Context =================================================================

class Context:
    """What a command needs, resolved from arguments and environment: streams, clock,
    output format, credential store, profile, API URL and tokens."""

    def __init__(self, args, env, clock=None):
        self.args = args
        self.env = env
        self.stdout, self.stderr, self.stdin = sys.stdout, sys.stderr, sys.stdin
        self.clock = clock or time.time
        self.verbose = getattr(args, "verbose", 0) or 0
        self.timeout = env_seconds(env, "ATTUNE_TIMEOUT", HTTP_TIMEOUT, positive=True)
        self.config_path, self.config_source = credential_path(args, env)
        self.store = CredentialStore(self.config_path, self.warn, self.log,
                                     env_seconds(env, "ATTUNE_LOCK_TIMEOUT", LOCK_TIMEOUT),
                                     " ".join(["attune"] + getattr(args, "command_path", [])))
        self._profile = None
        self._warned = set()
        self._ssl = None
        if getattr(args, "insecure", False):
            self.warn("--insecure: TLS certificates are not verified; anyone on the network "
                      "path can read your tokens")

    def now(self):
        return self.clock()

    # -- messages --------------------------------------------------------------
    def warn(self, message):
        if message not in self._warned:
            self._warned.add(message)
            write_text(self.stderr, "attune: warning: %s\n" % message)

    def log(self, message):
        if self.verbose:
            write_text(self.stderr, "attune: %s\n" % message)

    # -- output ----------------------------------------------------------------
    @property
    def output(self):
        args = self.args
        chosen = {v for v in (getattr(args, "output", None),
                              "json" if getattr(args, "json", False) else None,
                              "yaml" if getattr(args, "yaml", False) else None) if v}
        if len(chosen) > 1:
            raise UsageError("choose one output format: --output, -j/--json or -y/--yaml")
        if chosen:
            return chosen.pop()
        try:
            stored = self.store.load().get("format")
        except ConfigError:
            stored = None
        return stored if stored in OUTPUT_FORMATS else "table"

    def emit(self, data, table=None):
        """Print a result: one JSON or YAML document, or the table rendering."""
        fmt = self.output
        if fmt == "json":
            self.write_document(to_json, data)
        elif fmt == "yaml":
            self.write_document(to_yaml, data)
        elif table is not None:
            table()
        else:
            self.write_document(to_json, data)

    def write_document(self, dump, data):
        try:
            self.stdout.write(dump(data) + "\n")
        except UnicodeEncodeError:  # keep the document valid: escape instead of replace
            self.stdout.write(dump(data, ascii_only=True) + "\n")

    def out(self, text=""):
        write_text(self.stdout, text + "\n")

    def success(self, message):
        if self.output == "table":
            self.out("✓ " + message)

    def info(self, message):
        if self.output == "table":
            self.out("ℹ " + message)

    def table(self, columns, rows, empty=None):
        if not rows and empty:
            self.out(empty)
        else:
            self.out(render_table(columns, rows, self.terminal_width()))

    def pairs(self, pairs, title=None):
        if title:
            self.out(title)
            self.out("─" * len(title))
        self.out(render_pairs(pairs))

    def terminal_width(self):
        try:
            if self.stdout.isatty():
                return os.get_terminal_size(self.stdout.fileno()).columns
        except (AttributeError, ValueError, OSError):
            pass
        columns = self.env.get("COLUMNS", "")
        return int(columns) if columns.isdigit() and int(columns) > 0 else None

    # -- profile, URL, tokens --------------------------------------------------
    @property
    def profile(self):
        return self.profile_source[0]

    @property
    def profile_source(self):
        """(name, 'flag'|'env'|'file'|'default'), checked to exist unless the command creates it."""
        if self._profile is None:
            args, env = self.args, self.env
            if getattr(args, "profile", None):
                name, source = args.profile, "flag"
            elif env.get("ATTUNE_PROFILE"):
                name, source = env["ATTUNE_PROFILE"], "env"
            elif self.store.current_profile():
                name, source = self.store.current_profile(), "file"
            else:
                name, source = DEFAULT_PROFILE, "default"
            if not getattr(args, "creates_profile", False):
                self.require_profile(name, source)
            self._profile = (name, source)
        return self._profile

    def require_profile(self, name, source="flag"):
        if name == DEFAULT_PROFILE or self.store.profile(name) is not None:
            return
        known = sorted(set(self.store.profiles()) | {DEFAULT_PROFILE})
        where = " (current_profile in %s)" % self.config_path if source == "file" else ""
        raise ConfigError("Profile '%s' does not exist%s; known profiles: %s"
                          % (name, where, ", ".join(known)))

    def api_url_for(self, profile):
        """(url, source): --api-url > ATTUNE_API_URL > the profile's api_url > the default."""
        if getattr(self.args, "api_url", None):
            return self.args.api_url, "flag"
        if self.env.get("ATTUNE_API_URL"):
            return self.env["ATTUNE_API_URL"], "env"
        stored = (self.store.profile(profile) or {}).get("api_url")
        if stored is not None:
            if not isinstance(stored, str) or not stored:
                raise ConfigError("profile '%s' in %s has an invalid api_url" % (profile, self.config_path))
            return stored, "file"
        if self.store.profile(profile) is not None:
            raise ConfigError("profile '%s' in %s has no api_url; run: attune config set api_url URL"
                              % (profile, self.config_path))
        return DEFAULT_API_URL, "default"

    def credentials_for(self, profile, use_env=True):
        """Tokens by design.md section 4: with --profile, the profile's stored tokens;
        otherwise ATTUNE_API_TOKEN (ATTUNE_AUTH_TOKEN) > ATTUNE_TOKEN_FILE > stored."""
        env = self.env
        if use_env and not getattr(self.args, "profile", None):
            refresh = env.get("ATTUNE_REFRESH_TOKEN") or None
            for name in ("ATTUNE_API_TOKEN", "ATTUNE_AUTH_TOKEN"):
                if env.get(name):
                    return self.credentials_from_token(env[name], "env", name, refresh)
            if env.get("ATTUNE_TOKEN_FILE"):
                path = env["ATTUNE_TOKEN_FILE"]
                return self.credentials_from_token(read_token_file(path), "token_file", path, refresh)
        return Credentials.from_profile(profile, self.store.profile(profile))

    @staticmethod
    def credentials_from_token(access, source, origin, refresh=None):
        return Credentials(access, refresh, jwt_expiry(access), jwt_expiry(refresh) if refresh else None,
                           source, origin)

    def ca_bundle(self):
        """(path, source) of extra CAs: --ca-bundle > ATTUNE_CA_BUNDLE > profile ca_bundle."""
        if getattr(self.args, "ca_bundle", None):
            return self.args.ca_bundle, "flag"
        if self.env.get("ATTUNE_CA_BUNDLE"):
            return self.env["ATTUNE_CA_BUNDLE"], "env"
        try:
            stored = (self.store.profile(self.profile) or {}).get("ca_bundle")
        except ConfigError:
            stored = None
        return (stored, "file") if isinstance(stored, str) and stored else (None, None)

    def ssl_context(self):
        if self._ssl is None:
            import ssl
            context = ssl.create_default_context()
            bundle, source = self.ca_bundle()
            if bundle:
                try:
                    context.load_verify_locations(cafile=os.path.expanduser(bundle))
                except (OSError, ssl.SSLError) as e:
                    raise ConfigError("cannot load CA bundle %s (from %s): %s" % (bundle, source, e))
            if getattr(self.args, "insecure", False):
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._ssl = context
        return self._ssl

    def session(self, **kwargs):
        return Session(self, **kwargs)


# === Prompts and secrets =====================================================

def can_prompt(ctx):
    try:
        return ctx.stdin.isatty() and ctx.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def read_secret(ctx, what, stdin_flag, value, env_name, flag_name):
    """A secret from --X-stdin, --X (warned: visible in the process list), an
    environment variable, or a prompt on a terminal; otherwise a usage error."""
    if stdin_flag and value:
        raise UsageError("give %s either on stdin or as %s, not both" % (what, flag_name))
    if stdin_flag:
        secret = ctx.stdin.readline().rstrip("\r\n")
        if not secret:
            raise UsageError("no %s on standard input" % what)
        return secret
    if value:
        ctx.warn("%s exposes the %s in the process list; prefer %s-stdin%s"
                 % (flag_name, what, flag_name, " or " + env_name if env_name else ""))
        return value
    if env_name and ctx.env.get(env_name):
        return ctx.env[env_name]
    if can_prompt(ctx):
        import getpass
        secret = getpass.getpass("%s: " % what.capitalize(), stream=ctx.stderr)
        if secret:
            return secret
    hint = "%s-stdin" % flag_name + (" or set %s" % env_name if env_name else "")
    raise UsageError("a %s is needed but there is no terminal to ask on; use %s" % (what, hint))


def ask(ctx, prompt):
    if not can_prompt(ctx):
        return None
    ctx.stderr.write(prompt)
    ctx.stderr.flush()
    return ctx.stdin.readline().strip() or None


# === Commands: auth ==========================================================

def adopt_first_profile(doc, name):
    """The first profile ever created becomes the current one."""
    if doc.get("current_profile") is None and set(doc["profiles"]) <= {name}:
        doc["current_profile"] = name


def login_endpoint(session):
    """(path, auth_method): LDAP when the server says local passwords are off and
    LDAP is on; /auth/login otherwise, and whenever /auth/settings fails."""
    try:
        resp = session.request("GET", "/auth/settings", auth=False)
        settings = envelope_data(resp.json()) if resp.ok else None
    except AttuneError:
        settings = None
    if isinstance(settings, dict) and settings.get("local_password_enabled") is False \
            and settings.get("ldap_enabled"):
        return "/auth/ldap/login", "ldap"
    return "/auth/login", "password"


def login_target(ctx, args):
    """(profile name, API URL) a login writes to: --save-profile or the selected profile;
    --url, then the usual URL precedence for that profile."""
    target = getattr(args, "save_profile", None) or ctx.profile
    url = getattr(args, "url", None) or ctx.api_url_for(target)[0]
    return target, url.rstrip("/")


def finish_login(ctx, session, target, url, path, body, method, username=None):
    """POST the login, store tokens, expiries, user and URL in the target profile."""
    sent_at = ctx.now()
    resp = session.request("POST", path, body, auth=False)
    if resp.status in (401, 403):
        raise AuthRequired("login failed: %s" % error_message(resp))
    if not resp.ok:
        raise api_error(resp)
    data = envelope_data(resp.json())
    pair = token_pair(data, sent_at, ctx.now())
    user = data.get("user") if isinstance(data.get("user"), dict) else {}
    username = user.get("login") or username

    def save(doc):
        profile = doc["profiles"].setdefault(target, {})
        profile.update(pair)
        profile.update({"api_url": url, "auth_method": method, "invalidated_at": None})
        if username:
            profile["username"] = username
        else:
            profile.pop("username", None)
        adopt_first_profile(doc, target)

    ctx.store.modify(save)
    expires_at = pair["auth_token_expires_at"]
    expires_in = None if expires_at is None else max(0, int(expires_at - ctx.now()))
    for name in ("ATTUNE_API_TOKEN", "ATTUNE_AUTH_TOKEN", "ATTUNE_TOKEN_FILE"):
        if ctx.env.get(name) and not getattr(ctx.args, "profile", None):
            ctx.warn("%s is set and takes precedence over the stored token" % name)
            break
    result = {"profile": target, "api_url": url, "username": username,
              "expires_at": expires_at, "expires_in": expires_in}

    def table():
        ctx.success("Successfully logged in as %s" % (username or "token user"))
        if expires_in is None:
            lifetime = "lifetime unknown"
        else:
            lifetime = "expires in " + format_duration(expires_in)
            lifetime += " (%d seconds)" % expires_in if expires_in >= 60 else ""
        ctx.info("Profile '%s' at %s; token %s" % (target, url, lifetime))
    ctx.emit(result, table)


def cmd_auth_login(ctx, args):
    target, url = login_target(ctx, args)
    stored = ctx.store.profile(target) or {}
    username = args.username or stored.get("username") or ask(ctx, "Username: ")
    if not username:
        raise UsageError("a username is needed: use -u/--username")
    password = read_secret(ctx, "password", args.password_stdin, args.password,
                           "ATTUNE_PASSWORD", "--password")
    session = ctx.session(profile=target, api_url=url, use_env=False)
    path, method = login_endpoint(session)
    finish_login(ctx, session, target, url, path, {"login": username, "password": password},
                 method, username)


def cmd_auth_token_login(ctx, args):
    target, url = login_target(ctx, args)
    token = read_secret(ctx, "integration token", args.token_stdin, args.token, None, "--token")
    session = ctx.session(profile=target, api_url=url, use_env=False)
    finish_login(ctx, session, target, url, "/auth/token-login", {"token": token}, "token")


def cmd_auth_logout(ctx, args):
    names = sorted(ctx.store.profiles()) if args.all else [ctx.profile]

    def forget(doc):
        for name in names:
            profile = doc["profiles"].get(name)
            if isinstance(profile, dict):
                for key in TOKEN_KEYS:
                    profile.pop(key, None)

    if ctx.store.exists and any(isinstance(ctx.store.profiles().get(n), dict) for n in names):
        ctx.store.modify(forget)
    for name in ("ATTUNE_API_TOKEN", "ATTUNE_AUTH_TOKEN", "ATTUNE_TOKEN_FILE"):
        if ctx.env.get(name):
            ctx.warn("%s is still set in the environment" % name)
    ctx.emit({"message": "Successfully logged out", "profiles": names},
             lambda: ctx.success("Successfully logged out" + (
                 " of all profiles" if args.all else " (profile '%s')" % names[0])))


def cmd_auth_whoami(ctx, args):
    session = ctx.session()
    if not session.creds.access:
        raise not_logged_in()
    me = envelope_data(session.call("GET", "/auth/me")) or {}
    ctx.emit(me, lambda: ctx.pairs([("Login", me.get("login")), ("Display Name", me.get("display_name")),
                                    ("ID", me.get("id")), ("API Host", session.api_url)],
                                   "Current Identity"))


def token_times(creds, now):
    def left(at):
        return None if at is None else int(at - now)
    return {"access_token_expires_at": creds.access_expires_at,
            "access_token_expires_in": left(creds.access_expires_at),
            "refresh_token_expires_at": creds.refresh_expires_at,
            "refresh_token_expires_in": left(creds.refresh_expires_at)}


def offline_usable(creds, now):
    """A usable token exists without asking the server: a live access token, or a
    refresh token that is not known to be expired on a session not invalidated."""
    if not creds.access:
        return False
    left = creds.access_left(now)
    if left is None or left > 0:
        return True
    return creds.refresh_usable(now) and not creds.invalidated_at


def profile_status(ctx, name, offline, use_env):
    """One profile's status and the exit code it implies: 0 usable, 4 login needed,
    5 server unreachable (6 server error, 1 other API error). Online, the session
    refreshes when due and asks /auth/me who we are."""
    session = ctx.session(profile=name, use_env=use_env)
    code = 0 if offline_usable(session.creds, ctx.now()) else 4
    server = None
    if not offline and session.creds.access:
        try:
            me = envelope_data(session.call("GET", "/auth/me")) or {}
            server, code = {"reachable": True, "login": me.get("login")}, 0
        except AttuneError as e:
            server = {"reachable": not isinstance(e, NetworkError), "error": str(e)}
            code = e.exit_code if e.exit_code in (4, 5, 6) else 1
    creds, now = session.creds, ctx.now()  # after any refresh
    stored = ctx.store.profile(name) or {}
    url, url_source = ctx.api_url_for(name)
    status = {"profile": name, "current": name == ctx.profile, "api_url": url.rstrip("/"),
              "api_url_source": url_source, "username": stored.get("username"),
              "token_source": creds.source if creds.access else None,
              "token_origin": creds.origin if creds.access else None,
              "invalidated_at": epoch(stored.get("invalidated_at")) if creds.source == "file" else None}
    status.update(token_times(creds, now))
    if server is not None:
        status["server"] = server
    status["logged_in"] = code == 0
    return status, code


def status_pairs(status, now):
    def expiry(prefix):
        at = status[prefix + "_expires_at"]
        return "unknown expiry" if at is None else describe_expiry(at, now)

    pairs = [("API URL", "%s (from %s)" % (status["api_url"], status["api_url_source"])),
             ("User", status["username"] or "-"),
             ("Token source", describe_source(status["token_source"], status["token_origin"]))]
    if status["token_source"]:
        pairs.append(("Access token", expiry("access_token")))
        if status["token_source"] == "file" or status["refresh_token_expires_at"] is not None:
            pairs.append(("Refresh token", expiry("refresh_token")))
    if status["invalidated_at"]:
        pairs.append(("Session", "invalidated at %s" % format_time(status["invalidated_at"])))
    server = status.get("server")
    if server:
        pairs.append(("Server", server.get("error") or "ok, logged in as %s" % server.get("login")))
    pairs.append(("Status", "logged in" if status["logged_in"] else "login needed"))
    return pairs


def cmd_auth_status(ctx, args):
    names = sorted(set(ctx.store.profiles()) | {ctx.profile}) if args.all else [ctx.profile]
    results, code = [], 0
    for name in names:
        status, status_code = profile_status(ctx, name, args.offline, use_env=name == ctx.profile)
        results.append(status)
        if status_code and code in (0, 4):
            code = status_code  # network trouble outranks a missing login
    now = ctx.now()

    def table():
        for i, status in enumerate(results):
            if i:
                ctx.out()
            title = "Profile: %s%s" % (status["profile"], " (current)" if status["current"] else "")
            ctx.pairs(status_pairs(status, now), title)

    ctx.emit(results if args.all else results[0], table)
    return code


def cmd_auth_refresh(ctx, args):
    session = ctx.session()
    if not session.creds.access and not session.creds.refresh:
        raise not_logged_in()
    if not session.creds.refresh and session.creds.source != "token_file":
        raise AuthRequired("profile '%s' has no refresh token; run: attune auth login --profile %s"
                           % (session.profile, session.profile))
    session.refresh()
    expires_at = session.creds.access_expires_at
    expires_in = None if expires_at is None else int(expires_at - ctx.now())

    def table():
        ctx.success("Token refreshed successfully")
        ctx.info("New token expires in %s" % ("an unknown time" if expires_in is None
                                              else "%d seconds" % expires_in))

    ctx.emit({"profile": session.profile, "api_url": session.api_url,
              "expires_at": expires_at, "expires_in": expires_in}, table)


def cmd_auth_token(ctx, args):
    session = ctx.session()
    token = session.token(min_ttl=args.min_ttl)
    creds, now = session.creds, ctx.now()
    left = creds.access_left(now)
    if args.min_ttl and left is not None and left < args.min_ttl:
        ctx.warn("the token has %ds left, less than --min-ttl %d: the server issues shorter-lived tokens"
                 % (left, args.min_ttl))
    fmt = args.format or {"json": "json", "yaml": "yaml"}.get(ctx.output, "raw")
    if fmt == "raw":
        ctx.stdout.write(token + "\n")
    elif fmt == "header":
        ctx.stdout.write("Authorization: Bearer %s\n" % token)
    elif fmt == "env":
        from shlex import quote
        ctx.stdout.write("export ATTUNE_API_URL=%s\nexport ATTUNE_API_TOKEN=%s\n"
                         % (quote(session.api_url), quote(token)))
    else:
        profile, profile_source = ctx.profile_source
        url_source = ctx.api_url_for(profile)[1]
        doc = {"token": token, "expires_at": creds.access_expires_at,
               "expires_in": None if left is None else int(left),
               "profile": profile, "profile_source": profile_source,
               "api_url": session.api_url, "api_url_source": url_source,
               "source": creds.source, "source_detail": creds.origin}
        ctx.write_document(to_yaml if fmt == "yaml" else to_json, doc)


# === Commands: config ========================================================

CONFIG_ALIASES = {"output_format": "format", "default_output_format": "format",
                  "current_profile": "profile"}
CONFIG_KEYS = ("api_url", "format", "profile", "description", "ca_bundle")


def config_key(key):
    key = CONFIG_ALIASES.get(key, key)
    if key not in CONFIG_KEYS:
        raise UsageError("unknown key '%s'; keys: %s" % (key, ", ".join(CONFIG_KEYS)))
    return key


def masked(profile, key):
    return "***" if profile.get(key) else None


def profile_view(name, profile):
    """A profile for display: everything but secrets, tokens shown as '***'."""
    view = {"name": name}
    for key, value in profile.items():
        if key in ("auth_token", "refresh_token"):
            view[key] = masked(profile, key)
        elif not secret_key(key) or key.endswith("_expires_at"):
            view[key] = value
    return view


def cmd_config_list(ctx, args):
    name = ctx.profile
    profile = ctx.store.profile(name) or {}
    data = {"config_file": ctx.config_path, "current_profile": ctx.store.current_profile() or DEFAULT_PROFILE,
            "profile": name, "format": ctx.store.load().get("format") or "table",
            "api_url": ctx.api_url_for(name)[0]}
    for key in ("description", "ca_bundle", "username", "auth_method"):
        data[key] = profile.get(key)
    data["auth_token"] = masked(profile, "auth_token")
    data["refresh_token"] = masked(profile, "refresh_token")
    ctx.emit(data, lambda: ctx.pairs([(k, "(not set)" if v is None else v) for k, v in data.items()],
                                     "Configuration"))


def config_value(ctx, key):
    if key == "profile":
        return ctx.profile
    if key == "format":
        return ctx.store.load().get("format") or "table"
    if key == "api_url":
        return ctx.api_url_for(ctx.profile)[0]
    return (ctx.store.profile(ctx.profile) or {}).get(key)


def cmd_config_get(ctx, args):
    key = config_key(args.key)
    value = config_value(ctx, key)
    ctx.emit({"key": key, "value": value}, lambda: ctx.out("" if value is None else str(value)))


def cmd_config_set(ctx, args):
    key, value = config_key(args.key), args.value
    if key == "format":
        value = value.lower()
    if key == "format" and value not in OUTPUT_FORMATS:
        raise UsageError("format must be one of: %s" % ", ".join(OUTPUT_FORMATS))
    if key == "profile":
        ctx.require_profile(value)
    if key == "api_url" and not value.startswith(("http://", "https://")):
        raise UsageError("api_url must start with http:// or https://")
    name = ctx.profile

    def change(doc):
        if key == "format":
            doc["format"] = value
        elif key == "profile":
            doc["current_profile"] = value
        else:
            profile = doc["profiles"].setdefault(name, {})
            profile.setdefault("api_url", DEFAULT_API_URL)
            if value == "" and key != "api_url":
                profile.pop(key, None)
            else:
                profile[key] = value

    ctx.store.modify(change)
    ctx.emit({"key": key, "value": value}, lambda: ctx.success("Set %s = %s" % (key, value)))


def cmd_config_path(ctx, args):
    ctx.emit({"path": ctx.config_path, "source": ctx.config_source, "exists": ctx.store.exists
              or os.path.exists(ctx.config_path)}, lambda: ctx.out(ctx.config_path))


def cmd_config_profiles(ctx, args):
    current = ctx.store.current_profile() or DEFAULT_PROFILE
    profiles = dict(ctx.store.profiles())
    profiles.setdefault(DEFAULT_PROFILE, {"api_url": DEFAULT_API_URL})
    rows = []
    for name in sorted(profiles):
        profile = profiles[name] if isinstance(profiles[name], dict) else {}
        rows.append({"name": name, "current": name == current, "api_url": profile.get("api_url"),
                     "username": profile.get("username"), "description": profile.get("description"),
                     "logged_in": bool(profile.get("auth_token"))})
    ctx.emit(rows, lambda: ctx.table(
        ["", "Name", "API URL", "User", "Description"],
        [["*" if r["current"] else "", r["name"], r["api_url"], r["username"], r["description"]]
         for r in rows]))


def cmd_config_current(ctx, args):
    name, source = ctx.profile_source
    ctx.emit({"profile": name, "source": source}, lambda: ctx.out(name))


def cmd_config_use(ctx, args):
    ctx.require_profile(args.name)

    def change(doc):
        doc["current_profile"] = args.name
        if args.name == DEFAULT_PROFILE:
            doc["profiles"].setdefault(DEFAULT_PROFILE, {"api_url": DEFAULT_API_URL})

    ctx.store.modify(change)
    ctx.emit({"current_profile": args.name},
             lambda: ctx.success("Switched to profile '%s'" % args.name))


def cmd_config_add_profile(ctx, args):
    if not args.api_url:
        raise UsageError("config add-profile needs --api-url URL")
    if not args.api_url.startswith(("http://", "https://")):
        raise UsageError("--api-url must start with http:// or https://")
    existed = ctx.store.profile(args.name) is not None

    def change(doc):
        profile = doc["profiles"].setdefault(args.name, {})
        profile["api_url"] = args.api_url.rstrip("/")
        for key in ("description", "ca_bundle"):
            value = getattr(args, key)
            if value is not None:
                profile[key] = value
        return profile_view(args.name, profile)

    view = ctx.store.modify(change)
    ctx.emit(view, lambda: ctx.success("Profile '%s' %s" % (args.name, "updated" if existed else "added")))


def cmd_config_show_profile(ctx, args):
    ctx.require_profile(args.name)
    profile = ctx.store.profile(args.name) or {"api_url": DEFAULT_API_URL}
    view = profile_view(args.name, profile)
    labels = {"api_url": "API URL", "auth_token": "Auth Token", "refresh_token": "Refresh Token"}

    def table():
        now = ctx.now()
        pairs = []
        for key, value in view.items():
            if key == "name":
                continue
            if key.endswith(("_expires_at", "invalidated_at")) and epoch(value) is not None:
                value = describe_expiry(value, now) if key.endswith("_expires_at") else format_time(value)
            pairs.append((labels.get(key, key.replace("_", " ").title()), "" if value is None else value))
        ctx.pairs(pairs, "Profile: %s" % args.name)

    ctx.emit(view, table)


def cmd_config_remove_profile(ctx, args):
    name = args.name
    if name not in ctx.store.profiles():  # a malformed entry can still be removed
        ctx.require_profile(name)
    current = ctx.store.current_profile() or DEFAULT_PROFILE
    if name == current:
        raise AttuneError("Cannot remove active profile '%s'. Switch to another profile first." % name)
    if name == DEFAULT_PROFILE:
        raise AttuneError("Cannot remove the default profile")
    ctx.store.modify(lambda doc: doc["profiles"].pop(name, None))
    ctx.emit({"removed": name}, lambda: ctx.success("Profile '%s' removed" % name))


# === Argument parser =========================================================

def add_global_args(parser, top):
    """Global options, accepted before or after the subcommand. Below the top level
    their defaults are SUPPRESS, so a value given earlier is not overwritten."""
    import argparse

    def default(value):
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("global options")
    group.add_argument("-p", "--profile", metavar="NAME", default=default(None),
                       help="profile to use for this run (never changes the current profile)")
    group.add_argument("--api-url", metavar="URL", default=default(None), help="API URL for this run")
    group.add_argument("--config", metavar="FILE", default=default(None), help="credential file")
    group.add_argument("--output", choices=OUTPUT_FORMATS, default=default(None),
                       help="output format (default: table)")
    group.add_argument("-j", "--json", action="store_true", default=default(False), help="JSON output")
    group.add_argument("-y", "--yaml", action="store_true", default=default(False), help="YAML output")
    group.add_argument("-v", "--verbose", action="count", default=default(0),
                       help="log HTTP requests and token decisions on stderr (secrets redacted)")
    group.add_argument("--ca-bundle", metavar="FILE", default=default(None),
                       help="PEM file of extra CA certificates to trust")
    group.add_argument("--insecure", action="store_true", default=default(False),
                       help="do not verify TLS certificates (warns on every run)")
    group.add_argument("--version", action="version",
                       version="attune.py %s (python %d.%d)" % ((__version__,) + tuple(sys.version_info[:2])))


def help_epilog():
    lines = ["exit codes:"]
    lines += ["  %-4d %s" % pair for pair in EXIT_CODES]
    lines += ["", "environment:"]
    lines += ["  %-22s %s" % pair for pair in ENVIRONMENT]
    return "\n".join(lines)


class Commands:
    """Adds subcommands that all take the global options and remember their path,
    so the lock file can say 'attune auth login' without any argument values."""

    def __init__(self, parser, path):
        self.path = path
        self.sub = parser.add_subparsers(dest="_".join(["cmd"] + path), metavar="COMMAND")
        self.sub.required = True  # add_subparsers(required=) is 3.7+

    def add(self, name, help, func=None, **defaults):
        import argparse
        p = self.sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        add_global_args(p, top=False)
        p.set_defaults(command_path=self.path + [name], **defaults)
        if func is not None:
            p.set_defaults(func=func)
        return p

    def group(self, name, help):
        return Commands(self.add(name, help), self.path + [name])


def add_auth_commands(commands):
    auth = commands.group("auth", "log in and out, inspect and print tokens")
    p = auth.add("login", "log in with a username and password", cmd_auth_login, creates_profile=True)
    p.add_argument("-u", "--username", help="login name (default: the profile's stored username)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--password", metavar="P", help="password (visible in the process list: avoid)")
    p.add_argument("--url", help="API URL to log in to (stored in the profile)")
    p.add_argument("--save-profile", metavar="NAME", help="store the session in this profile")

    p = auth.add("token-login", "log in with an integration token", cmd_auth_token_login,
                 creates_profile=True)
    p.add_argument("--token-stdin", action="store_true", help="read the token from stdin")
    p.add_argument("--token", metavar="T", help="integration token (visible in the process list)")
    p.add_argument("--url", help="API URL to log in to (stored in the profile)")
    p.add_argument("--save-profile", metavar="NAME", help="store the session in this profile")

    p = auth.add("logout", "forget the stored tokens (the server keeps no session)", cmd_auth_logout)
    p.add_argument("--all", action="store_true", help="log out of every profile")

    auth.add("whoami", "show the identity the server sees", cmd_auth_whoami)

    p = auth.add("status", "show each profile's login state; exit 0 only when usable", cmd_auth_status)
    p.add_argument("--offline", action="store_true", help="do not contact the server")
    p.add_argument("--all", action="store_true", help="every profile in the credential file")

    auth.add("refresh", "refresh the access token now", cmd_auth_refresh)

    p = auth.add("token", "print the access token that would be used", cmd_auth_token)
    p.add_argument("--min-ttl", type=int, default=0, metavar="SECONDS",
                   help="refresh first unless the token has at least this long left")
    p.add_argument("--format", choices=("raw", "json", "env", "header"),
                   help="raw (default), json, env (shell exports) or header")


def add_config_commands(commands):
    config = commands.group("config", "manage profiles and settings in the credential file")
    config.add("list", "show the settings in effect (tokens masked)", cmd_config_list)
    p = config.add("get", "print one setting", cmd_config_get)
    p.add_argument("key", help="one of: " + ", ".join(CONFIG_KEYS))
    p = config.add("set", "change one setting", cmd_config_set)
    p.add_argument("key", help="one of: " + ", ".join(CONFIG_KEYS))
    p.add_argument("value")
    config.add("path", "print the credential file path", cmd_config_path)
    config.add("profiles", "list profiles, current marked", cmd_config_profiles)
    config.add("current", "print the profile in effect", cmd_config_current)
    p = config.add("use", "make a profile the current one", cmd_config_use)
    p.add_argument("name")
    # --api-url (required here) and --ca-bundle are the global options of the same names
    p = config.add("add-profile", "add a profile, or update its settings (--api-url URL "
                   "[--description D] [--ca-bundle FILE])", cmd_config_add_profile)
    p.add_argument("name")
    p.add_argument("--description")
    p = config.add("show-profile", "show one profile (tokens masked)", cmd_config_show_profile)
    p.add_argument("name")
    p = config.add("remove-profile", "remove a profile (not the current one)", cmd_config_remove_profile)
    p.add_argument("name")


def build_parser():
    import argparse
    parser = argparse.ArgumentParser(
        prog="attune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Command-line client for the Attune automation platform.",
        epilog=help_epilog())
    add_global_args(parser, top=True)
    commands = Commands(parser, [])
    add_auth_commands(commands)
    add_config_commands(commands)
    return parser


# === Main ====================================================================

def silence_stdout():
    """After a broken pipe, point stdout at devnull so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv=None, environ=None, clock=None):
    """Run one command; return its exit code. environ and clock let tests stand in."""
    argv = sys.argv[1:] if argv is None else list(argv)
    env = os.environ if environ is None else environ
    try:
        args = build_parser().parse_args(argv)
        ctx = Context(args, env, clock)
        code = args.func(ctx, args) or 0
        sys.stdout.flush()  # a closed pipe shows up here, inside the handlers below
        return code
    except AttuneError as e:
        sys.stdout.flush()
        write_text(sys.stderr, "attune: error: %s\n" % e)
        return e.exit_code
    except KeyboardInterrupt:
        write_text(sys.stderr, "\nattune: interrupted\n")
        return 130
    except BrokenPipeError:  # the reader went away (`| head -1`): nothing left to say
        silence_stdout()
        return 0


if __name__ == "__main__":
    sys.exit(main())
