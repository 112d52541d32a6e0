#!/usr/bin/env python3
"""attune.py: a one-file command-line client for the Attune automation platform.

Copy it onto any server or container and run it with the system python3
(CPython 3.6 to 3.13, or PyPy 3); it needs nothing outside the standard library.

Credentials live in one JSON file (mode 0600) holding named profiles. Access
tokens are refreshed shortly before they expire and once more after a 401, and
this stays correct when many copies of the script run at the same moment: every
write is a read-modify-write under a lock file, and every refresh goes through
one compare-and-refresh function.

Start-up is kept short by importing late: `auth token` with a fresh token, `--help`
and `--version` import only built-in modules (no json, re, argparse or urllib).
Two layers: every section above "# === Output" is the kernel (credential file, lock,
tokens, transport, session, lists, and session() for `import attune`): it returns or raises
and never prints, prompts or exits (test_attune.py's LayerTests check it). From "Output" on
is the command line, the kernel's first user; main() alone turns errors into exit codes.
Table of contents: grep -n '^# ===' attune.py
"""

import binascii
import errno
import io  # loaded by the interpreter before any script: free
import os
import stat
import sys
import time

__version__ = "0.1.0"

# What `import attune` offers Python code (the README's "From Python"); everything else in
# this file is the command line's and may change.
__all__ = ["session", "Session", "AttuneError", "UsageError", "ConfigError", "AuthError", "NetworkError",
           "ApiError", "ServerError", "main", "__version__"]

# === Compatibility ===========================================================
# Each shim says why it exists, so it can go when the floor rises.


WINDOWS = os.name == "nt"


class LazyModule:
    """A module imported on first use. json and argparse import the regular-expression
    engine, which costs more than all of `auth token` with a fresh token; most
    commands never lock, so fcntl waits too."""

    def __init__(self, name):
        self.name = name

    def __getattr__(self, attr):
        module = __import__(self.name)
        globals()[self.name] = module  # later uses go straight to the module
        return getattr(module, attr)


json = LazyModule("json")
argparse = LazyModule("argparse")

# Locks: fcntl on POSIX, msvcrt on Windows; None means "not on this platform".
fcntl = None if WINDOWS else LazyModule("fcntl")
msvcrt = LazyModule("msvcrt") if WINDOWS else None


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

DEFAULT_API_URL = "http://localhost:8080"
DEFAULT_PROFILE = "default"
FILE_VERSION = 1                 # credential file schema this script writes
LOCK_TIMEOUT = 30.0              # seconds; ATTUNE_LOCK_TIMEOUT
HTTP_TIMEOUT = 60.0              # seconds; ATTUNE_TIMEOUT
STILL_USABLE = 30                # an old token with more left survives a failed refresh
RETRY_DELAYS = (0.25, 0.75)      # idempotent requests: two retries
RETRY_STATUSES = (502, 503, 504)
IDEMPOTENT = ("GET", "HEAD")     # the only requests sent again once they may have reached the server
ANSWER_LIMIT = 32 * 1024 * 1024  # bytes of an API answer read into memory (a page of results)
ERROR_LIMIT = 1024 * 1024        # bytes of an error answer (only its message is shown)
EVENT_LIMIT = 4 * 1024 * 1024    # bytes of one server-sent event (a log chunk)
OUTPUT_FORMATS = ("table", "json", "yaml")
TOKEN_VARIABLES = ("ATTUNE_SENSOR_TOKEN_STATE_PATH", "ATTUNE_API_TOKEN", "ATTUNE_AUTH_TOKEN",
                   "ATTUNE_TOKEN_FILE")  # in precedence order
EXPIRY_VARIABLES = ("ATTUNE_API_TOKEN_EXPIRES_AT", "ATTUNE_SENSOR_TOKEN_EXPIRES_AT")  # the second is legacy
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
    (126, "auth exec: the command cannot be run"),
    (127, "auth exec: the command was not found"),
    (130, "interrupted"),
    (129, "hung up (SIGHUP), after cleaning up"),
    (143, "terminated (SIGTERM), after cleaning up"),
)

ENVIRONMENT = (
    ("ATTUNE_CONFIG", "credential file (default $XDG_CONFIG_HOME/attune/credentials.json)"),
    ("ATTUNE_PROFILE", "profile to use, unless -p/--profile is given"),
    ("ATTUNE_API_URL", "API URL, unless --api-url is given"),
    ("ATTUNE_API_TOKEN", "access token to use instead of the stored one (alias ATTUNE_AUTH_TOKEN)"),
    ("ATTUNE_TOKEN_FILE", "file holding an access token, re-read on every run"),
    ("ATTUNE_SENSOR_TOKEN_STATE_PATH", "inside Attune: a sensor's token state file, read per request"),
    ("ATTUNE_API_TOKEN_EXPIRES_AT", "expiry of ATTUNE_API_TOKEN: RFC 3339 or epoch seconds"),
    ("ATTUNE_REFRESH_TOKEN", "refresh token paired with ATTUNE_API_TOKEN (never stored)"),
    ("ATTUNE_KEEP_FRESH", "set by auth exec --keep-fresh: its token file outranks ATTUNE_API_TOKEN"),
    ("ATTUNE_LOGIN", "login name for auth login, unless -u/--username is given"),
    ("ATTUNE_PASSWORD", "password for auth login when no terminal is available"),
    ("ATTUNE_CA_BUNDLE", "extra CA certificates (PEM) to trust, like --ca-bundle"),
    ("ATTUNE_TIMEOUT", "seconds each HTTP request may take, start to end (default 60)"),
    ("ATTUNE_NOTIFIER_WS_URL", "the notifier's WebSocket URL for watches, unless --notifier-url is given"),
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


class AuthError(AttuneError):
    exit_code = 4


class NetworkError(AttuneError):
    """kind: 'refused', 'dns' and 'reset' may heal by themselves (retryable); 'timeout',
    'tls' and 'other' do not."""
    exit_code = 5

    def __init__(self, message, kind="other"):
        AttuneError.__init__(self, message)
        self.kind = kind

    @property
    def retryable(self):
        return self.kind in ("refused", "dns", "reset")


class ApiError(AttuneError):
    """The server answered with an error status (exit 1)."""

    def __init__(self, message, status=None):
        AttuneError.__init__(self, message)
        self.status = status


class ServerError(ApiError):
    exit_code = 6


class ExitWith(AttuneError):
    """An error with its own exit code (auth exec: 126, 127)."""

    def __init__(self, message, exit_code):
        AttuneError.__init__(self, message)
        self.exit_code = exit_code


class WebSocketError(Exception):
    """The notifier's WebSocket misbehaved or closed; polling takes over."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: raised wherever the process was, as Ctrl+C raises
    KeyboardInterrupt, so that every finally block runs (temp files removed, the lock
    released, the terminal restored) before main() exits with 128 + the signal number."""

    def __init__(self, signum):
        BaseException.__init__(self, signum)
        self.signum = signum


class ExitSignals:
    """SIGTERM and SIGHUP as Terminated, for one run. Armed by the first thing that would
    leave something behind (a temp file, the lock, the terminal's mode), so that `auth
    token` with a fresh token never pays for importing signal (and enum); main() disarms.
    A signal that is ignored stays ignored (nohup); only the main thread can set handlers.
    Outside a main() run (attune imported as a library) it sets none."""
    NAMES = ("SIGTERM", "SIGHUP")

    def __init__(self):
        self.previous = {}
        self.running = False  # inside main()

    def arm(self):
        if self.previous or not self.running:
            return
        import signal
        for name in self.NAMES:
            signum = getattr(signal, name, None)
            try:
                if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
                    self.previous[signum] = signal.signal(signum, self.terminate)
            except ValueError:  # not the main thread
                return

    def disarm(self):
        self.running = False
        if self.previous:
            import signal
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)
            self.previous = {}

    @staticmethod
    def terminate(signum, frame):
        raise Terminated(signum)


EXIT_SIGNALS = ExitSignals()  # process state: the handlers main() arms for its run and puts back after it


def session_expired(profile):
    return AuthError("Session for profile '%s' has expired; run: attune auth login --profile %s"
                     % (profile, profile))


def not_logged_in():
    return AuthError("Not logged in. Use 'attune auth login'")


# === Input from outside: URLs, tokens, names, numbers, files, text ===========
# Everything from outside is untrusted: each kind of input is accepted in one place, so a hostile
# value is refused the same way whichever flag, variable, file or answer brought it.

TOKEN_FILE_LIMIT = 64 * 1024            # bytes; a token file is one line
CREDENTIAL_FILE_LIMIT = 16 * 1024 * 1024
DATA_FILE_LIMIT = 64 * 1024 * 1024      # --data @FILE, pack.yaml, CA bundles
ARCHIVE_LIMIT = 512 * 1024 * 1024       # pack upload of a .tar.gz
MAX_SECONDS = 10 * 365 * 86400          # any duration beyond ten years is a typo
MAX_ID = 2 ** 63 - 1                    # ids are BIGINT on the server
URL_LIMIT = 2048
PROFILE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")
DIGITS = frozenset("0123456789")


def quoted(text, limit=80):
    """A value from outside as a message quotes it: repr'd, cut to limit, terminal-safe."""
    text = SECRETS.mask(text)
    return terminal_safe(repr(text[:limit]) + ("..." if len(text) > limit else ""))


def odd_character(text):
    """A description of the first character of text that is not printable ASCII, or None."""
    for position, char in enumerate(text, 1):
        if not " " < char < "\x7f":
            kind = "a control character" if is_control(char) else "a space" if char.isspace() \
                else "a non-ASCII character"
            return "%s at position %d" % (kind, position)
    return None


class KnownSecrets:
    """Every secret this run holds: each token it reads or receives (they all pass
    check_token), the password it sends, the device codes of an SSO login. The output layer
    masks each of them as *** wherever it appears, whatever carries it: a server's error
    message that echoes a password, a -v log, a JSON document, an action's log. Secrets
    shorter than MIN_LENGTH are left alone (a password 'admin' is also a user name). `auth
    token` and a freshly created integration token are the outputs meant to hold one."""
    MIN_LENGTH = 6

    def __init__(self):
        self.values = set()

    def add(self, value):
        if isinstance(value, str) and len(value.strip()) >= self.MIN_LENGTH:
            self.values.add(value.strip())
        return value

    def mask(self, text):
        for value in sorted(self.values, key=len, reverse=True) if self.values else ():
            if value in text:
                text = text.replace(value, "***")
        return text

    def mask_data(self, data):
        """A copy of JSON-shaped data with the secrets masked in every string."""
        if isinstance(data, str):
            return self.mask(data)
        if isinstance(data, dict):
            return {self.mask_data(k): self.mask_data(v) for k, v in data.items()}
        if isinstance(data, list):
            return list(map(self.mask_data, data))
        return data


SECRETS = KnownSecrets()  # process state: the one registry of secrets met; main() empties it when a run starts


def check_token(value, where, error=None):
    """A token from `where` (environment, file, answer) without surrounding whitespace;
    a token holding anything but printable ASCII is refused. The message never holds it.
    Every token attune.py will send or store passes here, and is known as a secret from then."""
    error = error or ConfigError
    if not isinstance(value, str):
        raise error("the token in %s is not text" % where)
    token = value.strip()
    if not token:
        raise error("the token in %s is empty" % where)
    problem = odd_character(token)
    if problem:
        raise error("the token in %s is malformed (%s); it was not used" % (where, problem))
    return SECRETS.add(token)


def check_api_url(value, where, what="API URL", schemes=("http", "https")):
    """An API URL from `where` (--api-url, ATTUNE_API_URL, profile 'x', --url): http or
    https, a host, a port in range, nothing else odd; without a trailing slash. Checked
    by hand (urllib.parse would bring re), so a bad one is exit 3, never a traceback.
    The notifier's URL is checked the same way, with its own schemes."""
    if not isinstance(value, str):
        raise ConfigError("the %s from %s is not text" % (what, where))
    url = value.strip()
    scheme, sep, rest = url.partition("://")
    authority = rest.split("/", 1)[0]
    shown = url if "@" not in authority else scheme + "://***@" + rest.partition("@")[2]  # no password

    def bad(why):
        return ConfigError("the %s from %s is not usable: %s (%s)" % (what, where, why, quoted(shown)))

    if len(url) > URL_LIMIT:
        raise bad("longer than %d characters" % URL_LIMIT)
    problem = odd_character(url)
    if problem:
        raise bad("it holds %s" % problem)
    if not sep or scheme.lower() not in schemes:
        raise bad("it must start with %s" % " or ".join(s + "://" for s in schemes))
    if "?" in rest or "#" in rest:
        raise bad("a query or fragment has no place in it")
    if "@" in authority:
        raise bad("it holds user:password@, and Attune has no basic auth; log in instead")
    if authority.startswith("["):
        host, bracket, port = authority[1:].partition("]")
        if not bracket or not host or not set(host) <= IPV6_CHARS or ":" not in host:
            raise bad("the IPv6 address in brackets is malformed")
        if port and not port.startswith(":"):
            raise bad("only a port may follow the IPv6 address")
        port = port[1:]
    else:
        host, _, port = authority.partition(":")
        if not host:
            raise bad("there is no host")
        if not set(host) <= HOST_CHARS or len(host) > 253 or \
                any(not 0 < len(label) <= 63 for label in host.rstrip(".").split(".")):
            raise bad("the host name is malformed")
    if authority.endswith(":") or (port and not (set(port) <= DIGITS and 0 < int(port) < 65536)):
        raise bad("the port must be a number from 1 to 65535")
    return url.rstrip("/")


def check_profile_name(name):
    """A name for a new profile: [A-Za-z0-9][A-Za-z0-9._-]{0,63} (exit 2 otherwise)."""
    if not (0 < len(name) <= 64 and set(name) <= PROFILE_NAME_CHARS and name[0] not in "._-"):
        raise UsageError("a profile name is 1 to 64 letters, digits, '.', '_' or '-', starting with "
                         "a letter or digit; %s is not" % quoted(name))
    return name


def parse_number(text, low, high, integer, seconds=False):
    """text as an int (ASCII digits, optional sign) or a finite float in [low, high];
    None when it is not one. int() alone would take '٣', '1_0' and ' 5 '. seconds: a
    duration, also with a unit (30s, 5m, 1h), in seconds."""
    text = text if isinstance(text, str) else ""
    scale = dict(DURATION_UNITS).get(text[-1:].lower(), 1) if seconds else 1  # the units format_duration writes
    if scale != 1 or (seconds and text[-1:].lower() == "s"):
        text = text[:-1]
    body = text[1:] if text[:1] in "+-" else text
    if len(body) > 400:  # beyond any range here; int() refuses over 4,300 digits on 3.11+
        return None
    if integer:
        if not body or not set(body) <= DIGITS:
            return None
        value = int(text)
    else:
        if not body or not set(body.lower()) <= DIGITS | {".", "e", "+", "-"} or not set(body) & DIGITS:
            return None
        try:
            value = float(text)
        except ValueError:
            return None
    value *= scale
    return value if low <= value <= high else None


class Number:
    """An argparse type: a whole or decimal number from low to high (exit 2 otherwise)."""
    seconds = False

    def __init__(self, low, high=MAX_SECONDS, integer=True):
        self.low, self.high, self.integer = low, high, integer

    def __call__(self, text):
        value = parse_number(text, self.low, self.high, self.integer, self.seconds)
        if value is None:
            raise argparse.ArgumentTypeError("expected %s from %s to %s, not %s" % (
                self.kind(), self.low, self.high, quoted(text)))
        return value

    def kind(self):
        return "a whole number" if self.integer else "a number"


class Seconds(Number):
    """A Number of seconds, also written with a unit: 30, 30s, 5m, 1h."""
    seconds = True

    def kind(self):
        return "seconds (30, 30s, 5m or 1h)"


ID_NUMBER = Number(1, MAX_ID)        # an id: a whole number from 1
WHOLE_NUMBER = Number(0, MAX_ID)     # a count, an offset, a generation id (from 0)


def env_seconds(env, name, default, low, high=MAX_SECONDS):
    """Seconds from the environment (30, 30s, 5m, 1h); a bad value is a configuration error (exit 3)."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = parse_number(raw.strip(), low, high, False, seconds=True)
    if value is None:
        raise ConfigError("%s must be seconds (30, 30s, 5m or 1h) from %s to %s, not %s" % (
            name, low, high, quoted(raw)))
    return value


def file_kind(mode):
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular_file(path):
    """(descriptor, stat) of path opened for reading, refused at once (OSError EINVAL, the
    descriptor closed) unless it is a regular file: opened non-blocking and checked with
    fstat, so a FIFO, device, socket or directory cannot make attune.py wait."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "it is %s, not a regular file" % file_kind(st.st_mode))
    return fd, st


def read_regular_file(path, limit):
    """(bytes, stat) of a regular file of at most limit bytes. A FIFO, device, socket or
    directory is refused at once (opened non-blocking, checked with fstat), so nothing
    from outside can make attune.py wait forever or read without end. Raises OSError:
    FileNotFoundError as usual, EINVAL or EFBIG with a readable strerror."""
    fd, st = open_regular_file(path)
    try:
        if st.st_size > limit:
            raise OSError(errno.EFBIG, "it is larger than %d KiB" % (limit // 1024))
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise OSError(errno.EFBIG, "it is larger than %d KiB" % (limit // 1024))
        return b"".join(chunks), st
    finally:
        os.close(fd)


def is_control(c):
    """C0 and C1 controls (ESC, BEL, CR, the 8-bit CSI), DEL and the bidirectional overrides."""
    return c < " " or "\x7f" <= c <= "\x9f" or "\u202a" <= c <= "\u202e" or "\u2066" <= c <= "\u2069"


def escape_control(c):
    return {"\r": "\\r", "\n": "\\n", "\t": "\\t"}.get(c) or ("\\x%02x" % ord(c) if ord(c) < 256 else "\\u%04x" % ord(c))


def terminal_safe(text, keep="\n\t"):
    """text with every control character outside keep written as a visible escape (\\x1b,
    \\u202e): whatever a server, a file or the environment holds cannot move the cursor,
    retitle, clear or write to the clipboard of the terminal it is printed on."""
    if text.isprintable():
        return text
    return "".join(escape_control(c) if c not in keep and is_control(c) else c for c in text)


def as_given(text):
    """text as the characters of the bytes the user gave. Read through a C locale (LANG=C
    on Python 3.6, PyPy, or a newer Python with locale coercion off), argv, the environment
    and stdin hold each byte of a non-ASCII character as a lone surrogate ('ä' is
    '\\udcc3\\udca4'); sent as it is, the server would get garbage. Bytes that are not
    UTF-8 are a usage error: JSON can only carry text."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        raise UsageError("%s is not UTF-8 text; attune.py sends only what it can send as given" % quoted(text))


def as_given_data(data):
    """as_given for every string of JSON-shaped data on its way to the server."""
    if isinstance(data, str):
        return as_given(data)
    if isinstance(data, dict):
        return {as_given_data(k): as_given_data(v) for k, v in data.items()}
    if isinstance(data, list):
        return list(map(as_given_data, data))
    return data


# === JSON and time ===========================================================

def refuse_constant(name):
    """parse_constant for json.loads: NaN and Infinity are not JSON, whatever Python allows."""
    raise ValueError("%s is not valid JSON" % name)


def json_loads(text):
    """Strict JSON through the C parser: for server answers and JSON given on the command
    line, where its speed matters and json's import cost is paid anyway (urllib). Nesting
    too deep for the parser is a ValueError like any other bad JSON, never a traceback."""
    try:
        return json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply")


# parse_json reads the credential file and JWT payloads, on every run: the json module
# would import the regular-expression engine, which costs more than the whole of
# `auth token` with a fresh token. It accepts exactly what json_loads accepts (RFC 8259
# with Python's handling of duplicate keys and lone surrogates); test_attune.py checks
# the two against each other.
JSON_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
JSON_SPACE = " \t\n\r"
JSON_NUMBER = frozenset("0123456789+-.eE")
JSON_DEPTH = 200  # two frames a level: well inside the recursion limit


LARGE_JSON = 128 * 1024  # characters: past this json's C parser is quicker, import and all


def read_json(text):
    """The value of a JSON document read on every run (the credential file): by hand while
    it is small (json's import costs more than the whole of `auth token`), by json's C
    parser once it is large (thousands of profiles: a 4 MB file takes the hand parser 0.2 s,
    the C parser 0.02 s). The two accept the same documents; test_attune.py checks it."""
    return json_loads(text) if len(text) > LARGE_JSON else parse_json(text)


def parse_json(text):
    """The value of a JSON document; ValueError saying where it is wrong."""
    value, end = json_value(text, json_space(text, 0), 0)
    end = json_space(text, end)
    if end != len(text):
        raise json_error(text, end, "extra data")
    return value


def json_error(text, pos, what):
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return ValueError("%s: line %d column %d (char %d)" % (what, line, column, pos))


def json_space(text, pos):
    while pos < len(text) and text[pos] in JSON_SPACE:
        pos += 1
    return pos


def json_value(text, pos, depth):
    """(value, end) of the JSON value starting at pos."""
    char = text[pos:pos + 1]
    if char == '"':
        return json_string(text, pos + 1)
    if char == "{" or char == "[":
        if depth >= JSON_DEPTH:
            raise json_error(text, pos, "nested too deeply")
        return json_container(text, pos, depth + 1)
    for word, value in (("true", True), ("false", False), ("null", None)):
        if text.startswith(word, pos):
            return value, pos + len(word)
    end = pos
    while end < len(text) and text[end] in JSON_NUMBER:
        end += 1
    number = text[pos:end]
    if not json_number_ok(number):
        raise json_error(text, pos, "expecting value")
    return (int(number) if number.lstrip("-").isdigit() else float(number)), end


def json_number_ok(number):
    """-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?"""
    mantissa, e, exponent = number.replace("E", "e").partition("e")
    whole, dot, fraction = (mantissa[1:] if mantissa.startswith("-") else mantissa).partition(".")
    if exponent[:1] in ("+", "-"):
        exponent = exponent[1:]
    return (whole.isdigit() and (whole == "0" or whole[0] != "0") and
            (not dot or fraction.isdigit()) and (not e or exponent.isdigit()))


def json_container(text, pos, depth):
    """(dict or list, end) of the object or array whose bracket is at pos."""
    is_object = text[pos] == "{"
    close = "}" if is_object else "]"
    result = {} if is_object else []
    pos = json_space(text, pos + 1)
    if text[pos:pos + 1] == close:
        return result, pos + 1
    while True:
        if is_object:
            if text[pos:pos + 1] != '"':
                raise json_error(text, pos, "expecting property name enclosed in double quotes")
            key, pos = json_string(text, pos + 1)
            pos = json_space(text, pos)
            if text[pos:pos + 1] != ":":
                raise json_error(text, pos, "expecting ':' delimiter")
            value, pos = json_value(text, json_space(text, pos + 1), depth)
            result[key] = value
        else:
            value, pos = json_value(text, pos, depth)
            result.append(value)
        pos = json_space(text, pos)
        char = text[pos:pos + 1]
        if char == close:
            return result, pos + 1
        if char != ",":
            raise json_error(text, pos, "expecting ',' delimiter")
        pos = json_space(text, pos + 1)


def json_string(text, pos):
    """(string, end) of the string whose opening quote is just before pos."""
    start, parts = pos - 1, []
    while True:
        end = text.find('"', pos)
        if end < 0:
            raise json_error(text, start, "unterminated string")
        chunk = text[pos:end]
        escape = chunk.find("\\")
        plain = chunk if escape < 0 else chunk[:escape]
        if plain and min(plain) < " ":
            bad = next(i for i, c in enumerate(plain) if c < " ")
            raise json_error(text, pos + bad, "invalid control character")
        parts.append(plain)
        if escape < 0:
            return "".join(parts), end + 1
        pos += escape + 1
        code = text[pos:pos + 1]
        if code == "u":
            char, pos = json_unicode(text, pos + 1)
            parts.append(char)
        elif code in JSON_ESCAPES and code:
            parts.append(JSON_ESCAPES[code])
            pos += 1
        else:
            raise json_error(text, pos - 1, "invalid \\escape")


def json_unicode(text, pos):
    """(character, end) of the 4 hex digits at pos (a surrogate pair when one follows)."""
    code = json_hex4(text, pos)
    pos += 4
    if 0xd800 <= code < 0xdc00 and text.startswith("\\u", pos):
        low = json_hex4(text, pos + 2)
        if 0xdc00 <= low < 0xe000:
            return chr(0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00)), pos + 6
    return chr(code), pos


def json_hex4(text, pos):
    digits = text[pos:pos + 4]
    if len(digits) != 4 or not all(c in "0123456789abcdefABCDEF" for c in digits):
        raise json_error(text, pos - 2, "invalid \\uXXXX escape")
    return int(digits, 16)


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


# Expiry (see Tokens in the README): the one place that decides what a stored
# time means, when a token is due for refresh and whether it is still usable.

MARGIN_MIN, MARGIN_MAX = 30, 300  # proactive refresh margin bounds, seconds


def epoch(value):
    """A stored time or JWT claim as integer epoch seconds, or None when it is not a sane number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value != value or not -1e11 < value < 1e11:  # NaN or absurd
        return None
    return int(value)


def days_from_civil(year, month, day):
    """Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    return era * 146097 + year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year - 719468


def is_digits(text):
    """Only the ASCII digits: str.isdigit() takes '١٢' (Arabic-Indic) and '²' too."""
    return bool(text) and all("0" <= c <= "9" for c in text)


def time_epoch(value):
    """An expiry the platform hands over as epoch seconds: a number, a string of digits, or an
    RFC 3339 time ('2026-12-31T00:00:00Z', '...T01:30:00.5+02:00'); None for anything else.
    By hand: datetime would cost more than the rest of `auth token`."""
    if not isinstance(value, str):
        return epoch(value)
    text = value.strip()
    if is_digits(text) and len(text) < 12:
        return epoch(int(text))
    date, _, clock = text.upper().partition("T")
    offset, zone = 0, ""
    if clock.endswith("Z"):
        clock = clock[:-1]
    elif "+" in clock or "-" in clock:
        sign = "+" if "+" in clock else "-"
        clock, _, zone = clock.partition(sign)
        hours, _, minutes = zone.partition(":")
        if not (is_digits(hours) and is_digits(minutes) and len(hours) == len(minutes) == 2):
            return None
        offset = (int(hours) * 3600 + int(minutes) * 60) * (1 if sign == "+" else -1)
    else:
        return None  # no zone: a local time, which is nobody's
    parts, clock_parts = date.split("-"), clock.split(":")
    if len(parts) != 3 or len(clock_parts) != 3 or not all(map(is_digits, parts + clock_parts[:2])):
        return None
    whole, _, fraction = clock_parts[2].partition(".")
    if not is_digits(whole) or (fraction and not is_digits(fraction)):
        return None
    (year, month, day), (hour, minute), second = map(int, parts), map(int, clock_parts[:2]), int(whole)
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 60):
        return None
    return epoch(days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - offset)


# === Tokens: JWT claims, lifetimes, the credentials in use ===================

def describe_source(source, origin):
    """'environment (ATTUNE_API_TOKEN)', 'token file /run/token', ... for messages."""
    if source is None:
        return "none"
    return {"env": "environment (%s)", "token_file": "token file %s",
            "state_file": "token state file %s (ATTUNE_SENSOR_TOKEN_STATE_PATH)",
            "file": "credential file, profile '%s'"}[source] % origin


def jwt_claims(token):
    """The payload of a JWT as a dict, or None for anything malformed. No signature check:
    the client only wants to know when the token expires."""
    if not isinstance(token, str) or token.count(".") != 2:
        return None
    part = token.split(".")[1].replace("-", "+").replace("_", "/")  # base64url, padding restored
    try:
        claims = parse_json(binascii.a2b_base64(part + "=" * (-len(part) % 4)).decode("utf-8"))
    except (ValueError, UnicodeError, binascii.Error):
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
    """Refresh this long before expiry: 10% of the lifetime, kept within 30 s .. 300 s, and
    never more than half the lifetime: a token shorter than a minute would otherwise be due
    the moment it arrives, and a long run would refresh before every request."""
    if not lifetime:
        return MARGIN_MIN
    return min(max(MARGIN_MIN, min(MARGIN_MAX, lifetime // 10)), max(1, lifetime // 2))


class Credentials:
    """The tokens a command will send, where they came from, and their known expiry."""

    def __init__(self, access=None, refresh=None, access_expires_at=None, refresh_expires_at=None,
                 source=None, origin=None, invalidated_at=None, withheld=None):
        self.access = access
        self.refresh = refresh
        self.access_expires_at = access_expires_at
        self.refresh_expires_at = refresh_expires_at
        self.source = source    # 'env', 'token_file', 'state_file', 'file' or None
        self.origin = origin    # variable name, token file path, or profile name
        self.invalidated_at = invalidated_at
        self.withheld = withheld  # the API URL whose stored session is not sent elsewhere
        # Inside Attune: what the platform issued the token for ('sensor core.timer'), never refreshed
        self.platform = None
        self.state_path = None  # a managed sensor's token state file, read again for every request
        self.fallback = None    # the environment's token, for when that file cannot be read

    @classmethod
    def from_profile(cls, name, profile):
        """Stored tokens; a hand-seeded token without a stored expiry uses its JWT exp."""
        profile = profile or {}

        def text(key):
            value = profile.get(key)
            if value is None or value == "":
                return None
            return check_token(value, "credential file, profile '%s' (%s)" % (name, key))

        access, refresh = text("auth_token"), text("refresh_token")

        def expiry(key, token):
            return epoch(profile[key]) if profile.get(key) is not None else jwt_expiry(token)

        return cls(access, refresh, expiry("auth_token_expires_at", access),
                   expiry("refresh_token_expires_at", refresh), "file", name,
                   epoch(profile.get("invalidated_at")))

    @classmethod
    def from_token(cls, access, source, origin, refresh=None):
        """Tokens we did not receive ourselves (environment, token file): their JWT exp."""
        access = check_token(access, describe_source(source, origin))
        refresh = check_token(refresh, "ATTUNE_REFRESH_TOKEN") if refresh else None
        return cls(access, refresh, jwt_expiry(access), jwt_expiry(refresh) if refresh else None, source, origin)

    def same_tokens(self, other):
        return (self.access, self.refresh) == (other.access, other.refresh)

    @property
    def lifetime(self):
        return jwt_lifetime(self.access)

    def access_left(self, now):
        return None if self.access_expires_at is None else self.access_expires_at - now

    def refresh_usable(self, now):
        return bool(self.refresh) and (self.refresh_expires_at is None or self.refresh_expires_at > now)

    def refresh_due(self, now, min_ttl=0):
        """The access token has less than its refresh margin (or min_ttl) left. A token of
        unknown expiry is never due: the 401 path decides for it."""
        left = self.access_left(now)
        return left is not None and left < max(refresh_margin(self.lifetime), min_ttl)

    def usable(self, now):
        """A usable token exists without asking the server: a live access token, or a
        refresh token that is not known to be expired on a session not invalidated."""
        if not self.access:
            return False
        left = self.access_left(now)
        if left is None or left > 0:
            return True
        return self.refresh_usable(now) and not self.invalidated_at


def describe_expiry(expires_at, now):
    if expires_at is None:
        return "unknown expiry"
    left = expires_at - now
    if left <= 0:
        return "expired %s ago (%s)" % (format_duration(-left), format_time(expires_at))
    return "expires in %s (%s)" % (format_duration(left), format_time(expires_at))


def secret_key(key):
    """Fields masked in -v logs: tokens, passwords, secrets and key values."""
    key = str(key).lower()
    return "token" in key or "password" in key or "secret" in key or key in ("value", "device_code")


def redact(value):
    """A copy of JSON-shaped data with every token/password/secret string masked."""
    if isinstance(value, dict):
        return {k: ("***" if secret_key(k) and isinstance(v, str) else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return list(map(redact, value))
    return value


# === Deadlines and waiting again =============================================

class CommandDeadline:
    """The deadline of a command's own --timeout (a time.monotonic() value, or None until the
    command sets one): every wait under it ends by then too, an HTTP request and the wait for
    the credential lock included. One per run, shared by the transport and the store."""

    def __init__(self):
        self.at = None

    def until(self, at):
        """From now on nothing waits past `at` (an earlier deadline stays)."""
        self.at = at if self.at is None else min(self.at, at)
        return at

    def cap(self, seconds, least=0.0):
        """seconds, or less when the command's deadline comes first (but at least `least`)."""
        if self.at is None:
            return seconds
        return max(least, min(seconds, self.at - time.monotonic()))


class Backoff:
    """The one way attune.py waits and tries again: sleeps that grow from `first` by
    `factor` up to `most`, never past `deadline` (a time.monotonic() value, or None)."""

    def __init__(self, first, factor, most, deadline=None):
        self.delay, self.factor, self.most, self.deadline = first, factor, most, deadline

    def left(self):
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def next_delay(self):
        """The next sleep, or None once the deadline has passed."""
        left = self.left()
        if left <= 0:
            return None
        delay = min(self.delay, left)
        self.delay = min(self.delay * self.factor, self.most)
        return delay

    def sleep(self):
        """Sleep the next delay; False (at once) when the deadline has passed."""
        delay = self.next_delay()
        if delay is None:
            return False
        time.sleep(delay)
        return True


# === Lock ====================================================================

LOCK_BUSY = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, getattr(errno, "EDEADLK", -1)}


class FileLock:
    """Exclusive lock on '<credential file>.lock' (on the credential file itself where that
    cannot be made), held around each read-modify-write.

    The lock file is never deleted: deleting it would let a waiter lock an unlinked
    file while a newcomer locks a fresh one. Its content (pid and command of the
    holder) is informational only. When locking is impossible or the deadline
    passes, work goes on unlocked: atomic writes and compare-and-refresh keep that
    safe, the lock only saves refresh calls and lost updates."""

    def __init__(self, path, timeout, command, warn, log, done_waiting=None, owner=None, instead=None):
        self.path = path
        self.instead = instead  # the file locked where no lock file can be made (see _open_instead)
        self.locked = None      # the path of the file whose lock is held or tried (acquire)
        self.owner = owner  # (uid, gid) root gives a lock file it creates in another user's directory
        self.timeout = timeout
        self.command = command
        self.warn = warn
        self.log = log
        self.done_waiting = done_waiting
        self.fd = None
        self.held = False
        self._method = 0  # POSIX: 0 flock, 1 lockf, 2 none works here

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        EXIT_SIGNALS.arm()  # a SIGTERM while it is held still releases it
        self.locked = self.path  # _open_instead may lock the credential file instead
        try:  # never through a link: its holder line would overwrite whatever the link names
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigError("the lock file %s is a symbolic link; remove it (attune.py does not "
                                  "write through links)" % quoted(self.path))
            self.fd = self._open_instead(e)
            if self.fd is None:
                return False
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            self.fd = None
            raise ConfigError("the lock file %s is not a regular file; remove it" % quoted(self.path))
        if self.owner and st.st_uid != self.owner[0]:  # root under sudo: the user's next run opens it too
            try:
                os.fchown(self.fd, self.owner[0], self.owner[1])
            except OSError as e:
                self.log("cannot give the lock file %s to uid %d (%s)" % (self.path, self.owner[0], e))
        start = time.monotonic()
        backoff = Backoff(0.002, 1.5, 0.05, start + self.timeout)  # short: waiters wake soon after release
        announced = False
        while True:
            state = self._try_lock()
            if state:
                self.held = True
                self._write_holder()
                return True
            if state is None:
                self.log("the file system refuses locks on %s; continuing without the lock" % self.path)
                return False
            if self.done_waiting is not None and self.done_waiting():
                return False
            if not announced and time.monotonic() - start >= 1.0:
                announced = True
                self.warn("waiting for %s ..." % (self._holder() or "another attune process"))
            if not backoff.sleep():
                self.warn("gave up waiting %gs for the lock %s%s; continuing without it"
                          % (self.timeout, self.path, self._holder(" held by ")))
                return False

    def _open_instead(self, e):
        """Where the lock file cannot be made (a credential file mounted on its own into a
        directory that is not ours), the credential file itself is locked: it is rewritten in
        place there, so it stays the same file. (Should flock fail there too, lockf's lock ends
        when this process closes any descriptor of the file: less protection, still safe.)
        Its descriptor, or None: no lock at all."""
        if self.instead is not None and fcntl is not None:  # msvcrt's lock would keep readers out
            try:
                fd = os.open(self.instead, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
                self.log("cannot open lock file %s (%s); locking %s itself" % (self.path, e, self.instead))
                self.locked = self.instead
                return fd
            except OSError:
                pass
        self.log("cannot open lock file %s (%s); continuing without the lock" % (self.path, e))
        return None

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
        if self.locked != self.path:  # the credential file itself: its content is not ours to write
            return
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
            raw = read_regular_file(self.path, 4096)[0]
        except OSError:
            return ""
        pid, _, command = raw[:300].decode("utf-8", "replace").strip().split("\n")[0].partition(" ")
        if not pid or not set(pid) <= DIGITS:
            return ""
        return "%spid %s (%s)" % (prefix, pid, terminal_safe(command) or "?")

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
            self.fd, self.held, self.locked = None, False, None


# === Credential file =========================================================

def credential_path(config, env):
    """Where the credential file is, and what chose it: (path, 'flag'|'env'|'default'),
    or (None, 'none') when there is no home directory to keep it in."""
    if config:
        return absolute_path(config, "--config", env), "flag"
    if env.get("ATTUNE_CONFIG"):
        return absolute_path(env["ATTUNE_CONFIG"], "ATTUNE_CONFIG", env), "env"
    if WINDOWS and env.get("APPDATA"):
        return os.path.join(env["APPDATA"], "attune", "credentials.json"), "default"
    xdg = env.get("XDG_CONFIG_HOME", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, "attune", "credentials.json"), "env"
    home = env.get("HOME") or os.path.expanduser("~")
    if not os.path.isabs(home):  # no HOME and no password-database entry: no place at all
        return None, "none"
    return os.path.join(home, ".config", "attune", "credentials.json"), "default"


def absolute_path(path, where, env=None):
    """path made absolute (~ is this run's HOME); a relative one needs the working directory,
    which may be gone. Paths are kept absolute: the next run may start anywhere."""
    if env is not None and env.get("HOME") and (path == "~" or path.startswith("~" + os.sep)):
        path = env["HOME"] + path[1:]
    try:
        return os.path.abspath(os.path.expanduser(path))
    except OSError as e:
        raise ConfigError("cannot use the relative path %s from %s: the working directory is gone (%s)"
                          % (quoted(path), where, e.strerror or e))


def creation_root(source, env):
    """The existing directory under which attune.py may create the credential file's
    directories, or None when the user named the file (--config, ATTUNE_CONFIG: create
    what it takes). The default place lives in the home directory: nothing is made
    outside one that exists (a service user with HOME=/nonexistent gets no /nonexistent)."""
    if source == "flag" or (source == "env" and env.get("ATTUNE_CONFIG")) or WINDOWS:
        return None
    home = env.get("HOME") or os.path.expanduser("~")
    xdg = env.get("XDG_CONFIG_HOME", "")
    if os.path.isabs(xdg) and not (xdg + os.sep).startswith(home.rstrip(os.sep) + os.sep):
        return xdg  # an XDG directory outside the home must exist already
    return home


def existing_parent(path):
    """path, or the nearest directory above it that exists (lstat: a link counts)."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def root_keeps_owner(path):
    """(uid, gid) that what root writes at path must keep: those of the file there, else of
    the nearest directory above it, when that is another user's (sudo with the user's HOME,
    cloud-init writing into a user's home); None for everyone else."""
    if WINDOWS or os.geteuid() != 0:
        return None
    try:
        st = os.stat(existing_parent(path))
    except OSError:
        return None
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def make_private_dirs(directory, root=None):
    """Create missing directories with mode 0700 (root making them in another user's home
    gives them to that user); an existing one is never chmod-ed. root: the directory that
    must exist already (the home), nothing is created outside it."""
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    if root is not None and missing and (not os.path.isdir(root) or any(
            not (path + os.sep).startswith(root.rstrip(os.sep) + os.sep) or path == root.rstrip(os.sep)
            for path in missing)):
        raise FileNotFoundError(errno.ENOENT, "the home directory %s does not exist" % root)
    owner = root_keeps_owner(missing[-1]) if missing else None
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # another process made it first
            continue
        os.chmod(path, 0o700)  # ours, so exact, whatever the umask
        if owner:
            os.chown(path, owner[0], owner[1])


LINK_HOPS = 40  # as the kernel's own limit on a chain of symbolic links


def own_link_target(path):
    """(the file to write, its lstat, or None when there is no file yet) for the credential
    file at path. A symbolic link the user owns (dotfiles: stow, chezmoi, home-manager) is
    followed to the regular file it names, which is what gets written: the link stays a
    link. A link or target someone else owns, a dangling link or anything but a regular
    file is refused (exit 3): root running with another user's HOME never writes where that
    user's link points."""
    me = None if WINDOWS else os.geteuid()
    current = path
    for _ in range(LINK_HOPS):
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if current == path:
                return path, None
            raise ConfigError("%s is a symbolic link to %s, which does not exist; attune.py writes through "
                              "a link only to an existing file (create it, or use --config FILE or "
                              "ATTUNE_CONFIG)" % (quoted(path), quoted(current)))
        except OSError as e:
            raise ConfigError("cannot write %s: %s" % (quoted(current), e.strerror or e))
        if me is not None and st.st_uid != me and (stat.S_ISLNK(st.st_mode) or current != path):
            raise ConfigError("%s %s owned by uid %d, not by you (uid %d); attune.py does not write "
                              "through another user's link; use --config FILE or ATTUNE_CONFIG"
                              % (quoted(path), "is a symbolic link" if current == path else
                                 "leads to %s," % quoted(current), st.st_uid, me))
        if not stat.S_ISLNK(st.st_mode):
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError("%s is not a regular file; attune.py will not replace it" % quoted(current))
            return current, st
        current = os.path.join(os.path.dirname(current), os.readlink(current))
    raise ConfigError("%s: too many levels of symbolic links" % quoted(path))


def check_write_target(path):
    """Refuse (exit 3) to write where a symbolic link or anything but a regular file stands:
    attune.py never writes through a link someone else may have planted, and never replaces
    one silently. A missing file is fine: it is created."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError("cannot write %s: %s" % (quoted(path), e.strerror or e))
    if stat.S_ISLNK(mode):
        raise ConfigError("%s is a symbolic link; attune.py does not write through links (remove it, or "
                          "name the file it points to)" % quoted(path))
    if not stat.S_ISREG(mode):
        raise ConfigError("%s is not a regular file; attune.py will not replace it" % quoted(path))


TEMP_FILE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                   | getattr(os, "O_BINARY", 0))


def fresh_name(directory, prefix, suffix=""):
    """A path in directory that nothing else will pick (64 random bits), for a file or
    directory created with O_EXCL / mkdir. Unlike mkstemp, the caller holds the name
    before the file exists, so a signal between creating it and noting it cannot leak it."""
    return os.path.join(directory, prefix + binascii.hexlify(os.urandom(8)).decode("ascii") + suffix)


def write_atomic(path, data, shared=False, links_ok=False, keep=None):
    """Write to path so that a reader sees the old or the new file, never a mix: a temp
    file in the same directory (created 0600; shared gives it the mode a new file
    gets under the umask; keep, a (uid, gid, mode), that owner and mode), fsync, rename
    over, fsync the directory. data is bytes, or a function that writes to the file; its
    result is returned. On any failure the temp file is removed and path is untouched. A
    link or non-regular file at path is refused (check_write_target) unless links_ok,
    where the rename replaces the link itself."""
    if not links_ok:
        check_write_target(path)
    EXIT_SIGNALS.arm()  # a SIGTERM from here on still removes the temp file
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:  # the name is known before the file exists: a signal at any point leaves nothing
        while tmp is None:
            tmp = fresh_name(directory, "." + os.path.basename(path) + ".", ".tmp")
            try:
                fd = os.open(tmp, TEMP_FILE_FLAGS, 0o600)
            except FileExistsError:  # another writer's name: not ours to remove
                tmp = None
        with os.fdopen(fd, "wb") as f:
            if keep:  # root rewriting another user's file: it stays theirs
                os.fchown(f.fileno(), keep[0], keep[1])
                os.fchmod(f.fileno(), keep[2])
            result = data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if shared:
            mask = os.umask(0o022)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
        replace_file(tmp, path)
    except BaseException:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:  # not created yet, or gone
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
    return result


def write_in_place(path, data):
    """Rewrite the content of the regular file at path where no rename can replace it (a
    single bind-mounted file: EBUSY or EXDEV; a file in a directory that is not ours to
    write): write, truncate, fsync. Not atomic: the caller holds the lock, and a reader that
    meets a half-written file reads it again."""
    EXIT_SIGNALS.arm()
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


NOT_REPLACEABLE = (errno.EBUSY, errno.EXDEV)  # rename over a mount point


STALE_TEMP_AGE = 600  # seconds; a writer killed mid-write leaves its temp file behind


def remove_stale_temp_files(path):
    """Remove temp files of writers that died before their rename (SIGKILL, power loss).
    Only old ones: a live writer that gave up waiting for the lock may be mid-write."""
    directory, prefix = os.path.dirname(path), "." + os.path.basename(path) + "."
    try:
        names = os.listdir(directory)
    except OSError:
        return
    cutoff = time.time() - STALE_TEMP_AGE
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                if os.lstat(os.path.join(directory, name)).st_mtime < cutoff:
                    os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def file_safety_problems(path, st):
    """{'mode' or 'owner': message} for a credential file others can read or someone else
    owns (POSIX): what the store warns about and auth doctor reports and repairs."""
    problems = {}
    if WINDOWS:
        return problems
    if st.st_mode & 0o077:
        problems["mode"] = ("%s is accessible by other users (mode %03o); run: chmod 600 %s"
                            % (path, st.st_mode & 0o777, path))
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        problems["owner"] = "%s is owned by uid %d, not by you (uid %d)" % (path, st.st_uid, os.geteuid())
    return problems


ELSEWHERE = ("choose another location with --config FILE or ATTUNE_CONFIG, or give a token in "
             "ATTUNE_API_TOKEN or ATTUNE_TOKEN_FILE")


def empty_document():
    return {"version": FILE_VERSION, "profiles": {}}


class CredentialStore:
    """The JSON credential file. Reads are lock-free (writes are atomic renames);
    every write re-reads the file under the lock and changes only what it must."""

    def __init__(self, path, warn, log, lock_timeout=LOCK_TIMEOUT, command="attune", deadline=None, root=None):
        self.path = path
        self.root = root  # the home directory that must exist for anything to be created (creation_root)
        self.warn = warn
        self.log = log
        self.lock_timeout = lock_timeout
        self.command = command
        self.deadline = deadline or CommandDeadline()
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
        if self.path is None:
            return empty_document()
        for attempt in (1, 2):
            try:
                raw, st = read_regular_file(self.path, CREDENTIAL_FILE_LIMIT)
            except (FileNotFoundError, NotADirectoryError):  # no file, or no home to hold one
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
            doc = read_json(raw[3:].decode("utf-8") if raw.startswith(b"\xef\xbb\xbf") else raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError("not UTF-8: %s" % e.reason)
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
        if self._checked_safety:
            return
        self._checked_safety = True
        for problem in file_safety_problems(self.path, st).values():
            self.warn("credential file " + problem)

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
        """(the file to write, its lstat or None) once it is clear that a write can succeed:
        asked before anything is spent (a refresh, a login), so that a result that could not
        be stored is never asked for. Exit 3 naming the file and where else a session can live."""
        version = self.version
        if version > FILE_VERSION:
            raise ConfigError("credential file %s was written by a newer attune.py (version %d); "
                              "not rewriting it. Upgrade attune.py, or use --config FILE for another file"
                              % (self.path, version))
        if self.path is None:
            raise self._no_place()
        target, st = own_link_target(self.path)
        directory = os.path.dirname(target)
        problem = None
        if st is not None:
            if not WINDOWS and os.geteuid() not in (0, st.st_uid):
                problem = "it is owned by uid %d, not by you (uid %d)" % (st.st_uid, os.geteuid())
            elif not os.access(target, os.W_OK):
                problem = "it is read-only (a read-only mount or secret volume, or its mode)"
            # a writable file in a directory that is not: rewritten in place (modify_locked)
        elif self.homeless():
            problem = self.homeless()
        elif not os.access(existing_parent(directory), os.W_OK | os.X_OK):
            problem = "%s is not writable" % existing_parent(directory)
        if problem:
            raise ConfigError("cannot write credential file %s: %s; %s" % (self.path, problem, ELSEWHERE))
        return target, st

    def _no_place(self):
        return ConfigError("there is no place for the credential file: HOME is not set; " + ELSEWHERE)

    def homeless(self):
        """Why no credential file can be made where this run looks for one (no HOME, or a
        home that does not exist), or None."""
        if self.path is None:
            return "HOME is not set"
        if self.root is not None and not os.path.isdir(self.root) and not self.exists:
            return "the home directory %s does not exist" % self.root
        return None

    def lock(self, done_waiting=None):
        """The lock around a read-modify-write. done_waiting, checked while another
        process holds it, ends the wait early when it says the wait is pointless."""
        if self.path is None:
            raise self._no_place()
        try:
            make_private_dirs(os.path.dirname(os.path.abspath(self.path)), self.root)
        except OSError as e:
            raise self._write_error(e)
        return FileLock(self.path + ".lock", self.deadline.cap(self.lock_timeout), self.command, self.warn,
                        self.log, done_waiting, root_keeps_owner(self.path), instead=self.path)

    def modify(self, change):
        """Read-modify-write under the lock; change(doc) edits the freshly read document."""
        with self.lock():
            return self.modify_locked(change)

    def modify_locked(self, change, fresh=False):
        """The same, for a caller that already holds the lock (or gave up waiting for it);
        fresh starts from an empty document instead of the file (auth doctor --repair)."""
        self._doc = empty_document() if fresh else None
        self.load()
        target, st = self.check_writable()
        doc = self._doc
        result = change(doc)
        doc.setdefault("version", FILE_VERSION)
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        owner = root_keeps_owner(target)
        keep = owner + (stat.S_IMODE(st.st_mode) if st else 0o600,) if owner else None
        why = None  # why the file is rewritten in place, where no rename can replace it
        if st is not None and not os.access(os.path.dirname(target), os.W_OK | os.X_OK):
            why = "its directory is not writable"  # docker run --user U -v creds.json:...
        else:
            try:
                write_atomic(target, data, keep=keep)
            except OSError as e:
                if st is None or e.errno not in NOT_REPLACEABLE:
                    raise self._write_error(e)
                why = "%s: a file mounted on its own?" % (e.strerror or e)
        if why:
            self.log("%s cannot be replaced (%s); rewriting it in place" % (target, why))
            try:
                write_in_place(target, data)
            except OSError as e:
                raise self._write_error(e)
        self.exists = True
        remove_stale_temp_files(target)
        return result

    def _write_error(self, e):
        return ConfigError("cannot write credential file %s: %s; %s" % (self.path, e.strerror or e, ELSEWHERE))


# === HTTP settings ===========================================================

class HttpSettings:
    """How to talk HTTP: timeout, TLS, proxies (from env), --wait-for-server, and where
    to log. A transport reads these; it never reaches back into a command."""

    def __init__(self, env, timeout, insecure, wait_seconds, verbose, log, note, deadline=None):
        self.env = env
        self.timeout = timeout
        self.deadline = deadline or CommandDeadline()  # a command's --timeout caps each request
        self.insecure = insecure
        self.log, self.note = log, note
        self.verbose = verbose
        self.wait_for(wait_seconds)
        self.ready = set()  # API URLs whose /health answered, with --wait-for-server
        self._announced = False
        self._ssl = {}  # CA bundle path (or None) -> its SSL context

    def wait_for(self, seconds):
        """Wait up to seconds (None: not at all) for a server that is not up yet."""
        self.wait_seconds = seconds
        self.wait_deadline = None if seconds is None else time.monotonic() + seconds

    def announce_wait(self, url):
        """The one progress line of --wait-for-server."""
        if not self.ready and not self._announced:
            self._announced = True
            self.note("waiting up to %gs for %s://%s:%s to come up ..." % ((self.wait_seconds,) + origin(url)))

    def ssl_context(self, ca_bundle=(None, None)):
        """The TLS settings for a session: the system's trust store, plus the CA bundle
        (path, source) of the profile whose session it carries, one context per bundle."""
        bundle, source = ca_bundle
        if bundle not in self._ssl:
            import ssl
            context = ssl.create_default_context()
            if bundle:
                try:
                    pem = read_regular_file(os.path.expanduser(bundle), DATA_FILE_LIMIT)[0]
                    context.load_verify_locations(cadata=pem.decode("ascii"))
                except (OSError, UnicodeError, ssl.SSLError, ValueError) as e:
                    raise ConfigError("cannot load CA bundle %s (from %s): %s"
                                      % (terminal_safe(bundle), source, getattr(e, "strerror", None) or e))
            if self.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._ssl[bundle] = context
        return self._ssl[bundle]


# === HTTP transport ==========================================================
# urllib is imported inside these functions: `auth token` with a fresh cached token
# never touches the network and must not pay for importing it.

def user_agent():
    return "attune.py/%s python/%d.%d" % ((__version__,) + tuple(sys.version_info[:2]))


DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def url_origin(url):
    """(scheme, host, port) of a URL, normalised (letter case, a trailing dot, the default
    port; an IPv6 host without its brackets), or None when it has no usable one. The one
    parser for every URL attune.py compares: the API URL and a profile's, a redirect's
    Location. By hand: urllib.parse raises on some malformed URLs and would bring re."""
    if not isinstance(url, str):
        return None
    scheme, sep, rest = url.strip().partition("://")
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]
    if authority.startswith("["):
        host, bracket, port = authority[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return None
        port = port[1:]
    else:
        host, _, port = authority.partition(":")
    scheme, host = scheme.lower(), host.lower().rstrip(".")
    if not sep or scheme not in DEFAULT_PORTS or not host or odd_character(host) or " " in host:
        return None
    if not port:
        return scheme, host, DEFAULT_PORTS[scheme]
    if not (len(port) <= 5 and set(port) <= DIGITS and 0 < int(port) < 65536):
        return None
    return scheme, host, int(port)


def origin(url):
    """url_origin() of a URL attune.py built itself from a checked API URL."""
    return url_origin(url) or ("?", "?", 0)


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


def masked_url(url):
    """A proxy URL with any password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return "%s%s%s:***@%s" % (scheme, sep, credentials.split(":")[0], host)


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


class RequestDeadline:
    """One deadline for a whole exchange (connect, TLS, request, headers and body, every
    redirect hop), however slowly the peer dribbles: a socket timeout alone restarts with
    every byte that arrives, so a server sending one byte every few seconds would never
    time out. Each step on a DeadlineSocket may take what is left, at most `step`; lift()
    ends the overall deadline (a stream's body, once its headers are in), leaving `step` as
    the bound on each silence. The same on every platform and in every thread."""

    def __init__(self, seconds, step):
        self.at, self.step = time.monotonic() + seconds, step

    def lift(self):
        self.at = None

    def left(self):
        """Seconds the next step may take; socket.timeout once the deadline has passed."""
        import socket
        if self.at is None:
            return self.step
        left = self.at - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        return min(self.step, left)


class DeadlineReader(io.RawIOBase):
    """The raw reader under DeadlineSocket.makefile()."""

    def __init__(self, sock, raw):
        self.sock, self.raw = sock, raw

    def readable(self):
        return True

    def readinto(self, buffer):
        self.sock.sock.settimeout(self.sock.deadline.left())
        return self.raw.readinto(buffer)

    def close(self):
        if not self.closed:
            self.raw.close()
        super().close()


class DeadlineSocket:
    """A connected socket (plain or TLS) whose every read and write is bounded by a
    RequestDeadline: before each step its timeout becomes what is left."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline = sock, deadline

    def recv(self, size):
        self.sock.settimeout(self.deadline.left())
        return self.sock.recv(size)

    def sendall(self, data):
        self.sock.settimeout(self.deadline.left())  # since Python 3.5 the bound of the whole sendall
        return self.sock.sendall(data)

    def makefile(self, mode="rb", buffering=None, **kwargs):
        """What http.client reads an answer from: the socket's own unbuffered reader (which
        keeps the socket open until it is closed too), each read under the deadline."""
        return io.BufferedReader(DeadlineReader(self, self.sock.makefile("rb", buffering=0)))

    def __getattr__(self, name):  # fileno, close, pending, setsockopt...: the socket's own
        return getattr(self.sock, name)


def read_bounded(fp, limit, what):
    """All of an answer body (fp: an http.client response, or urllib's HTTPError holding
    one), or ServerError (exit 6) once it passes limit bytes: an endless or huge answer never
    fills memory. A body cut short of its Content-Length is IncompleteRead, as read() says."""
    import http.client
    # into one buffer that doubles as it fills: no garbage per chunk, which PyPy's collector
    # would let pile up to many times the limit
    buffer, size = bytearray(min(limit + 1, 1 << 16)), 0
    while size <= limit:
        if size == len(buffer):
            buffer.extend(bytes(min(len(buffer), limit + 1 - size)))
        with memoryview(buffer) as view:
            got = fp.readinto(view[size:])
        if not got:
            break
        size += got
    if size > limit:
        raise ServerError("%s is larger than %d MiB, the most attune.py reads into memory"
                          % (what, limit >> 20))
    data = bytes(buffer[:size])
    response = fp if isinstance(fp, http.client.HTTPResponse) else getattr(fp, "fp", None)
    if isinstance(response, http.client.HTTPResponse) and response.length:  # bytes still owed
        raise http.client.IncompleteRead(data, response.length)
    return data


class Response:
    """A finished exchange; for a streamed 2xx answer, `stream` is the open body to read."""

    def __init__(self, status, reason, headers, body, stream=None):
        self.status = status
        self.reason = reason or ""
        self.headers = headers
        self.body = body
        self.stream = stream
        self.hint = ""  # what the error should add (wrong_url_hint)

    @property
    def ok(self):
        return 200 <= self.status < 300

    def check(self):
        """Raise the error for a non-2xx answer (api_error); return self otherwise."""
        if not self.ok:
            raise api_error(self)
        return self

    def json(self):
        """The body parsed as JSON; None for an empty body; ApiError when it is not JSON."""
        if not self.body.strip():
            return None
        try:
            return json_loads(self.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError("the server answered %d %s with a body that is not JSON: %s"
                           % (self.status, self.reason, snippet(self.body)), self.status)


def snippet(body, limit=200):
    text = SECRETS.mask(" ".join(body.decode("utf-8", "replace").split()))  # before it is cut
    return text[:limit] + ("..." if len(text) > limit else "")


def error_message(resp):
    """The server's message from either error shape; otherwise the start of the raw body."""
    try:
        body = json_loads(resp.body.decode("utf-8"))
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


REQUEST_ID_HEADERS = ("x-request-id", "x-attune-request-id", "request-id")


def error_context(resp):
    """', code C, request ID R' for the API error line: the server's error code and the
    first request-id header, when present and plain (they are quoted in bug reports)."""
    parts = []
    try:
        body = json_loads(resp.body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    code = body.get("code") if isinstance(body, dict) else None
    if isinstance(code, str) and code and not odd_character(code):
        parts.append("code " + clip(code, 64))
    for name in REQUEST_ID_HEADERS:
        value = resp.headers.get(name) if resp.headers is not None else None
        if value:
            if not odd_character(value):
                parts.append("request ID " + clip(value.strip(), 128))
            break
    return "".join(", " + part for part in parts)


def api_error(resp, label="API error", detail=""):
    """The AttuneError for a non-2xx response, with its documented exit code (README: Exit codes)."""
    message = "%s (%d %s%s): %s%s%s" % (label, resp.status, resp.reason, error_context(resp), error_message(resp),
                                        detail, resp.hint)
    retry_after = resp.headers.get("Retry-After") if resp.status == 429 and resp.headers is not None else None
    if retry_after:
        message += " (the server asks to retry after %s s)" % retry_after
    if resp.status == 401:
        return AuthError(message)
    if resp.status == 403:  # never a login problem: this identity may not do it
        message += " (the server refused this identity; attune auth whoami shows which one the profile uses)"
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


def http_date(value):
    """A Date header as epoch seconds, or None: one checked parser for the dates a server
    sends (a year outside 1970-9999, junk or a missing header is None, never a traceback)."""
    if not isinstance(value, str) or len(value) > 100:
        return None
    import datetime
    from email.utils import parsedate_tz, mktime_tz
    try:
        parsed = parsedate_tz(value)
        if not parsed or not 1970 <= parsed[0] <= 9999 or abs(parsed[9] or 0) > 14 * 3600:
            return None
        datetime.datetime(*parsed[:6])  # a real day and time of day, or ValueError
        return mktime_tz(parsed)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


class HttpRequest:
    """One request as the transport sends it (and sends it again): the bytes, the bearer
    token, the media type a stream asks for, and the timeout of this one request (None:
    ATTUNE_TIMEOUT)."""

    def __init__(self, method, url, body=None, token=None, content_type="application/json",
                 stream=None, timeout=None):
        self.method, self.url, self.body, self.token = method, url, body, token
        self.content_type, self.stream, self.timeout = content_type, stream, timeout

    def with_token(self, token):
        """The same request with another token (the retry after a refresh)."""
        return HttpRequest(self.method, self.url, self.body, token, self.content_type, self.stream, self.timeout)

    def describe(self):
        """'the answer to GET URL' (the query left out), for messages about an answer."""
        return "the answer to %s %s" % (self.method, self.url.split("?", 1)[0])


class Transport:
    """HTTP over urllib: timeouts, TLS settings, proxies, same-origin redirects only,
    retries for idempotent requests, and a redacted -v log."""

    def __init__(self, http, ca_bundle=(None, None)):
        self.http = http
        self.ca_bundle = ca_bundle  # (path, source) of the session's profile: its TLS settings
        self._openers = {}

    def request(self, request):
        """Send an HttpRequest and return a Response for any status; NetworkError when there
        is none. GETs are retried twice on refused/reset connections and 502/503/504; with
        --wait-for-server every request is retried until the deadline while the server is
        not up yet. With request.stream (the media type asked for: SSE or "*/*" for a
        download) a 2xx body is left open in Response.stream. request.timeout shortens the
        HTTP timeout for this one request; a command's own deadline shortens it too."""
        asked = request.timeout
        timeout = self.http.deadline.cap(min(asked, self.http.timeout) if asked else self.http.timeout, 0.1)
        attempt = 0
        backoff = Backoff(0.25, 1.6, 5.0, self.http.wait_deadline)  # with --wait-for-server
        while True:
            try:
                resp = self._send(request, timeout)
                if resp.status not in RETRY_STATUSES:
                    return resp
                failure = "%d %s" % (resp.status, resp.reason)
            except NetworkError as e:
                resp, failure = None, e
            delay = self.retry_delay(request, attempt, failure, backoff)
            if delay is None:
                if resp is None:
                    raise failure
                return resp
            self.http.log("%s; retrying in %.2gs" % (failure, delay))
            time.sleep(delay)
            attempt += 1

    def retry_delay(self, request, attempt, failure, backoff):
        """Seconds to wait before trying again, or None to give up. A request that may have
        reached the server (a reset, a timeout, or any answer: a gateway's 502-504 can come
        after the server did the work) is sent again only when repeating it is harmless
        (GET, HEAD); other requests only when the connection was never made (refused, DNS)."""
        network = isinstance(failure, NetworkError)
        unsent = network and failure.kind in ("refused", "dns")
        method = request.method
        if method not in IDEMPOTENT and not unsent:
            return None
        if backoff.deadline is not None:  # the server may still be starting: refused, DNS, 502-504
            if backoff.left() <= 0 or (network and not failure.retryable):
                return None
            self.http.announce_wait(request.url)
            return backoff.next_delay()
        if method not in IDEMPOTENT or attempt >= len(RETRY_DELAYS) or (network and not failure.retryable):
            return None
        return RETRY_DELAYS[attempt]

    def _send(self, request, timeout):
        import urllib.request
        import urllib.error
        import http.client
        url, body, token = request.url, request.body, request.token
        req = urllib.request.Request(url, data=body, method=request.method)
        req.add_header("User-Agent", user_agent())
        req.add_header("Accept", request.stream or "application/json")
        if body is not None:
            req.add_header("Content-Type", request.content_type)
        if token:
            # never copied onto a redirected request; see same_origin_redirects()
            req.add_unredirected_header("Authorization", "Bearer " + token)
        log = self.http.log
        log("> %s %s" % (request.method, url))
        if token:
            log("> Authorization: Bearer ***")
        if body is not None:
            log(">   %s" % describe_body(body))
        started = time.monotonic()
        what = request.describe()
        # one deadline for connect, TLS, headers and body; a stream's body is bounded by
        # the timeout of each read instead (the silence between events)
        req.deadline = RequestDeadline(timeout, timeout)
        try:
            resp = self._exchange(req, timeout, request.stream, what)
        except http.client.HTTPException as e:
            if isinstance(e, http.client.LineTooLong) or str(e).startswith("got more than"):
                raise ServerError("%s has more headers than http.client reads (%s)" % (what, e))
            raise network_error(url, e, timeout, proxy_for(url, self.http.env))
        except (urllib.error.URLError, OSError) as e:
            raise network_error(url, e, timeout, proxy_for(url, self.http.env))
        except ValueError as e:  # Python 3.6 raises ssl.CertificateError (a ValueError) bare
            if type(e).__name__ != "CertificateError":
                raise
            raise network_error(url, e, timeout, proxy_for(url, self.http.env))
        log("< %d %s (%d ms)" % (resp.status, resp.reason, (time.monotonic() - started) * 1000))
        if resp.body and self.http.verbose:
            log("<   %s" % describe_body(resp.body))
        return resp

    def _exchange(self, req, timeout, stream, what):
        import urllib.error
        import http.client
        try:
            r = self._opener(req.full_url).open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            try:
                data = read_bounded(e, ERROR_LIMIT, what + " (an error)")
            except (OSError, http.client.HTTPException):
                data = b""
            finally:
                e.close()
            return Response(e.code, e.reason, e.headers, data)
        if stream:
            req.deadline.lift()
            return Response(r.getcode(), r.reason, r.headers, b"", stream=r)
        with r:
            return Response(r.getcode(), r.reason, r.headers, read_bounded(r, ANSWER_LIMIT, what))

    def _opener(self, url):
        import urllib.request
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise UsageError("the API URL must start with http:// or https://, not %r" % url)
        proxy = proxy_for(url, self.http.env)
        key = (scheme, proxy)
        if key not in self._openers:
            handlers = [urllib.request.ProxyHandler({scheme: proxy} if proxy else {}),
                        same_origin_redirects()]
            handlers.extend(deadline_handlers(self.http.ssl_context(self.ca_bundle) if scheme == "https" else None))
            self._openers[key] = urllib.request.build_opener(*handlers)
        return self._openers[key]


def deadline_handlers(ssl_context):
    """urllib's HTTP (and with an SSL context, HTTPS) handlers, with connections that put
    each socket step of a request under its RequestDeadline (the request's .deadline)."""
    import http.client
    import urllib.request

    def under_deadline(base):
        class Connection(base):
            def __init__(self, *args, deadline=None, **kwargs):
                base.__init__(self, *args, **kwargs)
                self.deadline = deadline

            def connect(self):  # TCP, a proxy's CONNECT and TLS, then every read and write
                if self.deadline is not None:
                    self.timeout = self.deadline.left()
                base.connect(self)
                if self.deadline is not None:
                    self.sock = DeadlineSocket(self.sock, self.deadline)
        return Connection

    http_connection = under_deadline(http.client.HTTPConnection)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            deadline = getattr(req, "deadline", None)
            return self.do_open(lambda *args, **kwargs: http_connection(*args, deadline=deadline, **kwargs), req)

    if ssl_context is None:
        return [HTTPHandler()]
    https_connection = under_deadline(http.client.HTTPSConnection)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            deadline = getattr(req, "deadline", None)
            return self.do_open(lambda *args, **kwargs: https_connection(*args, deadline=deadline, **kwargs),
                                req, context=ssl_context)

    return [HTTPHandler(), HTTPSHandler(context=ssl_context)]


def same_origin_redirects():
    """A redirect handler that follows only same scheme, host and port, and carries the
    bearer token (an unredirected header, so urllib drops it) over to the same origin."""
    import urllib.request

    class SameOriginRedirectHandler(urllib.request.HTTPRedirectHandler):
        def http_error_302(self, req, fp, code, msg, headers):
            # urllib parses Location before it asks redirect_request, and raises ValueError
            # on some malformed ones ('http://[::1'): look at it first, with the one URL parser
            from urllib.parse import urljoin
            location = headers.get("Location") or headers.get("URI") or ""
            try:
                target = url_origin(urljoin(req.full_url, location))
            except ValueError:
                target = None
            if target is None:
                raise ApiError("refusing to follow a redirect to a malformed Location (%s)" % quoted(location))
            return urllib.request.HTTPRedirectHandler.http_error_302(self, req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

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
            if new_req is not None:  # the next hop counts against the same deadline
                new_req.deadline = getattr(req, "deadline", None)
            return new_req

    return SameOriginRedirectHandler()


def network_error(url, exc, timeout, proxy=None):
    """A NetworkError saying what failed and what to try; through a proxy, it names the proxy."""
    import socket
    import ssl
    reason = getattr(exc, "reason", None) or exc
    where = "%s://%s:%s" % origin(url)
    if proxy:
        where += " through the proxy %s (from the *_PROXY variables; NO_PROXY lists the hosts reached " \
                 "directly)" % masked_url(proxy)
    if isinstance(reason, ssl.SSLError) or isinstance(exc, ssl.SSLError):
        text = str(reason)
        if "CERTIFICATE_VERIFY_FAILED" in text or type(reason).__name__ == "SSLCertVerificationError":
            return NetworkError("TLS certificate of %s is not trusted (%s); if it uses a private CA, "
                                "pass --ca-bundle FILE or set ATTUNE_CA_BUNDLE" % (where, text), "tls")
        if any(mark in text for mark in ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
                                         "record layer failure")):
            text += "; it answers without TLS: if it serves plain HTTP, the URL starts with http://"
        return NetworkError("TLS error talking to %s: %s" % (where, text), "tls")
    if isinstance(reason, ssl.CertificateError):  # Python 3.6: hostname mismatch
        return NetworkError("TLS certificate of %s does not match: %s" % (where, reason), "tls")
    if isinstance(reason, (socket.timeout,)) or "timed out" in str(reason):
        return NetworkError("no answer from %s within %gs (set ATTUNE_TIMEOUT to wait longer)"
                            % (where, timeout), "timeout")
    if isinstance(reason, socket.gaierror):
        return NetworkError("cannot resolve host of %s: %s" % (where, reason), "dns")
    if isinstance(reason, ConnectionRefusedError):
        return NetworkError("cannot connect to %s: connection refused (is the %s running?)"
                            % (where, "proxy" if proxy else "server"), "refused")
    if isinstance(reason, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)) or \
            type(reason).__name__ in ("RemoteDisconnected", "IncompleteRead", "BadStatusLine"):
        return NetworkError("connection to %s was closed unexpectedly (%s)"
                            % (where, type(reason).__name__), "reset")
    return NetworkError("cannot talk to %s: %s" % (where, getattr(reason, "strerror", None) or reason))


def wait_for_health(http, session):
    """GET /health until it answers 2xx (the transport already retries refused, DNS and
    502-504 until the deadline); NetworkError (exit 5) when the deadline passes first."""
    backoff = Backoff(0.25, 1.6, 5.0, http.wait_deadline)
    while True:
        try:
            resp = session.transport.request(HttpRequest("GET", session.url("/health")))
            if resp.ok:
                return resp
            error = api_error(resp)
        except NetworkError as e:
            error = e
        if backoff.left() <= 0:
            raise NetworkError("%s did not become healthy within %gs: %s"
                               % (session.api_url, http.wait_seconds, error))
        http.announce_wait(session.api_url)
        backoff.sleep()


def wrong_url_hint(api_url, resp):
    """What a 404 or 405 says about the API URL itself, or '': one that ends in /api/v1 (which
    attune.py adds), or one with a path whose server answered with something else than
    Attune's JSON (a web page: the address of the site, not of its API)."""
    path = api_url.partition("://")[2].partition("/")[2].rstrip("/").lower()
    segments = path.split("/")
    if segments[-1] == "api" or segments[-2:] == ["api", "v1"]:
        return ("; the API URL %s ends in /%s, which attune.py adds itself: give the server's address alone, "
                "such as https://attune.example.com" % (quoted(api_url), "api" if segments[-1] == "api" else "api/v1"))
    if path and not (resp.headers or {}).get("Content-Type", "").startswith("application/json"):
        return ("; the server at %s answered with something else than Attune's API: is /%s part of the "
                "API's address?" % (quoted(api_url), path))
    return ""


# === Choosing the profile, the URL and the credentials =======================

class Selection:
    """The profile, API URL and tokens one session works with, each with where it came
    from: 'flag', 'env', 'file' or 'default', or 'command' for a profile or URL the command
    itself names (auth status --all, login --save-profile); the tokens carry their own."""
    __slots__ = ("profile", "profile_source", "api_url", "api_url_source", "creds", "ca_bundle")

    def __init__(self, profile, profile_source, api_url, api_url_source, creds, ca_bundle=(None, None)):
        self.profile, self.profile_source = profile, profile_source
        self.api_url, self.api_url_source = api_url, api_url_source
        self.creds = creds
        self.ca_bundle = ca_bundle  # (path, source): the TLS settings of this profile's requests


class Choice:
    """The precedence rules the README gives, applied to this run's flags, environment and
    credential file: select() resolves them once into the Selection a session works with."""

    def __init__(self, args, env, store, config_path, config_source):
        self.args = args
        self.env = env
        self.store = store
        self.config_path, self.config_source = config_path, config_source
        self.named = getattr(args, "profile", None)  # -p/--profile: read here and nowhere else
        if self.named == "":
            raise UsageError("-p/--profile needs a profile name")
        self._profile = None

    def select(self, profile=None, api_url=None, use_env=True):
        """The Selection for a session: this run's profile, or the one the command names;
        that profile's URL unless the command gives one; the tokens that go with both."""
        if profile is None:
            profile, profile_source = self.profile_source
        else:
            profile_source = "command"
        entry = self.store.profile(profile)  # the profile's stored entry: read once for all of the selection
        if api_url is None:
            api_url, api_url_source = self.api_url_for(profile, entry)
        else:
            api_url_source = "command"
        api_url = api_url.rstrip("/")
        return Selection(profile, profile_source, api_url, api_url_source,
                         self.credentials_for(profile, entry, use_env, api_url), self.ca_bundle(entry))

    @property
    def profile(self):
        return self.profile_source[0]

    @property
    def profile_source(self):
        """(name, 'flag'|'env'|'file'|'default'), checked to exist unless the command creates it."""
        if self._profile is None:
            if self.named:
                name, source = self.named, "flag"
            elif self.env.get("ATTUNE_PROFILE"):
                name, source = self.env["ATTUNE_PROFILE"], "env"
            elif self.store.current_profile():
                name, source = self.store.current_profile(), "file"
            else:
                name, source = DEFAULT_PROFILE, "default"
            if not getattr(self.args, "creates_profile", False):
                self.require_profile(name, source)
            self._profile = (name, source)
        return self._profile

    def require_profile(self, name, source="flag"):
        if name == DEFAULT_PROFILE or self.store.profile(name) is not None:
            return
        known = sorted(set(self.store.profiles()) | {DEFAULT_PROFILE})
        where = " (current_profile in %s)" % self.config_path if source == "file" else ""
        raise ConfigError("Profile %s does not exist%s; known profiles: %s; to create it: attune config "
                          "add-profile %s --api-url URL"
                          % (quoted(name, 64), where, ", ".join(terminal_safe(k[:64], keep="") for k in known),
                             shell_quote(terminal_safe(name[:64], keep=""))))

    def own_url(self, profile, entry):
        """The API URL profile itself names, the one origin its stored tokens belong to: its
        api_url, or the default for a profile not stored. ConfigError when the entry names none."""
        if entry is None:
            return DEFAULT_API_URL
        if entry.get("api_url") is None:
            raise ConfigError("profile '%s' in %s has no api_url; run: attune config set api_url URL"
                              % (profile, self.config_path))
        return check_api_url(entry["api_url"], "profile '%s' in %s" % (profile, self.config_path))

    def api_url_for(self, profile, entry=None):
        """(url, source): --api-url > ATTUNE_API_URL > the profile's own (own_url) > the default."""
        if getattr(self.args, "api_url", None):
            return check_api_url(self.args.api_url, "--api-url"), "flag"
        if self.env.get("ATTUNE_API_URL"):
            return check_api_url(self.env["ATTUNE_API_URL"], "ATTUNE_API_URL"), "env"
        entry = self.store.profile(profile) if entry is None else entry
        return self.own_url(profile, entry), "default" if entry is None else "file"

    def credentials_for(self, profile, entry, use_env=True, api_url=None):
        """Tokens: with --profile, the profile's stored tokens; otherwise (auth exec --keep-fresh's
        file) > ATTUNE_SENSOR_TOKEN_STATE_PATH > ATTUNE_API_TOKEN (ATTUNE_AUTH_TOKEN) >
        ATTUNE_TOKEN_FILE > stored; a token Attune issued says so (platform). Stored tokens go only to the
        origin of the profile's own URL: for another api_url, or when the entry names no
        usable one, none (Credentials.withheld says whose they are). Environment tokens go
        wherever the user points them."""
        env = self.env
        if use_env and not self.named:
            refresh = env.get("ATTUNE_REFRESH_TOKEN") or None
            keep_fresh = env.get("ATTUNE_KEEP_FRESH")
            if keep_fresh and keep_fresh == env.get("ATTUNE_TOKEN_FILE"):  # under auth exec --keep-fresh
                return Credentials.from_token(read_token_file(keep_fresh), "token_file", keep_fresh, refresh)
            platform = None if refresh else platform_issuer(env)
            state = env.get("ATTUNE_SENSOR_TOKEN_STATE_PATH")
            creds = None
            for name in ("ATTUNE_API_TOKEN", "ATTUNE_AUTH_TOKEN"):
                if env.get(name):
                    try:
                        creds = Credentials.from_token(env[name], "env", name, refresh)
                    except ConfigError:
                        if not state:  # beside a state file, a bad one is only a fallback that is missing
                            raise
                    break
            if creds is not None:
                creds.platform = platform
                expiry = next((time_epoch(env[n]) for n in EXPIRY_VARIABLES if env.get(n)), None)
                creds.access_expires_at = expiry or creds.access_expires_at
            if state:
                return platform_credentials(state, creds, platform or platform_issuer(env))
            if creds is not None:
                return creds
            if env.get("ATTUNE_TOKEN_FILE"):
                path = env["ATTUNE_TOKEN_FILE"]
                return Credentials.from_token(read_token_file(path), "token_file", path, refresh)
        stored = Credentials.from_profile(profile, entry)
        if api_url is None or not (stored.access or stored.refresh):
            return stored
        try:
            home = self.own_url(profile, entry)
        except ConfigError:  # no usable origin of its own: the tokens go nowhere
            home = "(no usable api_url)"
        if url_origin(api_url) != url_origin(home):
            return Credentials(source="file", origin=profile, withheld=home)
        return stored

    def ca_bundle(self, entry):
        """(path, source) of extra CAs for the requests of the profile whose stored entry this
        is: --ca-bundle > ATTUNE_CA_BUNDLE > the entry's ca_bundle."""
        if getattr(self.args, "ca_bundle", None):
            return self.args.ca_bundle, "flag"
        if self.env.get("ATTUNE_CA_BUNDLE"):
            return self.env["ATTUNE_CA_BUNDLE"], "env"
        stored = (entry or {}).get("ca_bundle")
        return (stored, "file") if isinstance(stored, str) and stored else (None, None)


# === Lists and executions: what a session walks and waits for ================

TERMINAL_STATUSES = ("completed", "succeeded", "failed", "canceled", "cancelled", "timeout",
                     "timed_out", "abandoned")
SUCCESS_STATUSES = ("completed", "succeeded")
ALL_PAGE_SIZE = 100  # the biggest page the server hands out
WATCH_TIMEOUT = 300  # seconds a watch waits for an execution unless told otherwise
EXECUTION_POLL = (0.2, 1.5, 2.0)  # first interval, growth, longest interval of GET /executions/{id}


def json_kind(value):
    """'a string', 'null', ... for messages about answers of the wrong shape."""
    for kinds, name in ((bool, "true or false"), (str, "a string"), ((int, float), "a number"),
                        (list, "an array"), (dict, "an object")):
        if isinstance(value, kinds):
            return name
    return "null"


def list_items(body, objects=True):
    """The items of a list answer: {"items": [...]}, a {"data": [...]} envelope, or an
    array; with objects, each item must be a JSON object (a resource)."""
    items = body if isinstance(body, list) else None
    if isinstance(body, dict):
        items = next((body[key] for key in ("items", "data") if isinstance(body.get(key), list)), None)
    if items is None:
        raise ApiError("the server's answer is not a list: %s" % snippet(json.dumps(body).encode("utf-8"), 100))
    if objects and not all(isinstance(item, dict) for item in items):
        wrong = next(item for item in items if not isinstance(item, dict))
        raise ApiError("the server's list holds %s where objects belong: %s"
                       % (json_kind(wrong), snippet(json.dumps(wrong).encode("utf-8"), 100)))
    return items


def pagination_of(body):
    """The pagination object of a list answer, or None (a bare array has none)."""
    return body.get("pagination") if isinstance(body, dict) else None


class ListWalk:
    """The items of a paginated list, a page read each time the last one is used up, so that
    a walk of every page (--all) holds one page at a time. every_page walks has_next from
    page 1 with the biggest pages the server allows; until(item) true for an item of a page
    stops the walk after that page. Once walked, pagination is that of the last page read."""

    def __init__(self, session, path, query=None, size_param="page_size", every_page=False, objects=True,
                 until=None):
        self.session, self.path, self.query = session, path, dict(query or {})
        self.size_param, self.every_page, self.objects, self.until = size_param, every_page, objects, until
        self.pagination = None

    def __iter__(self):
        query, page, previous, walked = dict(self.query), 1, None, 0
        while True:
            if self.every_page:
                query.update({"page": page, self.size_param: ALL_PAGE_SIZE})
            body = self.session.call("GET", self.path, query=query)
            chunk = list_items(body, self.objects)
            check_next_page(self.path, page, chunk, previous, walked)
            walked += len(chunk)
            self.pagination = pagination_of(body)
            for item in chunk:
                yield item
            more = isinstance(self.pagination, dict) and self.pagination.get("has_next") is True
            if not (self.every_page and more and chunk) or (
                    self.until is not None and any(map(self.until, chunk))):
                return
            page, previous = page + 1, chunk


def fetch_list(session, path, query=None, size_param="page_size", every_page=False, objects=True, until=None):
    """A paginated list read whole: (items, pagination of the last page read); see ListWalk."""
    walk = ListWalk(session, path, query, size_param, every_page, objects, until)
    return list(walk), walk.pagination


LIST_ITEM_LIMIT = 200000  # items of one list walked page by page (--all)


def check_next_page(path, page, chunk, previous, walked):
    """A page walk ends: a page that repeats the one before (a server that ignores `page`) or a
    list past LIST_ITEM_LIMIT items is a server error (exit 6), not a walk without end."""
    if previous is not None and chunk == previous:
        raise ServerError("page %d of %s repeats page %d (the server ignores the page number); stopped"
                          % (page, path, page - 1))
    if walked + len(chunk) > LIST_ITEM_LIMIT:
        raise ServerError("%s still says has_next after %d items on %d pages, more than attune.py walks (%d); "
                          "narrow the list with its filters" % (path, walked, page - 1, LIST_ITEM_LIMIT))


PER_PAGE_LISTS = ("/executions", "/keys", "/events", "/enforcements", "/audit-events", "/artifacts")


def page_size_param(path):
    """The page-size query parameter of a list endpoint: most say page_size, a few per_page."""
    path = path.split("?")[0]
    path = path[len("/api/v1"):] if path.startswith("/api/v1") else path
    return "per_page" if path.startswith(PER_PAGE_LISTS) else "page_size"


def wait_timed_out(error, deadline, timeout, execution_id):
    """A request that was still waiting for its answer when a wait's deadline came (the deadline
    shortens every request) ends the wait as its timeout does (exit 1), not as a network error."""
    if error.kind == "timeout" and time.monotonic() >= deadline:
        return AttuneError("timed out after %gs waiting for execution %d (the server had not answered in the "
                           "time left)" % (timeout, execution_id))
    return error


def poll_execution(session, execution_id, timeout, deadline=None, pause=time.sleep, on_status=None):
    """The execution once its status is terminal: GET /executions/{id} at a growing interval,
    on_status(status) after each answer that is not the end, pause(seconds) between them. An
    AttuneError (exit 1) when timeout seconds (or the deadline, a time.monotonic() value) pass
    first."""
    backoff = Backoff(EXECUTION_POLL[0], EXECUTION_POLL[1], EXECUTION_POLL[2],
                      time.monotonic() + timeout if deadline is None else deadline)
    while True:
        try:
            execution = session.fetch("GET", "/executions/%d" % execution_id)
        except NetworkError as e:
            raise wait_timed_out(e, backoff.deadline, timeout, execution_id)
        status = str(execution.get("status") or "")
        if status.lower() in TERMINAL_STATUSES:
            return execution
        if on_status is not None:
            on_status(status)
        delay = backoff.next_delay()
        if delay is None:
            raise AttuneError("timed out after %gs waiting for execution %d (status '%s')"
                              % (timeout, execution_id, status))
        pause(delay)


# === Session: tokens and refresh =============================================

def read_token_state(path):
    """(token, expiry) from a managed sensor's token state file: the JSON object
    {"token": ..., "expires_at": RFC 3339} (aliases api_token, token_expires_at) that Attune's
    sensor runtime rewrites atomically before the token expires."""
    where = "token state file %s (ATTUNE_SENSOR_TOKEN_STATE_PATH)" % terminal_safe(path)
    try:
        data = parse_json(read_regular_file(path, TOKEN_FILE_LIMIT)[0].decode("utf-8"))
    except (OSError, UnicodeError, ValueError) as e:
        raise ConfigError("cannot read the %s: %s" % (where, getattr(e, "strerror", None) or "not JSON"))
    data = data if isinstance(data, dict) else {}
    token = check_token(data.get("token") or data.get("api_token") or "", where)
    expires = data.get("expires_at", data.get("token_expires_at"))
    return token, jwt_expiry(token) if expires is None else time_epoch(expires)


def platform_credentials(path, fallback, platform):
    """A managed sensor's tokens, read again on every call: the state file's; when it cannot be
    read, the environment's token (fallback); a ConfigError naming both when neither works."""
    try:
        token, expires_at = read_token_state(path)
        creds = Credentials(token, None, expires_at, source="state_file", origin=path)
    except ConfigError as e:
        if fallback is None:
            raise ConfigError("%s, and ATTUNE_API_TOKEN holds no token to use instead" % e)
        creds = Credentials(fallback.access, None, fallback.access_expires_at, source="env", origin=fallback.origin)
    creds.state_path, creds.fallback, creds.platform = path, fallback, platform
    return creds


def platform_issuer(env):
    """What Attune issued the environment's token for, when attune.py runs inside Attune (a
    sensor or an action it started): 'sensor core.timer', 'execution 42'; None elsewhere."""
    for name, what in (("ATTUNE_SENSOR_REF", "sensor"), ("ATTUNE_SENSOR_ID", "sensor"),
                       ("ATTUNE_EXEC_ID", "execution")):
        if env.get(name):
            return "%s %s" % (what, terminal_safe(env[name][:100], keep=""))
    return "a sensor" if env.get("ATTUNE_SENSOR_TOKEN_STATE_PATH") else None


def read_token_file(path):
    """The token in the file ATTUNE_TOKEN_FILE names (a regular file of at most 64 KiB)."""
    try:
        token = read_regular_file(path, TOKEN_FILE_LIMIT)[0].decode("utf-8")
    except (OSError, UnicodeError) as e:
        raise ConfigError("cannot read token file %s (ATTUNE_TOKEN_FILE): %s"
                          % (terminal_safe(path), getattr(e, "strerror", None) or "not UTF-8 text"))
    return check_token(token, "token file %s (ATTUNE_TOKEN_FILE)" % terminal_safe(path))


def token_pair(data, sent_at, received_at, old_refresh=None, old_refresh_expiry=None):
    """Tokens and expiries from a login or refresh answer. The access expiry is
    send time + expires_in on our own clock, so server clock skew does not matter."""
    if not isinstance(data, dict) or not data.get("access_token"):
        raise ApiError("the server's answer has no access token; stored tokens are unchanged")
    access = check_token(data["access_token"], "the server's answer", ApiError)  # junk stores nothing
    expires_in = epoch(data.get("expires_in"))
    access_expires_at = int(sent_at) + expires_in if expires_in and expires_in > 0 else jwt_expiry(access)
    refresh = data.get("refresh_token")
    if refresh:
        refresh = check_token(refresh, "the server's answer", ApiError)
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


def unwrap(resp):
    """The object in a 2xx {"data": {...}} answer; a clear ApiError for anything else."""
    body = resp.json()
    if isinstance(body, dict) and isinstance(body.get("data"), dict):
        return body["data"]
    what = "an empty body" if body is None else "no \"data\" object: %s" % snippet(resp.body, 100)
    raise ApiError("the server answered %d %s with %s" % (resp.status, resp.reason, what), resp.status)


def path_segment(value):
    from urllib.parse import quote
    return quote(as_given(str(value)), safe="")


class Session:
    """One profile's connection to the server: which token to send, and when and how
    to renew it. Each access token is refreshed at most once before it expires and once
    after a 401, so a run of any length renews every token it holds."""

    def __init__(self, selection, store, http, log, now):
        self.selection, self.store, self.http, self.log, self.now = selection, store, http, log, now
        self.profile, self.api_url = selection.profile, selection.api_url
        self.creds = selection.creds  # replaced by each refresh
        # Each access token is refreshed at most once before it expires and once after a 401,
        # so a command that runs for hours renews every token it holds, and no more.
        self._proactive_for = None  # the access token a proactive refresh was tried for
        self._proactive_retry_at = 0.0  # after a transient failure: when to try again
        self._reactive_for = None  # the access token a 401 led to a refresh for
        self._transport = None

    @property
    def transport(self):
        if self._transport is None:
            self._transport = Transport(self.http, self.selection.ca_bundle)
        return self._transport

    def url(self, path, query=None):
        if not path.startswith("/"):
            path = "/" + path
        if not path.startswith(("/auth", "/health", "/api/")):
            path = "/api/v1" + path
        if query:
            from urllib.parse import urlencode
            pairs = [(k, as_given_data(v)) for k, v in query.items() if v is not None]
            if pairs:
                path += ("&" if "?" in path else "?") + urlencode(pairs, doseq=True)
        return self.api_url + path

    # -- the token to send -----------------------------------------------------
    def expired_error(self):
        """The AuthError for tokens that are expired (or rejected) and cannot be renewed."""
        c = self.creds
        if c.platform:
            return self.platform_error("has expired or was rejected")
        if c.source == "env":
            return AuthError("the access token in %s has expired or was rejected; set a fresh one%s"
                             % (c.origin, "" if c.refresh else " or ATTUNE_REFRESH_TOKEN"))
        if c.source == "token_file":
            return AuthError("the access token in %s (ATTUNE_TOKEN_FILE) has expired or was "
                             "rejected" % c.origin)
        return session_expired(self.profile)

    def platform_error(self, what):
        c = self.creds
        return AuthError("the access token Attune issued for %s (%s) %s; Attune issues these tokens itself and "
                         "attune.py never renews one" % (c.platform, describe_source(c.source, c.origin), what))

    def no_session(self):
        """The AuthError for a command that needs a session this run does not have."""
        if self.creds.withheld:
            return AuthError("profile '%s' is logged in to %s, and its tokens are sent nowhere else; for "
                             "%s run: attune auth login --url %s --save-profile NAME (or set "
                             "ATTUNE_API_TOKEN)" % (self.profile, terminal_safe(self.creds.withheld),
                                                    terminal_safe(self.api_url), terminal_safe(self.api_url)))
        homeless = self.store.homeless()
        if homeless:  # auth login could not store a session here: say what works instead
            return AuthError("Not logged in, and no session can be stored here (%s); give a token in "
                             "ATTUNE_API_TOKEN or ATTUNE_TOKEN_FILE, or a credential file with --config FILE or "
                             "ATTUNE_CONFIG" % homeless)
        return not_logged_in()

    def token(self, min_ttl=0):
        """The access token to send, refreshed first when it has less than
        max(margin, min_ttl) left. A valid token costs no request at all."""
        c = self.creds
        if c.state_path:  # a managed sensor: its runtime rotates the file, so read it for every request
            c = self.creds = platform_credentials(c.state_path, c.fallback, c.platform)
        if not c.access:
            raise self.no_session()
        now = self.now()
        if not c.refresh_due(now, min_ttl):
            return c.access
        left = c.access_left(now)
        if self._proactive_for == c.access and now < self._proactive_retry_at:
            return c.access  # this token's refresh failed a moment ago: try again later
        self._proactive_for = c.access
        if c.invalidated_at or not c.refresh_usable(now):  # no refresh possible
            if left > 0 and left >= min_ttl:
                return c.access
            if left > 0:
                raise AuthError("the access token has %s left, less than --min-ttl %ds, and cannot "
                                "be refreshed (%s)" % (format_duration(left), min_ttl,
                                                       describe_source(c.source, c.origin)))
            raise self.expired_error()
        self.log("access token for profile '%s' %s (refresh margin %ds); refreshing"
                 % (self.profile, describe_expiry(c.access_expires_at, now), refresh_margin(c.lifetime)))
        try:
            self.refresh()
        except (NetworkError, ApiError, ConfigError) as e:  # down, 5xx, a junk answer, a file that
            # cannot be written (found out before the refresh was sent): nothing was stored
            if left > STILL_USABLE:
                self._proactive_retry_at = now + max(1.0, (left - STILL_USABLE) / 2)
                self.log("refresh failed (%s); the current token is still valid for %s"
                         % (e, format_duration(left)))
                return c.access
            raise
        return self.creds.access

    # -- compare-and-refresh ---------------------------------------------------
    def refresh(self):
        """Renew the tokens: the one refresh path for proactive, reactive and `auth refresh`."""
        if self.creds.withheld:
            raise self.no_session()
        if self.creds.platform:  # Attune issues it: never a refresh, only the state file read again
            fresh = self.creds.state_path and platform_credentials(self.creds.state_path, self.creds.fallback,
                                                                   self.creds.platform)
            if not fresh or fresh.access == self.creds.access:
                raise self.expired_error()
            self.creds = fresh
        elif self.creds.source == "file":
            self._refresh_stored()
        elif self.creds.source == "token_file":
            fresh = read_token_file(self.creds.origin)
            if fresh != self.creds.access:  # rotated by an agent since we read it
                self.creds = Credentials.from_token(fresh, "token_file", self.creds.origin,
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
        store, started, name = self.store, self.creds, self.profile

        def refreshed_meanwhile():  # a lock-free look: writes are atomic renames
            return not self.stored_credentials().same_tokens(started)

        # while another process holds the lock (most likely refreshing these very tokens),
        # stop waiting as soon as the file shows its new tokens: 50 waiters then go on at
        # once instead of taking the lock one after another only to learn that
        with store.lock(refreshed_meanwhile):
            stored = self.stored_credentials()
            if not stored.same_tokens(started):
                if not stored.access:
                    raise not_logged_in()
                self.log("profile '%s' was refreshed by another process; using its token" % name)
                self.creds = stored
                return
            now = self.now()
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
            self.log("stored new tokens for profile '%s'; access token %s"
                     % (name, describe_expiry(self.creds.access_expires_at, self.now())))

    def stored_credentials(self):
        self.store.reload()
        return Credentials.from_profile(self.profile, self.store.profile(self.profile))

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
        if not c.refresh_usable(self.now()):
            raise self.expired_error()
        pair = self._post_refresh(c)
        if pair is None:
            raise AuthError("the refresh token in ATTUNE_REFRESH_TOKEN was rejected by the server")
        self.creds = Credentials(pair["auth_token"], pair["refresh_token"], pair["auth_token_expires_at"],
                                 pair["refresh_token_expires_at"], c.source, c.origin)

    def _post_refresh(self, creds):
        """POST /auth/refresh: the new tokens, or None when the server rejects the refresh
        token (400/401/403/422). Network and 5xx failures raise and change nothing."""
        sent_at = self.now()
        body = json.dumps({"refresh_token": creds.refresh}).encode("utf-8")
        resp = self.transport.request(HttpRequest("POST", self.url("/auth/refresh"), body))
        if resp.status in (400, 401, 403, 422):
            self.log("refresh token rejected: %s" % error_message(resp))
            return None
        resp.check()
        try:
            data = envelope_data(resp.json())
        except ApiError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
            raise ApiError("the server's answer to the token refresh is not understood (%s); "
                           "stored tokens are unchanged" % snippet(resp.body, 80), resp.status)
        return token_pair(data, sent_at, self.now(), creds.refresh, creds.refresh_expires_at)

    # -- requests --------------------------------------------------------------
    def request(self, method, path, body=None, query=None, auth=True, raw_body=None,
                content_type="application/json", stream=None, timeout=None, reactive=True):
        """Send a request; on a 401 with token T, compare-and-refresh and retry once with
        the same bytes. A second 401 means authentication is required (exit 4). reactive=False:
        a 401 is the caller's to read (a route whose 401 judges a password, not the token)."""
        if self.http.wait_deadline is not None and self.api_url not in self.http.ready:
            wait_for_health(self.http, self)  # --wait-for-server: once per server and run
            self.http.ready.add(self.api_url)
        url = self.url(path, query)
        data = raw_body if raw_body is not None else (
            None if body is None else json.dumps(as_given_data(body)).encode("utf-8"))
        token = self.token() if auth and self.creds.access else None
        request = HttpRequest(method, url, data, token, content_type, stream, timeout)
        resp = self.transport.request(request)
        if resp.status in (404, 405):
            resp.hint = wrong_url_hint(self.api_url, resp)
        if resp.status != 401 or not token or not reactive:
            if resp.status == 401 and auth and reactive:
                raise self.no_session()
            return resp
        if self._reactive_for == token:
            raise AuthError("the server rejected the token (%s); run: attune auth login --profile %s"
                            % (error_message(resp), self.profile))
        self._reactive_for = token
        self.log("401 from the server; refreshing and retrying once")
        self.refresh()
        resp = self.transport.request(request.with_token(self.creds.access))
        if resp.status == 401:
            raise AuthError("the server rejected the refreshed token too (%s); run: attune auth "
                            "login --profile %s" % (error_message(resp), self.profile))
        return resp

    def call(self, method, path, body=None, query=None, auth=True):
        """request() for JSON APIs: the parsed body of a 2xx answer, or the matching error."""
        resp = self.request(method, path, body, query, auth)
        resp.check()
        return resp.json()

    def fetch(self, method, path, body=None, query=None, timeout=None):
        """request() for one resource: the object of its {"data": ...} answer."""
        resp = self.request(method, path, body, query, timeout=timeout)
        resp.check()
        return unwrap(resp)

    # -- for Python code: the surface attune.session() documents ----------------
    def get(self, path, params=None):
        """GET path (/packs, /api/v1/packs, /auth/me): the answer's data, parsed."""
        return self.send("GET", path, None, params)

    def post(self, path, json=None, params=None):
        return self.send("POST", path, json, params)

    def put(self, path, json=None, params=None):
        return self.send("PUT", path, json, params)

    def patch(self, path, json=None, params=None):
        return self.send("PATCH", path, json, params)

    def delete(self, path, json=None, params=None):
        return self.send("DELETE", path, json, params)

    def send(self, method, path, body=None, params=None):
        """A JSON request through this session (its refresh, origin rule, deadline and size
        bounds): the data of the answer's {"data": ...} envelope, or the whole answer when it
        has none, or None for an empty one; an error status raises ApiError or ServerError."""
        resp = self.request(method, path, body, params)
        resp.check()
        return envelope_data(resp.json())

    def paginate(self, path, params=None):
        """Every item of a paginated list, a page requested each time the last is used up."""
        return iter(ListWalk(self, path, params, page_size_param(path), every_page=True, objects=False))

    def run(self, action_ref, parameters=None, wait=False, timeout=None):
        """Start action_ref with parameters: the new execution, or with wait, the finished one
        (whatever its status) once it ends; AttuneError when timeout seconds (default 300)
        pass first."""
        execution = self.fetch("POST", "/executions/execute",
                               {"action_ref": action_ref, "parameters": dict(parameters or {})})
        if not wait:
            return execution
        return poll_execution(self, int(execution["id"]), WATCH_TIMEOUT if timeout is None else timeout)


# === attune as a Python module: session() ====================================
# The command line's sessions for Python code: a script beside a copied attune.py, or any
# program once attune is installed. Below the command line nothing prints, prompts or ends
# the process: it returns or raises. What attune.py would warn about or log under -v goes to
# the logger "attune", silent unless the program configures logging.

class ModuleChoices:
    """What the command line's flags say, for a session() made from Python."""

    def __init__(self, profile, api_url):
        if profile is not None and not isinstance(profile, str):
            raise UsageError("profile must be a string")
        self.profile, self.api_url = profile, api_url


def session(profile=None, api_url=None):
    """A Session for the profile chosen as the command line chooses it (profile, else
    ATTUNE_PROFILE, else the file's current profile), with the same URL and token precedence,
    origin rule, lock, refresh and bounds. The environment is read now, not at import."""
    import logging
    logger = logging.getLogger("attune")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())  # a library says nothing unless asked
    warn, log, note = (lambda message: logger.warning(SECRETS.mask(message)),  # masked as the
                       lambda message: logger.debug(SECRETS.mask(message)),  # command line's
                       lambda message: logger.info(SECRETS.mask(message)))  # output is
    env, deadline = os.environ, CommandDeadline()
    store, source = open_store(None, env, warn, log, "attune (python)", deadline)
    choice = Choice(ModuleChoices(profile, api_url), env, store, store.path, source)
    http = HttpSettings(env, request_timeout(env), False, None, 0, log, note, deadline)
    return Session(choice.select(), store, http, log, time.time)


def open_store(config, env, warn, log, command, deadline):
    """(the CredentialStore, what chose its path) for --config (or None) and the environment."""
    path, source = credential_path(config, env)
    store = CredentialStore(path, warn, log, env_seconds(env, "ATTUNE_LOCK_TIMEOUT", LOCK_TIMEOUT, 0), command,
                            deadline, creation_root(source, env))
    return store, source


def request_timeout(env):
    """Seconds each HTTP request may take: ATTUNE_TIMEOUT, or 60."""
    return env_seconds(env, "ATTUNE_TIMEOUT", HTTP_TIMEOUT, 0.001)


# === Output ==================================================================

# The symbols of table output; write_text() swaps them for ASCII where the terminal lacks them.
CHECK, CROSS, INFO, CAUTION = "\u2713", "\u2717", "\u2139", "\u26a0"
ELLIPSIS, BULLET, RULE = "\u2026", "\u2022", "\u2500"
ASCII_FALLBACK = ((CHECK, "OK"), (CROSS, "x"), (INFO, "i"), (CAUTION, "!"), (ELLIPSIS, "..."), (BULLET, "*"),
                  (RULE, "-"))


class OutputError(AttuneError):
    """Standard output is closed, full or failing: the result cannot be delivered."""


class StandardStream:
    """sys.stdout or sys.stderr for one run, as main() sets them: closed (None), full or
    failing streams give an error line and exit 1 instead of a traceback. A failing stderr
    has no one to tell: what it cannot take is dropped. A closed pipe (BrokenPipeError)
    stays what it is: main() ends quietly."""

    def __init__(self, stream, name):
        self.stream, self.name = stream, name

    def write(self, text):
        return self._do("write", text)

    def flush(self):
        return self._do("flush")

    def _do(self, method, *args):
        if self.stream is None:
            if self.name == "stdout" and args:
                raise OutputError("cannot write the output: standard output is closed")
            return len(args[0]) if args else None
        try:
            return getattr(self.stream, method)(*args)
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as e:  # ValueError: a file closed under us
            if isinstance(e, UnicodeError):
                raise
            if self.name == "stderr":
                return None
            raise OutputError("cannot write the output: %s" % (getattr(e, "strerror", None) or e))

    def __getattr__(self, name):  # encoding, isatty, fileno, buffer: the stream's own
        if self.stream is None:
            raise AttributeError(name)
        return getattr(self.stream, name)


def write_text(stream, text, raw=False):
    """Write text to a terminal or a pipe: control characters escaped (unless raw: an
    action's own log output), and if the stream's encoding cannot carry it (LANG=C on
    Python 3.6), ASCII stand-ins for our symbols and escapes for the rest, never a crash."""
    text = SECRETS.mask(text)
    if not raw:
        text = terminal_safe(text)
    try:
        stream.write(text)
    except UnicodeEncodeError:
        for symbol, plain in ASCII_FALLBACK:
            text = text.replace(symbol, plain)
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding))


def say(stream, line):
    """One line of a message: whatever it quotes from outside, newlines included, stays on it.
    Flushed at once: before Python 3.9, stderr into a pipe is block-buffered, and a warning
    such as 'waiting for another attune process' must not wait for the process to end."""
    write_text(stream, terminal_safe(line, keep="") + "\n")
    try:
        stream.flush()
    except (OSError, ValueError):
        pass


def shell_quote(text):
    """shlex.quote, without importing shlex (and re)."""
    safe = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-"
    if text and all(c in safe for c in text):
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"


def terminal_columns(stream, env):
    """The width of the terminal stream writes to; else COLUMNS; else None."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (AttributeError, ValueError, OSError):
        columns = 0
    if columns:  # a terminal that reports no size (0 x 0) has COLUMNS stand in
        return columns
    return parse_number(env.get("COLUMNS", ""), 1, 100000, integer=True)


def is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def can_redraw(stream, env):
    """May output to stream move the cursor or clear the screen (a status line rewritten in
    place, a redrawn list)? Only on a terminal that is not TERM=dumb (Emacs shells, some CI
    consoles, serial lines), which shows such codes as garbage."""
    return is_terminal(stream) and env.get("TERM") != "dumb"


# The controls json.dumps leaves raw (DEL, C1, bidirectional overrides), as \u escapes:
# the same data to any JSON or YAML reader, and nothing a terminal would act on.
UNICODE_CONTROL_ESCAPES = {c: "\\u%04x" % c for c in
                           list(range(0x7f, 0xa0)) + list(range(0x202a, 0x202f)) + list(range(0x2066, 0x206a))}


def to_json(data, ascii_only=False):
    return json.dumps(data, indent=2, ensure_ascii=ascii_only).translate(UNICODE_CONTROL_ESCAPES)


def cell_text(value):
    if value is None:
        return ""
    if value is True or value is False:
        return CHECK if value else CROSS
    if isinstance(value, (list, tuple)):
        return ", ".join(map(cell_text, value))
    if isinstance(value, dict):
        return SECRETS.mask(json.dumps(value, ensure_ascii=False))
    return terminal_safe(SECRETS.mask(" ".join(str(value).split("\n"))), keep="")


def parse_fields(text):
    """--fields a,b.c: the field names, or None when not given; a usage error before any request."""
    if text is None:
        return None
    fields = [part.strip() for part in text.split(",")]
    if any(not name or not all(c.isalnum() or c in "_-" for c in name) for f in fields for name in f.split(".")):
        raise UsageError("--fields takes field names separated by commas (ref,status or config.message), not %s"
                         % quoted(text))
    return fields


def field_of(item, name):
    """(True, value) of item's field name, a.b being the field b of the object in a; (False, None)
    when it is not there."""
    for part in name.split("."):
        if not isinstance(item, dict) or part not in item:
            return False, None
        item = item[part]
    return True, item


def pick_fields(data, fields):
    """The fields of a result (an object, or a list of them), in the order asked. A field no
    object of the answer has is a usage error that lists the ones it has."""
    items = data if isinstance(data, list) else [data]
    objects = [item for item in items if isinstance(item, dict)]
    missing = [f for f in fields if objects and not any(field_of(item, f)[0] for item in objects)]
    if missing:
        names = sorted({key for item in objects for key in item})
        raise UsageError("no field %s in the answer; its fields: %s" % (
            ", ".join(map(quoted, missing)), ", ".join(terminal_safe(n, keep="") for n in names)))

    def pick(item):
        return {f: field_of(item, f)[1] for f in fields} if isinstance(item, dict) else item
    return list(map(pick, data)) if isinstance(data, list) else pick(data)


# Columns of free text: cut first when a table is too wide, so that refs, ids and names stay whole.
FREE_TEXT_COLUMNS = frozenset(("Description", "Label", "Display name", "Prompt", "Tags", "Features", "Value",
                               "Result", "Payload"))


def fit_widths(widths, limit, free=()):
    """Shrink columns until the row fits in limit characters: the free-text ones (indexes in
    free) first, down to 10 characters, then the widest of all, down to 6."""
    widths = list(widths)
    gaps = 2 * (len(widths) - 1)
    for floor, pool in ((10, free), (6, range(len(widths)))):
        while sum(widths) + gaps > limit:
            wide = [i for i in pool if widths[i] > floor]
            if not wide:
                break
            widths[max(wide, key=lambda i: widths[i])] -= 1
    return widths


def clip(text, width):
    # masked before it is cut: a cut secret would no longer be recognised
    text = SECRETS.mask(text) if isinstance(text, str) else cell_text(text)  # a wrong type is still data
    return text if len(text) <= width else text[:max(width - 1, 0)] + ELLIPSIS


def render_table(columns, rows, width=None):
    """Aligned columns under a header and a rule; cut with an ellipsis to fit width."""
    cells = [list(map(cell_text, row)) for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(columns)]
    if width:
        widths = fit_widths(widths, width, [i for i, name in enumerate(columns) if name in FREE_TEXT_COLUMNS])
    rule = [RULE * w for w in widths]
    return "\n".join(table_line(row, widths) for row in [list(columns), rule] + cells)


def table_line(cells, widths):
    """One line of a table: each cell cut or padded to its column's width."""
    return "  ".join(clip(text, w).ljust(w) for text, w in zip(cells, widths)).rstrip()


def render_pairs(pairs, width=None):
    """'Key   value' lines; multi-line values are indented under their first line."""
    keywidth = max([len(k) for k, _ in pairs] or [0])
    lines = []
    for key, value in pairs:
        text = value if isinstance(value, str) else cell_text(value)
        first, *rest = text.split("\n") if text else [""]
        lines.append((key + ":" if key else "").ljust(keywidth + 3) + first)
        lines.extend(" " * (keywidth + 3) + line for line in rest)
    return "\n".join(lines)


class Printer:
    """How to print: the streams, the output format, and the table-mode helpers.
    stdout carries results only; warnings, logs and notes go to stderr."""

    def __init__(self, args, env, stored_format):
        self.args = args
        self.env = env
        self.stdout, self.stderr, self.stdin = sys.stdout, sys.stderr, sys.stdin
        self.verbose = getattr(args, "verbose", 0) or 0
        self.stored_format = stored_format  # the credential file's format setting, read when needed
        # --output ndjson: the one command that writes it (cache entry scan --all) writes it
        # itself; everywhere else it is refused, and as a format it reads as json
        self.ndjson = getattr(args, "output", None) == "ndjson"
        if self.ndjson and getattr(args, "command_path", None) != ["cache", "entry", "scan"]:
            raise UsageError("--output ndjson is only supported by 'attune cache entry scan --all'")
        self._warned = set()
        self._printed = False
        self.fields = parse_fields(getattr(args, "fields", None))
        self.fields_used = False

    # -- messages --------------------------------------------------------------
    def warn(self, message):
        if message not in self._warned:
            self._warned.add(message)
            say(self.stderr, "attune: warning: " + message)

    def log(self, message):
        if self.verbose:
            say(self.stderr, "attune: " + message)

    def note(self, message):
        """Something worth knowing that is neither a result nor a problem (stderr)."""
        say(self.stderr, "attune: " + message)

    # -- results ---------------------------------------------------------------
    @property
    def output(self):
        args = self.args
        chosen = {v for v in (getattr(args, "output", None),
                              "json" if getattr(args, "json", False) else None,
                              "yaml" if getattr(args, "yaml", False) else None) if v}
        if len(chosen) > 1:
            raise UsageError("choose one output format: --output, -j/--json or -y/--yaml")
        if chosen:
            return "json" if self.ndjson else chosen.pop()
        stored = self.stored_format()
        return stored if stored in OUTPUT_FORMATS else "table"

    def emit(self, data, table=None):
        """Print a result: one JSON or YAML document, or the table rendering table() draws
        (JSON where there is none); with --fields, only those fields of it (a table of them
        for a list, key and value lines for one)."""
        if self.emit_unless_table(data, table is not None):
            table()

    def emit_unless_table(self, data, drawn=True):
        """emit() for a caller that draws the table itself: print data as JSON or YAML, or
        its --fields, and return True where the caller is to draw its table instead:
            if ctx.ui.emit_unless_table(rule):
                ctx.ui.pairs(...)"""
        fmt = self.output
        if self.fields is not None:
            self.fields_used = True
            data = pick_fields(data, self.fields)
            if fmt == "table" and data:  # an empty list keeps its 'No packs found'
                self.fields_table(data)
                return False
        if fmt == "table" and drawn:
            return True
        self.write_document(to_yaml if fmt == "yaml" else to_json, data)
        return False

    def fields_table(self, data):
        """What --fields shows in table mode: a column each, or 'field: value' lines for one object."""
        if isinstance(data, dict):
            self.out(render_pairs([(f, data[f]) for f in self.fields]))
        else:
            self.table(self.fields, [[item[f] for f in self.fields] if isinstance(item, dict) else [item]
                                     for item in data])

    def emit_items(self, items, table):
        """Print a list result that may come a page at a time (any iterable): in JSON and YAML
        an item at a time, the same text as emit() gives the whole list, holding no more than
        the page it came in; a table keeps only what table(items) keeps of each (its rows), and
        --fields, which looks at every item, the whole list. The number of items."""
        seen = [0]

        def counted():
            for item in items:
                seen[0] += 1
                yield item
        fmt = self.output
        if self.fields is not None:
            data = list(counted())
            if self.emit_unless_table(data):
                table(data)
        elif fmt == "table":
            table(counted())
        else:
            self.write_items(to_json if fmt == "json" else to_yaml, fmt, counted())
        return seen[0]

    def write_items(self, dump, fmt, items):
        """A JSON array or YAML sequence written an item at a time: each item is dumped as the
        one item of a list, and the pieces joined as the whole list's dump would join them."""
        first = True
        for item in items:
            item = SECRETS.mask_data(item)
            for ascii_only in (False, True):
                text = dump([item], ascii_only)
                piece = (("[\n" if first else ",\n") + text[2:-2]) if fmt == "json" else text + "\n"
                try:
                    self.stdout.write(piece)
                    break
                except UnicodeEncodeError:  # keep the document valid: escape instead of replace
                    if ascii_only:
                        raise
            first = False
        self.stdout.write("[]\n" if first else "\n]\n" if fmt == "json" else "")

    def write_document(self, dump, data, secrets_ok=False):
        """One JSON or YAML document, its known secrets masked (secrets_ok: `auth token`)."""
        data = data if secrets_ok else SECRETS.mask_data(data)
        try:
            self.stdout.write(dump(data) + "\n")
        except UnicodeEncodeError:  # keep the document valid: escape instead of replace
            self.stdout.write(dump(data, ascii_only=True) + "\n")

    def out(self, text=""):
        self._printed = True
        write_text(self.stdout, text + "\n")

    def success(self, message):
        if self.output == "table":
            self.out(CHECK + " " + terminal_safe(message, keep=""))

    def info(self, message):
        if self.output == "table":
            self.out(INFO + " " + terminal_safe(message, keep=""))

    def table(self, columns, rows, empty=None):
        if not rows and empty:
            self.info(empty)
        else:
            self.out(render_table(columns, rows, self.terminal_width()))

    def section(self, title):
        """A blank line (unless this is the first output), the title and a rule under it."""
        if self._printed:
            self.out()
        self.out(title)
        self.out(RULE * len(title))

    def pairs(self, pairs, title=None):
        if title:
            self.section(title)
        self.out(render_pairs(pairs))

    def terminal_width(self):
        """Tables are cut to fit a terminal; into a pipe or a file every cell is whole."""
        return terminal_columns(self.stdout, self.env) if is_terminal(self.stdout) else None


# === YAML: the writer and the reader =========================================
# Output (-o yaml) and input (definition files) in one place; both keep to JSON-shaped data.

# -- writing: block style, quoting only where a reader would take a scalar for something else --
YAML_WORDS = {"", "~", "null", "true", "false", "yes", "no", "on", "off", "y", "n"}
YAML_INDICATORS = "-?:,[]{}#&*!|>'\"%@`"


def yaml_needs_quotes(s):
    """True when YAML would read the plain scalar s as something other than this string."""
    if s.lower() in YAML_WORDS or s != s.strip() or s[0] in YAML_INDICATORS:
        return True
    if ": " in s or " #" in s or s.endswith(":") or any(map(is_control, s)):
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
    return "\n".join(yaml_lines(data, 0, ascii_only)).translate(UNICODE_CONTROL_ESCAPES)


# -- reading ---------------------------------------------------------------------
# Definition and request files (permission sets, queue items, workflows) are YAML, so
# attune.py reads the subset they use, strictly: block and flow mappings and sequences,
# plain, single- and double-quoted scalars, literal | and folded > blocks, comments, one
# document, the YAML 1.2 core schema (null, bool, int, float); JSON is YAML too. Keys are
# strings. Anchors, aliases, tags, directives, several documents, complex keys, duplicate
# keys and tabs in indentation are errors that say line:column, never a guess.

class YamlError(ValueError):
    pass


YAML_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v", "f": "\f",
                "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85",
                "_": "\xa0", "L": "\u2028", "P": "\u2029"}
YAML_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
YAML_MAX_DEPTH = 200


def yaml_plain_value(text):
    """A plain scalar by the YAML 1.2 core schema: null, true/false, int, float or the string."""
    import re
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE", "false", "False", "FALSE"):
        return text[0] in "tT"
    if re.match(r"[-+]?[0-9]+\Z", text):
        return int(text)
    if re.match(r"0o[0-7]+\Z", text):
        return int(text[2:], 8)
    if re.match(r"0x[0-9a-fA-F]+\Z", text):
        return int(text[2:], 16)
    if re.match(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?\Z", text):
        return float(text)
    if re.match(r"[-+]?\.(inf|Inf|INF)\Z", text):
        return float("-inf") if text[0] == "-" else float("inf")
    if text in (".nan", ".NaN", ".NAN"):
        return float("nan")
    return text


def yaml_fold(lines):
    """The lines of a folded (>) block as text: a break between two lines of text becomes a
    space, each empty line a break; more-indented lines keep their breaks."""
    text, previous, empties = "", None, 0
    for line in lines:
        if not line:
            empties += 1
            continue
        normal = line[0] not in " \t"
        if previous is None:
            text += "\n" * empties
        elif previous and normal:
            text += "\n" * empties if empties else " "
        else:
            text += "\n" * (empties + 1)
        text += line
        previous, empties = normal, 0
    return text


class YamlReader:
    """A recursive-descent reader over the whole text; self.pos is where it is. Each block
    node is read up to the first character of the next line with content (or the end)."""

    def __init__(self, text):
        if text.startswith("\ufeff"):
            text = text[1:]
        self.s = text.replace("\r\n", "\n").replace("\r", "\n")
        self.pos = self.depth = self.empty_lines = self.comment_lines = 0
        self.tab = None

    # -- where the reader is -----------------------------------------------------
    def fail(self, message, pos=None):
        pos = self.pos if pos is None else pos
        raise YamlError("%d:%d: %s" % (self.s.count("\n", 0, pos) + 1, self.column(pos) + 1, message))

    def column(self, pos=None):
        pos = self.pos if pos is None else pos
        return pos - (self.s.rfind("\n", 0, pos) + 1)

    def char(self, pos=None):
        pos = self.pos if pos is None else pos
        return self.s[pos] if pos < len(self.s) else ""

    def line_end(self, pos):
        end = self.s.find("\n", pos)
        return len(self.s) if end < 0 else end

    def separated(self, pos):
        """Is pos the end of the text, a space, a tab or a line break?"""
        return pos >= len(self.s) or self.s[pos] in " \t\n"

    def at_marker(self, marker="---"):
        return self.column() == 0 and self.s.startswith(marker, self.pos) and self.separated(self.pos + 3)

    def at_block_end(self, indent):
        """Has the block indented by indent ended at self.pos?"""
        return (self.pos >= len(self.s) or self.column() < indent or self.at_marker()
                or self.at_marker("..."))

    def at_entry(self):
        return self.char() == "-" and self.separated(self.pos + 1)

    def enter(self):
        self.depth += 1
        if self.depth > YAML_MAX_DEPTH:
            self.fail("nested more than %d levels deep" % YAML_MAX_DEPTH)

    # -- lines -----------------------------------------------------------------
    def skip_spaces(self):
        while self.char() in (" ", "\t") and self.char():
            self.pos += 1

    def end_of_line(self):
        """Only spaces and a comment may follow on this line; stops at its line break."""
        self.skip_spaces()
        if self.char() == "#" and (self.pos == 0 or self.s[self.pos - 1] in " \t\n"):
            self.pos = self.line_end(self.pos)
        if self.char() not in ("", "\n"):
            self.fail("unexpected %s after the value" % json.dumps(self.char()))

    def next_content(self):
        """From a line break (or a line's start), on to the first character of the next line
        that holds more than spaces and a comment; False at the end. Counts the empty lines
        (self.empty_lines) and comment lines (self.comment_lines) passed, and notes where a
        tab is among the line's leading blanks (self.tab, checked by check_indent())."""
        s = self.s
        self.empty_lines = self.comment_lines = 0
        self.tab = None
        while self.pos < len(s):
            if s[self.pos] == "\n":
                self.pos += 1
            start = self.pos
            self.skip_spaces()
            c = self.char()
            if c == "\n":
                self.empty_lines += 1
            elif c == "#":
                self.comment_lines += 1
                self.pos = self.line_end(self.pos)
            elif c:
                if "\t" in s[start:self.pos]:
                    self.tab = (start, s.index("\t", start))
                return True
        return False

    def check_indent(self, spaces=None):
        """Tabs cannot indent a line; a line that continues a plain scalar may have them
        after the spaces its indentation needs."""
        if self.tab and (spaces is None or self.tab[1] - self.tab[0] < spaces):
            self.fail("a tab cannot indent a line", self.tab[1])

    # -- the document ----------------------------------------------------------
    def document(self):
        import re
        bad = re.search("[\x00-\x08\x0b\x0c\x0e-\x1f]", self.s)  # DEL and C1 are data, as in JSON
        if bad:
            self.fail("control character U+%04X is not allowed" % ord(bad.group()), bad.start())
        if not self.next_content():
            return None
        self.check_indent()
        if self.char() == "%":
            self.fail("directives are not supported")
        value = None
        if self.at_marker():
            self.pos += 3
            self.skip_spaces()
            if self.char() not in ("", "\n", "#"):
                value = self.block_node(-1, inline=True)
            else:
                self.end_of_line()
                if self.next_content() and not self.at_marker() and not self.at_marker("..."):
                    self.check_indent()
                    value = self.block_node(-1)
        else:
            value = self.block_node(-1)
        if self.at_marker("..."):
            self.pos += 3
            self.end_of_line()
            self.next_content()
        if self.pos < len(self.s):
            self.check_indent()
            self.fail("only one document is allowed" if self.at_marker() else "unexpected content after the document")
        return value

    # -- block context -----------------------------------------------------------
    def block_node(self, indent, inline=False):
        """The node whose first character is at self.pos, in a block indented by indent;
        inline when it follows 'key:' on the same line (no block collection starts there)."""
        self.enter()
        c, start = self.char(), self.pos
        if c in ("&", "*", "!"):
            self.fail({"&": "anchors", "*": "aliases", "!": "tags"}[c] + " are not supported")
        if c == "?" and self.separated(start + 1):
            self.fail("complex keys are not supported")
        if self.at_entry():
            if inline:
                self.fail("a sequence cannot start on the line of its key")
            value = self.block_sequence(self.column())
        elif c in ("|", ">"):
            value = self.block_scalar(indent)
        elif self.key_ahead():
            if inline:
                self.fail("a mapping cannot start on the line of its key")
            value = self.block_mapping(self.column())
        elif c in ("[", "{", '"', "'"):
            value = self.flow_node() if c in "[{" else self.quoted()
            self.skip_spaces()
            if self.char() == ":":
                self.fail("complex keys are not supported" if c in "[{" else "a key must be on one line", start)
            self.end_of_line()
            self.next_content()
        else:
            value = self.plain_block(indent)
        self.depth -= 1
        return value

    def key_ahead(self):
        """Does 'key:' start here (a plain or one-line quoted scalar, ':', then a space)?"""
        s, pos = self.s, self.pos
        if s[pos] in "\"'":
            self.quoted()
            end, self.pos = self.pos, pos
            if "\n" in s[pos:end]:
                return False
            while end < len(s) and s[end] in " \t":
                end += 1
            return end < len(s) and s[end] == ":" and self.separated(end + 1)
        if s[pos] in "[{":
            return False
        for p in range(pos, self.line_end(pos)):
            if s[p] == "#" and s[p - 1] in " \t":
                return False
            if s[p] == ":" and self.separated(p + 1):
                return True
        return False

    def mapping_key(self):
        """The key at self.pos (key_ahead() said there is one); stops past its ':'."""
        if self.char() in ("\"", "'"):
            key = self.quoted()
            self.skip_spaces()
        else:
            self.check_plain_start()
            end = self.pos
            while not (self.s[end] == ":" and self.separated(end + 1)):
                end += 1
            key, self.pos = self.s[self.pos:end].rstrip(" \t"), end
        self.pos += 1
        return key

    def block_mapping(self, indent):
        mapping = {}
        while True:
            start = self.pos
            key = self.mapping_key()
            if key in mapping:
                self.fail("duplicate key %s" % json.dumps(key), start)
            mapping[key] = self.block_value(indent, True)
            if self.at_block_end(indent):
                return mapping
            self.check_indent()
            if self.column() > indent:
                self.fail("this line is indented more than the keys of its mapping")
            if not self.key_ahead():
                self.fail("expected a key of the mapping above (key: value)")

    def block_sequence(self, indent):
        items = []
        while True:
            self.pos += 1  # the '-'
            items.append(self.block_value(indent, False))
            if self.at_block_end(indent):
                return items
            self.check_indent()
            if self.column() > indent:
                self.fail("this line is indented more than the entries of its sequence")
            if not self.at_entry():
                return items  # the next key of the mapping whose value this sequence is

    def block_value(self, indent, in_mapping):
        """The value after 'key:' or '-': on the same line, or indented on the lines below."""
        self.skip_spaces()
        if self.char() not in ("", "\n", "#"):
            return self.block_node(indent, inline=in_mapping)
        self.end_of_line()
        if not self.next_content() or self.at_marker() or self.at_marker("..."):
            return None
        self.check_indent()
        if self.column() > indent:
            return self.block_node(indent)
        if in_mapping and self.column() == indent and self.at_entry():
            return self.block_sequence(indent)  # a sequence may sit at the level of its key
        return None

    def check_plain_start(self):
        c = self.char()
        if c in ",[]{}#&*!|>'\"%@`" or (c in "-?:" and self.separated(self.pos + 1)):
            self.fail("a plain scalar cannot start with %s" % json.dumps(c))

    def plain_line(self):
        """The rest of a plain scalar's line, up to a comment; ': ' in it is an error."""
        s, start = self.s, self.pos
        end = self.line_end(start)
        while self.pos < end:
            if s[self.pos] == "#" and self.pos > start and s[self.pos - 1] in " \t":
                break
            if s[self.pos] == ":" and self.separated(self.pos + 1):
                self.fail("a mapping cannot start inside a value (quote the value if ': ' is meant)")
            self.pos += 1
        return s[start:self.pos].rstrip(" \t")

    def plain_block(self, indent):
        """A plain scalar in block context; lines indented deeper than indent continue it."""
        self.check_plain_start()
        text = self.plain_line()
        while True:
            self.end_of_line()
            if not self.next_content() or self.at_block_end(indent + 1):
                return yaml_plain_value(text)
            if self.comment_lines:
                self.fail("a comment cannot sit inside a multi-line value")
            self.check_indent(indent + 1)
            text += ("\n" * self.empty_lines if self.empty_lines else " ") + self.plain_line()

    def block_scalar(self, indent):
        """| (literal) or > (folded), then at most a chomping indicator (+ keeps the final
        empty lines, - drops the last line break) and an indentation digit."""
        s, start = self.s, self.pos
        folded, chomp, explicit = s[start] == ">", "", None
        self.pos += 1
        for _ in range(2):
            c = self.char()
            if c and c in "+-" and not chomp:
                chomp = c
            elif c and c in "123456789" and explicit is None:
                explicit = int(c)
            else:
                break
            self.pos += 1
        if not self.separated(self.pos):
            self.fail("a block scalar's header is | or > with at most + or - and one digit 1-9", start)
        self.end_of_line()
        width = None if explicit is None else max(indent, 0) + explicit
        lines, text_lines, leading, final_break = [], 0, 0, False
        pos = self.pos + 1
        while pos < len(s):
            end = self.line_end(pos)
            line = s[pos:end]
            spaces = len(line) - len(line.lstrip(" "))
            if spaces == len(line) and (width is None or spaces <= width):  # an empty line
                leading = max(leading, spaces) if width is None else leading
                lines.append("")
            else:
                if width is None:
                    if leading > spaces and spaces > indent:
                        self.fail("an empty line above the text is indented more than the text", pos)
                    width = spaces
                if spaces < width or width <= indent:
                    break
                lines.append(line[width:])
                text_lines, final_break = len(lines), end < len(s)
            pos = end + 1
        self.pos = min(pos, len(s + "\n")) - 1
        self.next_content()
        body, trailing = lines[:text_lines], len(lines) - text_lines
        text = yaml_fold(body) if folded else "\n".join(body)
        if chomp == "-" or not body and chomp != "+":
            return text
        return text + ("\n" if body and final_break else "") + ("\n" * trailing if chomp == "+" else "")

    # -- scalars and flow context --------------------------------------------------
    def quoted(self):
        """A single- or double-quoted scalar; a line break inside folds like plain text."""
        s, start = self.s, self.pos
        quote = s[start]
        self.pos += 1
        out, pending = [], ""  # pending: spaces that only count if more text follows on the line
        while True:
            c = self.char()
            if not c:
                self.fail("this quoted scalar never ends", start)
            if c == quote and quote == "'" and self.char(self.pos + 1) == "'":
                out.append(pending + "'")
                pending, self.pos = "", self.pos + 2
            elif c == quote:
                self.pos += 1
                return "".join(out) + pending
            elif c in " \t":
                pending += c
                self.pos += 1
            elif c == "\n":
                pending, self.pos = "", self.pos + 1
                breaks = 0
                while True:
                    self.skip_spaces()
                    if self.char() != "\n":
                        break
                    breaks, self.pos = breaks + 1, self.pos + 1
                if self.at_marker() or self.at_marker("..."):
                    self.fail("this quoted scalar never ends", start)
                out.append("\n" * breaks if breaks else " ")
            elif c == "\\" and quote == '"':
                out.append(pending)
                pending = ""
                out.append(self.escape())
            else:
                out.append(pending + c)
                pending, self.pos = "", self.pos + 1

    def escape(self):
        """The character of the escape at self.pos (a backslash), and past it."""
        s, start = self.s, self.pos
        e = self.char(start + 1)
        self.pos += 2
        if e == "\n":  # an escaped line break: the lines join without a space
            self.skip_spaces()
            return ""
        if e in YAML_ESCAPES:
            return YAML_ESCAPES[e]
        if not e or e not in YAML_HEX_ESCAPES:
            self.fail("unknown escape \\%s" % e, start)
        digits = s[self.pos:self.pos + YAML_HEX_ESCAPES[e]]
        if len(digits) != YAML_HEX_ESCAPES[e] or any(d not in "0123456789abcdefABCDEF" for d in digits):
            self.fail("\\%s needs %d hexadecimal digits" % (e, YAML_HEX_ESCAPES[e]), start)
        self.pos += len(digits)
        code = int(digits, 16)
        low = s[self.pos + 2:self.pos + 6] if s.startswith("\\u", self.pos) else ""
        if 0xd800 <= code < 0xdc00 and len(low) == 4 and all(d in "0123456789abcdefABCDEF" for d in low) \
                and 0xdc00 <= int(low, 16) < 0xe000:  # JSON's surrogate pair
            self.pos += 6
            return chr(0x10000 + ((code - 0xd800) << 10) + int(low, 16) - 0xdc00)
        if 0xd800 <= code < 0xe000 or code > 0x10ffff:
            self.fail("\\%s%s is not a character" % (e, digits), start)
        return chr(code)

    def skip_flow_space(self):
        while True:
            c = self.char()
            if c and c in " \t\n":
                self.pos += 1
            elif c == "#" and self.s[self.pos - 1] in " \t\n":
                self.pos = self.line_end(self.pos)
            else:
                return

    def flow_node(self):
        self.enter()
        self.skip_flow_space()
        c = self.char()
        if c == "[":
            value = self.flow_collection("]")
        elif c == "{":
            value = self.flow_collection("}")
        elif c and c in "\"'":
            value = self.quoted()
        elif c and c in "&*!":
            self.fail({"&": "anchors", "*": "aliases", "!": "tags"}[c] + " are not supported")
        elif c == "?" and self.separated(self.pos + 1):
            self.fail("complex keys are not supported")
        elif not c:
            self.fail("the text ends inside [ ] or { }")
        else:
            value = yaml_plain_value(self.plain_flow())
        self.depth -= 1
        return value

    def flow_collection(self, close):
        """[a, b] or {k: v, k2: v2}, on one line or several."""
        start = self.pos
        self.pos += 1
        result = {} if close == "}" else []
        while True:
            self.skip_flow_space()
            c = self.char()
            if c == close:
                self.pos += 1
                return result
            if not c:
                self.fail("this %s never ends" % ("mapping" if close == "}" else "sequence"), start)
            if c in ",]}":
                self.fail("expected an entry, not %s" % json.dumps(c))
            if close == "]":
                result.append(self.flow_node())
                self.skip_flow_space()
                if self.char() == ":":
                    self.fail("key: value inside [ ] is not supported; write {key: value}")
            else:
                key_start = self.pos
                if c in "[{" or c == "?" and self.separated(self.pos + 1):
                    self.fail("complex keys are not supported")
                key = self.quoted() if c in "\"'" else self.plain_flow()
                if key in result:
                    self.fail("duplicate key %s" % json.dumps(key), key_start)
                self.skip_flow_space()
                value = None
                if self.char() == ":":
                    self.pos += 1
                    self.skip_flow_space()
                    if self.char() not in (",", "}"):
                        value = self.flow_node()
                result[key] = value
                self.skip_flow_space()
            if self.char() == ",":
                self.pos += 1
            elif not self.char():
                self.fail("this %s never ends" % ("mapping" if close == "}" else "sequence"), start)
            elif self.char() != close:
                self.fail("expected ',' or %s" % json.dumps(close))

    def plain_flow(self):
        """A plain scalar inside [ ] or { }: up to , [ ] { }, ': ' or a comment; it may
        continue on the next lines."""
        self.check_plain_start()
        s, text = self.s, ""
        while True:
            start = self.pos
            while True:
                c = self.char()
                if not c or c in ",[]{}\n":
                    break
                if c == ":" and (self.separated(self.pos + 1) or self.char(self.pos + 1) in ",[]{}"):
                    break
                if c == "#" and self.pos > start and s[self.pos - 1] in " \t":
                    break
                self.pos += 1
            text += s[start:self.pos].rstrip(" \t")
            if self.char() != "\n":
                return text
            saved, breaks = self.pos, 0
            while self.char() == "\n":
                self.pos += 1
                self.skip_spaces()
                breaks += 1
            if not self.char() or self.char() in ",[]{}:#":
                self.pos = saved
                return text
            text += "\n" * (breaks - 1) if breaks > 1 else " "


def yaml_loads(text):
    """The one document of text (YAML, or JSON) as JSON-shaped data; YamlError otherwise."""
    return YamlReader(text).document()


# === Context =================================================================

class Context:
    """What a command gets: ui (how to print), choice (which profile, URL and tokens: each
    session gets them resolved once, as its Selection), http (how to talk HTTP), the credential
    store, the parsed arguments, the environment and the clock. Commands call sessions,
    sessions call the transport; never the other way."""

    def __init__(self, args, env, clock=None):
        self.args = args
        self.env = env
        self.now = clock or time.time
        self.ui = Printer(args, env, self.stored_format)
        self.deadline = CommandDeadline()  # set by a command with its own --timeout
        self.store, config_source = open_store(getattr(args, "config", None), env, self.ui.warn, self.ui.log,
                                               " ".join(["attune"] + getattr(args, "command_path", [])),
                                               self.deadline)
        self.choice = Choice(args, env, self.store, self.store.path, config_source)
        insecure = getattr(args, "insecure", False)
        self.http = HttpSettings(env, request_timeout(env), insecure, getattr(args, "wait_for_server", None),
                                 self.ui.verbose, self.ui.log, self.ui.note, self.deadline)
        if insecure:
            self.ui.warn("--insecure: TLS certificates are not verified; anyone on the network "
                         "path can read your tokens")

    def stored_format(self):
        try:
            return self.store.load().get("format")
        except ConfigError:
            return None

    def session(self, profile=None, api_url=None, use_env=True):
        return Session(self.choice.select(profile, api_url, use_env), self.store, self.http, self.ui.log, self.now)


# === Prompts and secrets =====================================================

def can_prompt(ctx):
    try:
        return ctx.ui.stdin.isatty() and ctx.ui.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def read_input(stream, line=False):
    """Standard input (one line, or all of it) as the text of the bytes the user gave: read
    as bytes and decoded as UTF-8, never through the locale (under LANG=C, Python 3.6 would
    read 'ä' as two lone surrogates). Line ends become \\n, as in text mode."""
    raw = getattr(stream, "buffer", None)
    if raw is None:  # a text stream with no bytes under it (an embedding program, tests)
        text = as_given(stream.readline() if line else stream.read())
    else:
        data = raw.readline() if line else raw.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("standard input is not UTF-8 text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_secret(ctx, what, stdin_flag, value, env_name, flag_name):
    """A secret from --X-stdin, --X (warned: visible in the process list), an
    environment variable, or a prompt on a terminal; otherwise a usage error. Empty
    input is refused (exit 2) before anything is sent."""
    if stdin_flag and value:
        raise UsageError("give %s either on stdin or as %s, not both" % (what, flag_name))
    if stdin_flag:
        return read_secret_lines(ctx, (what,))[0]
    if value:
        ctx.ui.warn("%s exposes the %s in the process list; prefer %s-stdin%s"
                    % (flag_name, what, flag_name, " or " + env_name if env_name else ""))
        return SECRETS.add(as_given(value))
    if env_name and ctx.env.get(env_name):
        return SECRETS.add(as_given(ctx.env[env_name]))
    if can_prompt(ctx):
        import getpass
        secret = getpass.getpass("%s: " % what.capitalize(), stream=ctx.ui.stderr)
        if secret:
            return SECRETS.add(secret)
    hint = "%s-stdin" % flag_name + (" or set %s" % env_name if env_name else "")
    raise UsageError("a %s is needed but there is no terminal to ask on; use %s" % (what, hint))


def read_secret_lines(ctx, names):
    """One secret a line on stdin, for each of names (known as secrets from then on); an
    empty or missing line is a usage error before anything is sent."""
    values = []
    for name in names:
        value = read_input(ctx.ui.stdin, line=True).rstrip("\n")
        if not value:
            raise UsageError("no %s on standard input%s" % (name, " (expected %s, one a line)" % " and ".join(names)
                                                            if len(names) > 1 else ""))
        values.append(SECRETS.add(value))
    return values


def ask(ctx, prompt):
    if not can_prompt(ctx):
        return None
    ctx.ui.stderr.write(prompt)
    ctx.ui.stderr.flush()
    return read_input(ctx.ui.stdin, line=True).strip() or None


# === The two halves: what loads the commands =================================
# self-install writes this program as two files, split at REST_MARK: this first half, and the
# rest in REST_FILE beside it (padded with blank lines, so line numbers stay those of the whole
# file), each with its own bytecode cache. `auth token` and `--version` then load about half
# of the bytecode; any other command loads the rest first. As a single file nothing changes.
REST_MARK = "# === Loaded on demand "
REST_FILE = "attune_rest.py"
REST_LOADED = False  # set to True by the last line of the rest


def load_rest():
    """Define every command: nothing to do in the single file; in the installed first half,
    run the second half in this module's namespace through the standard import machinery
    (its own bytecode cache; no text is executed here)."""
    if REST_LOADED:
        return
    from importlib.machinery import SourceFileLoader
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), REST_FILE)
    try:
        SourceFileLoader(__name__, path).exec_module(sys.modules[__name__])
    except OSError as e:
        raise ConfigError("this installation is incomplete: cannot read %s (%s); install it again"
                          % (quoted(path), e.strerror or e))


def split_program(text):
    """The two installed halves of this program's source text."""
    at = text.index("\n" + REST_MARK) + 1
    return text[:at], "\n" * text.count("\n", 0, at) + text[at:]


def program_source():
    """This program's whole source text: this file, and the rest when it is the installed first half."""
    here = os.path.abspath(__file__)
    with open(here, "rb") as f:
        text = f.read().decode("utf-8")
    if "\n" + REST_MARK not in text:
        with open(os.path.join(os.path.dirname(here), REST_FILE), "rb") as f:
            text += f.read().decode("utf-8").lstrip("\n")
    return text


# === Command declarations ====================================================
# Each command's function is declared right above it, with its flags, each written as its
# --help shows it ("flags METAVAR: help"), through arg() where argparse needs more (flag() for
# an option that takes no value):
#     @command("pack list", "list installed packs", "-n --name NAME: ...", flag("--all: ..."))
# build_parser() turns the declarations into argparse parsers, only for the command
# argv names; command_tree() reads them for shell completion; top_help() for --help.

REMAINDER = "..."  # argparse.REMAINDER, named without importing argparse
# Filled once by the @command declarations as the module is defined (the rest's too, when
# load_rest() runs), read-only after that.
TOP_LEVEL = []     # names of groups and top-level commands, in the order of --help
GROUP_HELP = {}    # group name -> help
COMMANDS = []      # Command, in declaration order


class Command:
    def __init__(self, path, help, func, arguments, defaults, examples, note):
        self.path = path            # ("pack", "list")
        self.help = help
        self.func = func
        self.declared = arguments   # as declared: arg() tuples, (flags, options), or arg() strings
        self.defaults = defaults    # extra attributes of the parsed arguments
        self.examples = examples    # command lines its --help shows ("attune pack list -j")
        self.note = note            # what its --help says before them ("" for nothing)

    @property
    def arguments(self):
        """Its arguments as arg() tuples, read from the strings when a run needs them (most
        runs need one command's): not for every command as the module is defined."""
        return tuple(arg(a) if isinstance(a, str) else a for a in self.declared)


def group(name, help):
    """Declare a command group ('pack'); its commands are declared with command()."""
    TOP_LEVEL.append(name)
    GROUP_HELP[name] = help


def command(path, help, *arguments, examples=(), note="", **defaults):
    """Declare the decorated function as the command path ('pack list' or 'run'); examples
    are command lines its --help shows, each with an optional '  # what it does', after the
    note, a paragraph."""
    def register(func):
        words = tuple(path.split())
        if len(words) == 1:
            TOP_LEVEL.append(words[0])
        COMMANDS.append(Command(words, help, func, arguments, defaults, examples, note))
        return func
    return register


def arg(spec, **options):
    """One argument of a command, written as its --help shows it: its flags (or its name),
    the name of its value if it takes one, then ': ' and its help, as in "-n --name NAME: the
    rule's name" or "ref REF: rule reference". The options are the rest of what argparse's
    add_argument takes, and optionally what the value completes to (complete='actions': see
    Shell completion). A command's declaration may give the spec alone, as a string."""
    head, colon, text = spec.partition(": ")
    flags = head.split()
    if colon:
        options["help"] = text
    if len(flags) > 1 and flags[-1][0] != "-":  # the metavar (a positional argument has one name)
        options["metavar"] = flags.pop()
    return tuple(flags), options


def flag(spec):
    """An option that takes no value, true when given: arg(spec, action="store_true")."""
    return arg(spec, action="store_true")


def parser_spec(spec):
    """An argument's options as argparse takes them: without our own complete=."""
    return spec if "complete" not in spec else {k: v for k, v in spec.items() if k != "complete"}


def parse_bool(text):
    """argparse type for true/false flags (--enabled B)."""
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError("expected true or false, not %r" % text)


def ref(what, complete=None):
    spec = "ref REF: %s reference" % what
    return arg(spec) if complete is None else arg(spec, complete=complete)


ALL = flag("--all: follow every page of the list (has_next)")
PAGE = arg("--page: page number (default 1)", type=ID_NUMBER, default=1)
PER_PAGE = arg("--per-page: items per page, 1 to 100 (default 50)", type=Number(1, 100), default=50)
YES = flag("--yes: do not ask for confirmation")
EXECUTION_ID = arg("id ID: execution id (a whole number)", type=ID_NUMBER, complete="executions")


# === Commands: auth token, the quick path ====================================
# The one command that starts without the rest of the program (see Loaded on demand).

group("auth", "log in and out, inspect and print tokens")

MIN_TTL = arg("--min-ttl SECONDS: refresh first unless the token has at least this long left", type=Seconds(0),
              default=0)
TOKEN_FORMATS = ("raw", "json", "env", "header")


@command("auth token", "print the access token that would be used",
         MIN_TTL, arg("--format: raw (default), json, env (shell exports) or header", choices=TOKEN_FORMATS),
         examples=("attune auth token --min-ttl 15m  # a token with 15 minutes left at least",
                   "curl -H \"$(attune auth token --format header)\" \"$URL/api/v1/packs\"",
                   "eval \"$(attune auth token --format env)\"  # ATTUNE_API_URL and ATTUNE_API_TOKEN"))
def cmd_auth_token(ctx, args):
    session = ctx.session()
    token = session.token(min_ttl=args.min_ttl)
    creds, now = session.creds, ctx.now()
    left = creds.access_left(now)
    if args.min_ttl and left is not None and left < args.min_ttl:
        ctx.ui.warn("the token has %ds left, less than --min-ttl %d: the server issues shorter-lived tokens"
                    % (left, args.min_ttl))
    fmt = args.format or {"json": "json", "yaml": "yaml"}.get(ctx.ui.output, "raw")
    if fmt == "raw":
        ctx.ui.stdout.write(token + "\n")
    elif fmt == "header":
        ctx.ui.stdout.write("Authorization: Bearer %s\n" % token)
    elif fmt == "env":
        ctx.ui.stdout.write("export ATTUNE_API_URL=%s\nexport ATTUNE_API_TOKEN=%s\n"
                            % (shell_quote(session.api_url), shell_quote(token)))
    else:
        chosen = session.selection
        doc = {"token": token, "expires_at": creds.access_expires_at,
               "expires_in": None if left is None else int(left),
               "profile": chosen.profile, "profile_source": chosen.profile_source,
               "api_url": chosen.api_url, "api_url_source": chosen.api_url_source,
               "source": creds.source, "source_detail": creds.origin}
        ctx.ui.write_document(to_yaml if fmt == "yaml" else to_json, doc, secrets_ok=True)


# === The command table: the declarations as data, for typos and completion ===
# The parser's typo check (usage_problem: the closest command or option that exists) and
# __complete read the command line the same way, from one table of the declarations. The
# installed first half reads that table from COMPLETION_FILE, which self-install writes
# beside it, so neither needs the rest of the program to name a command.

COMPLETION_FILE = "attune_commands.txt"  # completion_table(), as completion_table_text() writes it
COMPLETION_FILE_LIMIT = 1 << 20


def value_completion(flags, spec):
    """What an argument's value completes to: None for a flag that takes no value, else the
    list of its choices ([]: anything goes) or the name of a kind the server or the
    credential file answers (see Completion.kinds)."""
    if flags[0].startswith("-") and spec.get("action") in FLAG_ACTIONS:
        return None
    if "complete" in spec:
        return spec["complete"]
    return list(map(str, spec.get("choices") or ()))


def completion_table():
    """The declarations as __complete reads them: the global options, and for the top
    level, each group and each command its subcommands, its own options (option ->
    value_completion) and its positional arguments in order, the last repeating when it
    takes many."""
    def options(arguments):
        return {flag: value_completion(flags, spec) for flags, spec in arguments
                if flags[0].startswith("-") for flag in flags}

    def entry(path, arguments=()):
        positional = [(value_completion(flags, spec), spec.get("nargs")) for flags, spec in arguments
                      if not flags[0].startswith("-")]
        return {"children": [name for name, _, _ in children(path)], "options": options(arguments),
                "positionals": [kind for kind, _ in positional],
                "repeats": positional[-1][1] if positional and positional[-1][1] in ("*", "+", REMAINDER) else ""}

    table = {"version": __version__, "commands": {},
             "global": dict(options(GLOBAL_OPTIONS), **{"-h": None, "--help": None, "--version": None})}
    for path in [()] + [(name,) for name in TOP_LEVEL if name in GROUP_HELP]:
        table["commands"][" ".join(path)] = entry(path)
    for cmd in COMMANDS:
        table["commands"][" ".join(cmd.path)] = entry(cmd.path, cmd.arguments)
    return table


def completion_value_text(value):
    """A value_completion as COMPLETION_FILE spells it: '' a flag, '=' any value, '=a,b'
    choices, '=@kind' a kind."""
    if value is None:
        return ""
    if isinstance(value, str):
        return "=@" + value
    if any(c in choice for choice in value for c in " \t\n,=@") or "" in value:
        raise ValueError("a choice COMPLETION_FILE cannot spell: %r" % (value,))
    return "=" + ",".join(value)


def completion_value(text):
    """The value_completion COMPLETION_FILE spells as text (see completion_value_text)."""
    if not text:
        return None
    return text[2:] if text.startswith("=@") else [choice for choice in text[1:].split(",") if choice]


def completion_table_text(table):
    """completion_table() as COMPLETION_FILE holds it: a line with the version, one with the
    global options, then a line a command: path, subcommands, options, positional
    arguments and how the last repeats ('', '*', '+' or '...' for all that follows), separated
    by tabs, each list by spaces."""
    def options(found):
        return " ".join(name + completion_value_text(value) for name, value in found.items())

    lines = ["attune.py %s" % table["version"], options(table["global"])]
    for path, entry in table["commands"].items():
        lines.append("\t".join([path, " ".join(entry["children"]), options(entry["options"]),
                                " ".join(map(completion_value_text, entry["positionals"])),
                                entry["repeats"]]))
    return "\n".join(lines) + "\n"


class CommandTable:
    """The table completion_table_text() wrote, as __complete reads it: only the lines of the
    commands it is asked about are parsed. ValueError for any other text."""
    NONE = {"children": [], "options": {}, "positionals": [], "repeats": ""}

    def __init__(self, text):
        lines = text.split("\n")
        if len(lines) < 3 or not lines[0].startswith("attune.py ") or lines[-1] != "":
            raise ValueError("not a completion table")
        if not all(line.count("\t") == 4 for line in lines[2:-1]) or not lines[2].startswith("\t"):
            raise ValueError("not a completion table")  # each command line has its five fields, "" first
        self.version = lines[0][len("attune.py "):]
        self.global_options = self.options(lines[1])
        self.lines = dict(line.split("\t", 1) for line in lines[2:-1])
        self.parsed = {}

    @staticmethod
    def options(field):
        found = {}
        for word in field.split():
            name = word.partition("=")[0]
            found[name] = completion_value(word[len(name):])
        return found

    def entry(self, path):
        """(subcommands, options, positionals, repeats) of the command path ('pack list') as a
        dict, or an entry of nothing for a path that is no command."""
        if path not in self.parsed:
            line = self.lines.get(path)
            if line is None:
                return self.NONE
            below, own, positionals, repeats = line.split("\t")
            self.parsed[path] = {"children": below.split(), "options": self.options(own), "repeats": repeats,
                                 "positionals": list(map(completion_value, positionals.split()))}
        return self.parsed[path]


COMMAND_TABLE = []  # process state, a list used as a cell: the one command_table() of this process, once made


def command_table():
    """The CommandTable of this program; in the installed first half, from the copy
    self-install wrote beside it (when that is missing or of another version, the rest is
    loaded to make one)."""
    if COMMAND_TABLE:
        return COMMAND_TABLE[0]
    COMMAND_TABLE.append(read_command_table())
    return COMMAND_TABLE[0]


def read_command_table():
    if not REST_LOADED:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), COMPLETION_FILE)
        try:
            table = CommandTable(read_regular_file(path, COMPLETION_FILE_LIMIT)[0].decode("utf-8"))
            if table.version == __version__:
                return table
        except (OSError, ValueError):
            pass
        load_rest()
    return CommandTable(completion_table_text(completion_table()))


class CommandLine:
    """The words after `attune`, read from the command table as the parser reads them: the
    command they name, its positional arguments, the options given (values included), the
    option whose value is still to come (pending), and the first word that fits nowhere
    (unknown: the word, 'command' or 'option', and what it could have been)."""

    def __init__(self, table, words):
        self.table = table
        self.path, self.positionals, self.given = (), [], {}
        self.pending = None
        self.unknown = None
        index = 0
        while index < len(words):
            word, index = words[index], index + 1
            entry = self.entry()
            if word == "--" or (entry["repeats"] == REMAINDER and len(self.positionals) >= len(entry["positionals"])):
                self.positionals += words[index - (word != "--"):]
                break
            if word.startswith("-") and word != "-" and not is_number(word):
                index = self.option(word, words, index)
            elif entry["children"] and len(self.positionals) == len(entry["positionals"]):
                if word in entry["children"]:
                    self.path, self.positionals = self.path + (word,), []
                else:
                    self.note("command", word, [" ".join(self.path + (name,)) for name in entry["children"]])
                    self.positionals.append(word)
            else:
                self.positional(word)

    def positional(self, word):
        entry = self.entry()
        kinds = entry["positionals"]
        kind = kinds[len(self.positionals)] if len(self.positionals) < len(kinds) else \
            kinds[-1] if kinds and entry["repeats"] else None
        if isinstance(kind, list) and kind and word not in kind:
            self.note("choice", word, kind)
        self.positionals.append(word)

    def option(self, word, words, index):
        """Read one option (and its value, from the word or the next one); the next index."""
        name, eq, value = word.partition("=")
        known = self.options()
        if name not in known and name.startswith("--"):
            matches = [option for option in known if option.startswith(name)]  # argparse takes a unique prefix
            name = matches[0] if len(matches) == 1 else name
        elif name not in known and not name.startswith("--") and name[:2] in known:  # -jv, -pprod
            name, eq, value = name[:2], "=", word[2:]
            if known[name] is None:  # a cluster of flags
                for flag in value:
                    if known.get("-" + flag, []) is not None:
                        self.note("option", word, list(known))
                return index
        if name not in known:
            self.note("option", name, list(known))
        elif eq or known[name] is None:
            self.given[name] = value if eq else True
        elif index < len(words) and (not words[index].startswith("-") or is_number(words[index])):
            self.given[name], index = words[index], index + 1
        elif index >= len(words):
            self.pending = name
        return index

    def note(self, what, word, candidates):
        if self.unknown is None:
            self.unknown = (what, word, candidates)

    def entry(self):
        return self.table.entry(" ".join(self.path))

    def options(self):
        """The options valid here: the command's own first, then the global ones it leaves."""
        own = self.entry()["options"]
        return dict(own, **{k: v for k, v in self.table.global_options.items() if k not in own})

    def value_of(self, option):
        """The value_completion of an option here: None for a flag, or an option unknown here."""
        return self.options().get(option)


def is_number(word):
    """-1 and -2.5 are values, as argparse sees them, not options."""
    return word[1:2].isdigit()


# === Argument parser =========================================================

GLOBAL_OPTIONS = (
    arg("-p --profile NAME: profile to use for this run (never changes the current profile)", complete="profiles"),
    arg("--api-url URL: API URL for this run"),
    arg("--config FILE: credential file"),
    arg("-o --output FORMAT: table (the default), json, yaml; ndjson: cache entry scan --all only",
        choices=OUTPUT_FORMATS + ("ndjson",)),
    flag("-j --json: JSON output"),
    flag("-y --yaml: YAML output"),
    arg("--fields A,B: only these fields of each result, in this order: a table of them, or "
        "JSON/YAML holding only them (a.b for a field inside another)"),
    arg("-v --verbose: log HTTP requests and token decisions on stderr (secrets redacted)", action="count"),
    arg("--ca-bundle FILE: PEM file of extra CA certificates to trust"),
    flag("--insecure: do not verify TLS certificates (warns on every run)"),
    arg("--wait-for-server SECONDS: retry until the server is up (refused, DNS, 502-504, /health) or this long has "
        "passed (exit 5)", type=Seconds(0, integer=False)),
)
FLAG_ACTIONS = ("store_true", "count")  # the options of ours that take no value


def option_dest(flags, options):
    """The attribute argparse stores an argument in: --ref-spec -> ref_spec."""
    if "dest" in options:
        return options["dest"]
    names = [f for f in flags if f.startswith("--")] or list(flags)
    return names[0].lstrip("-").replace("-", "_")


def option_default(options):
    if "default" in options:
        return options["default"]
    return {"store_true": False, "count": 0}.get(options.get("action"))


def option_names(arguments):
    """(every option string, the ones that take a value) of some arg() declarations."""
    names, takes_value = [], []
    for flags, options in arguments:
        if flags[0].startswith("-"):
            names.extend(flags)
            if options.get("action") not in FLAG_ACTIONS:
                takes_value.extend(flags)
    return names, takes_value


GLOBAL_VALUE_OPTIONS = tuple(option_names(GLOBAL_OPTIONS)[1])


def version_text():
    return "attune.py %s (python %d.%d)" % ((__version__,) + tuple(sys.version_info[:2]))


def help_width():
    return terminal_columns(sys.stdout, os.environ) or 80


def wrap(text, width, indent):
    """text in lines of at most width characters, each after indent spaces (textwrap imports re)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width - indent:
            lines.append(line)
            line = word
        else:
            line = line + " " + word if line else word
    return ("\n" + " " * indent).join(lines + [line])


def help_rows(rows, width):
    """argparse's two-column layout: the name, then its help from column 24 on, wrapped."""
    lines = []
    for name, text in rows:
        if len(name) <= 20:
            lines.append("  %-22s%s" % (name, wrap(text, width, 24)))
        else:
            lines.append("  %s\n%s%s" % (name, " " * 24, wrap(text, width, 24)))
    return lines


def value_name(flags, spec):
    """What usage calls an argument's value, as argparse does: its metavar, else its choices,
    else its name (upper case for an option: --label LABEL)."""
    if spec.get("metavar"):
        return spec["metavar"]
    if "choices" in spec:
        return "{%s}" % ",".join(spec["choices"])
    dest = option_dest(flags, spec)
    return dest.upper() if flags[0].startswith("-") else dest


def option_usage(flags, spec, every_flag=False):
    """How usage and help name an option: '-p NAME' (or '-p NAME, --profile NAME'), '-w'."""
    value = "" if spec.get("action") in FLAG_ACTIONS else " " + value_name(flags, spec)
    return ", ".join(flag + value for flag in flags) if every_flag else flags[0] + value


def global_option_rows():
    rows = [("-h, --help", "show this help message and exit"), ("--version", "show the version and exit")]
    return rows + [(option_usage(flags, spec, every_flag=True), spec["help"]) for flags, spec in GLOBAL_OPTIONS]


def top_help(width):
    """`attune --help`, from the declarations: commands, global options, exit codes, environment."""
    commands = [(name, help_text) for name, help_text, _ in children(())]
    lines = ["usage: " + TOP_USAGE, "", "Command-line client for the Attune automation platform.", "", "commands:"]
    lines += help_rows(commands, width)
    lines += ["", "examples:"] + ["  " + example for example in TOP_EXAMPLES]
    lines += ["", "global options (before or after the command):"] + help_rows(global_option_rows(), width)
    lines += ["", "exit codes:"] + exit_code_lines()
    lines += ["", "environment:"] + environment_lines()
    lines += ["", wrap("Run 'attune COMMAND --help' for a command's own options and examples, "
                       "'attune help global' for the global options alone.", width, 0)]
    return "\n".join(lines) + "\n"


TOP_USAGE = "attune [-h] [--version] [global options] COMMAND ..."
TOP_EXAMPLES = ("attune auth login --url https://attune.example.com -u admin  # once per server and user",
                "attune pack list",
                "attune run core.echo --param message=hello -w  # run an action and wait for its result",
                "attune execution list --status failed -j  # JSON for scripts",
                "attune -p prod auth status  # another profile, for one command")


def exit_code_lines():
    return ["  %-4d %s" % pair for pair in EXIT_CODES]


def environment_lines():
    return ["  %-22s %s" % pair for pair in ENVIRONMENT]


def usage_line(path, arguments, below, width):
    """A command's usage as argparse prints it after 'usage: ', from its declaration: its own
    options, [global options], its positional arguments, wrapped under the command's name."""
    words = ["[-h]"]
    for flags, spec in arguments:
        if flags[0].startswith("-"):
            text = option_usage(flags, spec)
            words.append(text if spec.get("required") else "[%s]" % text)
    words.append("[global options]")
    for flags, spec in arguments:
        if not flags[0].startswith("-"):
            name, nargs = value_name(flags, spec), spec.get("nargs")
            words.append("[%s]" % name if nargs == "?" else "[%s ...]" % name if nargs == "*" else name)
    if below:
        words.append("COMMAND ..." if below == "required" else "[COMMAND ...]")
    prog = " ".join(["attune"] + command_words(path))
    indent = len("usage: ") + len(prog) + 1
    lines, line = [], prog
    for word in words:
        if len(line) + 1 + len(word) > width - (len("usage: ") if not lines else 0) and line.strip():
            lines.append(line)
            line = " " * indent + word
        else:
            line += " " + word
    return "\n".join(lines + [line]).replace("%", "%%")  # argparse fills in %(prog)s


def positional_names(arguments):
    return [value_name(flags, spec) for flags, spec in arguments if not flags[0].startswith("-")]


def command_words(path):
    """How a command is typed: its path, with the positional arguments of a command that
    stands above others where they go (queue items REF show)."""
    words = []
    for i, word in enumerate(path):
        words.append(word)
        above = find_command(path[:i + 1]) if i + 1 < len(path) else None
        if above is not None:
            words.extend(positional_names(above.arguments))
    return words


def help_epilog(path, width):
    """What a command's or group's --help ends with: its examples (a group's: the first of each
    command below it, up to four), then the global options in one line and where they are told."""
    cmd = find_command(path)
    examples = list(cmd.examples) if cmd is not None and cmd.examples else [
        c.examples[0] for c in COMMANDS if c.path[:len(path)] == path and c.examples][:4]
    lines = ["examples:"] + ["  " + example for example in examples] + [""] if examples else []
    if cmd is not None and cmd.note:
        lines[:0] = [wrap(cmd.note, width, 0), ""]
    names = ", ".join(option_usage(flags, spec) for flags, spec in GLOBAL_OPTIONS)
    lines.append(wrap("global options (before or after the command): %s; see attune help global" % names, width, 2))
    return "\n".join(lines)


def find_command(path):
    for cmd in COMMANDS:
        if cmd.path == path:
            return cmd
    return None


def children(path):
    """(name, help, Command or None) of what stands below path: the top level or a group."""
    if not path:
        return [(name, GROUP_HELP.get(name) or find_command((name,)).help, find_command((name,)))
                for name in TOP_LEVEL]
    return [(cmd.path[-1], cmd.help, cmd) for cmd in COMMANDS if cmd.path[:-1] == path]


def needs_a_command(ctx, args):
    """The function of a command that only stands above its own (`cache entry`): run alone,
    it says which there are, from their declarations."""
    raise UsageError(needs_a_command_problem(tuple(args.command_path)))


def needs_a_command_problem(path):
    """'cache entry needs a command: get, get-many or scan (see: attune cache entry --help)',
    for a group or a command that stands above others, named without one of them."""
    above = find_command(path)
    words = command_words(path) + (positional_names(above.arguments) if above else [])
    names = [name for name, _, _ in children(path)]
    listed = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
    return "%s needs a command: %s (see: %s --help)" % (" ".join(words), listed, " ".join(("attune",) + path))


class Namespace:
    """What argparse.Namespace holds, for quick_args(), which does without argparse."""

    def __init__(self, **values):
        self.__dict__.update(values)


def quick_command(words):
    """The command `group name` names when quick_args can parse its arguments alone: it
    takes no positional argument and only options that are flags or single values (plain,
    a Number or a choice), none of them required. Looked up in the first half first, so
    `auth token` never loads the rest."""
    cmd = find_command(words)
    if cmd is None and not REST_LOADED:
        load_rest()
        cmd = find_command(words)
    if cmd is None:
        return None
    for flags, spec in cmd.arguments:
        kind = spec.get("type")
        if not flags[0].startswith("-") or spec.get("required") or "nargs" in spec or \
                spec.get("action") not in (None, "store_true") or (kind is not None and not isinstance(kind, Number)):
            return None
    return cmd


def quick_args(argv):
    """The arguments argparse would make of argv when it names a quick_command() with
    only options spelled out in full; None for anything else, which argparse parses. It
    reads the same declarations: `auth token`, and most list and show commands, then start
    without importing argparse, which costs more than the rest of the command."""
    options = {}

    def learn(arguments, values):
        for flags, spec in arguments:
            values[option_dest(flags, spec)] = option_default(spec)
            options.update((flag, (option_dest(flags, spec), spec)) for flag in flags)

    values, words, argv = {}, [], list(argv)
    learn(GLOBAL_OPTIONS, values)
    while argv:
        word = argv.pop(0)
        if not word.startswith("-"):
            words.append(word)
            cmd = quick_command(tuple(words)) if len(words) == 2 else None
            if len(words) == 2 and cmd is None:
                return None
            if cmd is not None:
                learn(cmd.arguments, values)
            continue
        name, eq, value = word.partition("=") if word.startswith("--") else (word, "", "")
        if name not in options:
            return None  # -h, --version, an abbreviation, --, a short option with its value
        dest, spec = options[name]
        if spec.get("action") == "store_true" and not eq:
            values[dest] = True
            continue
        kind = spec.get("type")
        if spec.get("action") is not None or (kind is not None and not isinstance(kind, Number)):
            return None
        if not eq:
            if not argv or argv[0].startswith("-"):
                return None
            value = argv.pop(0)
        if kind is not None:
            value = parse_number(value, kind.low, kind.high, kind.integer, kind.seconds)
            if value is None:
                return None  # argparse says what is wrong with it
        if value not in spec.get("choices", (value,)):
            return None
        values[dest] = value
    if len(words) != 2:
        return None
    values["cmd"], values["cmd_" + cmd.path[0]] = cmd.path  # the dest of each level's subparsers
    if children(cmd.path):  # `auth token` has sub-commands of its own, none of them chosen here
        values["_".join(("cmd",) + cmd.path)] = None
    return Namespace(func=cmd.func, command_path=list(cmd.path), **dict(cmd.defaults, **values))


def add_global_args(parser, top, own=()):
    """Global options, accepted before or after the command. Below the top level their
    defaults are SUPPRESS, so a value given earlier is not overwritten. A command's own
    option of the same name wins after the command (`pack update --version 2.0.0` is the
    pack's version, `artifact download -o FILE` the target): there the global one is
    given before the command."""
    group = parser.add_argument_group("global options")
    for flags, spec in GLOBAL_OPTIONS:
        left = [flag for flag in flags if flag not in own]  # artifact download -o FILE keeps --output
        if len(left) == len(flags) or (left and left[0].startswith("--")):
            options = dict(parser_spec(spec), default=option_default(spec) if top else argparse.SUPPRESS)
            if not top:
                options["help"] = argparse.SUPPRESS  # told once: the epilog names them (help_epilog)
            group.add_argument(*left, **options)
    if "--version" not in own:
        group.add_argument("--version", action="version", version=version_text(),
                           help="show the version and exit" if top else argparse.SUPPRESS)


def help_formatter(prog):
    """argparse's help layout, told the width itself: asking shutil.get_terminal_size()
    would import shutil, bz2 and lzma for nothing."""
    return argparse.RawDescriptionHelpFormatter(prog, width=help_width() - 2)


class ArgumentsRefused(Exception):
    """argparse's error for a command line: its message and the parser that refused it."""

    def __init__(self, message, parser):
        Exception.__init__(self, message)
        self.message, self.parser = message, parser


def build_parser():
    """The argument parser. Each command's parser is filled in from its declaration
    only when argv reaches it: building all of them costs more than most commands."""

    class CommandParser(argparse.ArgumentParser):
        """A parser that adds its arguments the first time it parses or shows help."""

        def __init__(self, *args, **kwargs):
            self.fill = kwargs.pop("fill", None)
            argparse.ArgumentParser.__init__(self, *args, **kwargs)

        def filled(self):
            fill, self.fill = self.fill, None
            if fill is not None:
                fill(self)
            return self

        def parse_known_args(self, args=None, namespace=None):
            return argparse.ArgumentParser.parse_known_args(self.filled(), args, namespace)

        def format_help(self):
            if self.prog == "attune":
                return top_help(help_width())
            return argparse.ArgumentParser.format_help(self.filled())

        def error(self, message):
            """argparse's usage error: parse_args() says it (terminal-safe), or a better one."""
            raise ArgumentsRefused(message, self)

    def add_help(parser):  # each sub-parser is made without it: its cost is paid when filled
        if not parser.add_help:
            parser.add_help = True
            parser.add_argument("-h", "--help", action="help", default=argparse.SUPPRESS,
                                help="show this help message and exit")

    def fill_group(parser, path):
        add_help(parser)
        width = help_width() - 2
        parser.usage = usage_line(path, (), "required", width) if path else TOP_USAGE
        parser.epilog = help_epilog(path, width) if path else None
        add_global_args(parser, top=not path)
        sub = parser.add_subparsers(dest="_".join(("cmd",) + path), metavar="COMMAND", prog=parser.prog,
                                    parser_class=CommandParser)
        sub.required = True  # add_subparsers(required=) is 3.7+
        for name, help_text, cmd in children(path):
            if cmd is None:
                fill = lambda p, path=path + (name,): fill_group(p, path)  # noqa: E731
            else:
                fill = lambda p, cmd=cmd: fill_command(p, cmd)  # noqa: E731
            sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
                           formatter_class=help_formatter, fill=fill, add_help=False)

    def fill_command(parser, cmd):
        add_help(parser)
        width, arguments = help_width() - 2, cmd.arguments
        parser.usage = usage_line(cmd.path, arguments, children(cmd.path) and (
            "required" if cmd.func is needs_a_command else "optional"), width)
        parser.epilog = help_epilog(cmd.path, width)
        add_global_args(parser, top=False, own=[name for flags, _ in arguments for name in flags])
        # command_path lets the lock file say 'attune auth login' without any argument values
        parser.set_defaults(func=cmd.func, command_path=list(cmd.path), **cmd.defaults)
        for flags, spec in arguments:
            parser.add_argument(*flags, **parser_spec(spec))
        below = children(cmd.path)  # `auth token` runs itself, or `auth token create` ...
        if below:
            sub = parser.add_subparsers(dest="_".join(("cmd",) + cmd.path), metavar="COMMAND",
                                        prog=parser.prog, parser_class=CommandParser)
            for name, help_text, child in below:
                sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
                               formatter_class=help_formatter, fill=lambda p, child=child: fill_command(p, child),
                               add_help=False)

    return CommandParser(prog="attune", formatter_class=help_formatter,
                         fill=lambda p: fill_group(p, ()))


# -- when argparse refuses a line: the one-line typo message -------------------------

# The verbs of other CLIs (gh, kubectl, aws, docker) and what attune calls them, in order of
# preference among the commands of the place: `key get` is `key show`, `pack remove` is
# `pack uninstall`. A suggestion by spelling alone never names a DESTRUCTIVE command for a
# word that is not nearly that command's own (a harmless typo must not lead to a deletion).
SYNONYMS = {"get": "show", "describe": "show", "view": "show", "inspect": "show", "cat": "show", "info": "show status",
            "status": "show", "ls": "list", "ps": "list", "push": "upload", "pull": "download", "fetch": "download",
            "apply": "upload create",
            "rm": "delete uninstall remove revoke", "remove": "delete uninstall revoke", "del": "delete",
            "delete": "uninstall remove revoke", "destroy": "delete", "uninstall": "delete remove",
            "stop": "cancel", "kill": "cancel", "terminate": "cancel", "abort": "cancel", "add": "create",
            "new": "create", "edit": "update", "modify": "update", "patch": "update", "set": "update",
            "exec": "run execute", "log": "logs", "tail": "logs", "follow": "watch", "wait": "watch",
            "on": "enable", "off": "disable", "signin": "login", "signout": "logout", "me": "whoami"}
DESTRUCTIVE = frozenset(("delete", "remove", "uninstall", "revoke", "cancel", "abort", "logout", "remove-profile",
                         "self-uninstall"))


def suggestion(word, candidates):
    """What to suggest for the unknown word among candidates (commands as paths, 'key show';
    options; choices), or None: a synonym first, else the closest spelling of the word alone
    (not of its path), a destructive command only when nothing harmless is close and the word
    is nearly that command's name ('delte')."""
    import difflib
    names = {candidate.split()[-1]: candidate for candidate in candidates}
    for verb in SYNONYMS.get(word.lower(), "").split():
        if verb in names:
            return names[verb]
    close = difflib.get_close_matches(word, names, 3, 0.7)
    harmless = [name for name in close if name not in DESTRUCTIVE]
    if harmless:
        return names[harmless[0]]
    if close and difflib.SequenceMatcher(None, word, close[0]).ratio() >= 0.8:
        return names[close[0]]
    return None


def usage_problem(argv):
    """One line for the first word of argv no command or option of that place takes (with
    what it may have meant and where to look), or None when every word has its place."""
    line = CommandLine(command_table(), argv)
    if line.unknown is None:
        return None
    what, word, candidates = line.unknown
    place = " ".join(("attune",) + line.path)
    close = suggestion(word, candidates)
    hint = "; did you mean '%s'?" % close if close else ""
    return "unknown %s %s for %s%s (see: %s --help)" % (what, quoted(word, 64), place, hint, place)


def parse_args(argv):
    """The parsed arguments. When argparse refuses them and a word has no place at all (a
    typo), the one-line usage_problem() says so instead; a valid line costs no check."""
    load_rest()
    try:
        return build_parser().parse_args(argv)
    except ArgumentsRefused as refused:
        raise UsageError(usage_problem(argv) or refusal(refused))


def refusal(refused):
    """argparse's complaint as every usage error is said: one line, what is missing or wrong,
    for which command, and where to look; a group named alone lists its commands."""
    path = tuple(refused.parser.prog.split()[1:])
    message, place = refused.message, " ".join(("attune",) + path)
    required = "the following arguments are required: "
    if message == required + "COMMAND":
        return needs_a_command_problem(path)
    if message.startswith(required):
        message = "%s needs %s" % (place, message[len(required):])
    elif message.startswith("argument "):
        name, _, why = message[len("argument "):].partition(": ")
        message = "%s of %s: %s" % (name, place, why)
    else:
        message = "%s: %s" % (place, message)
    return "%s (see: %s --help)" % (message, place)


# === Shell completion: __complete and the scripts ============================
# The completion scripts ask `attune __complete [--cursor N] [--] WORDS...` about the word
# WORDS[N] (by default the last; past the end, a new empty word), WORDS being what follows
# `attune` on the command line. The answer is one candidate a line on stdout and nothing
# else, and the exit status is 0 whatever happens (no credential file, no session, the server
# down or slow), within COMPLETE_BUDGET seconds. Commands, options and choices come from the
# command table, so naming a command loads no more than `auth token` does. Refs, ids and
# parameters come from the server, in one request through the session every command uses
# (the same profile and URL precedence, refresh and origin rule).

COMPLETE_BUDGET = 2.0  # seconds, for everything
CANDIDATE_LIMIT = 500
CANDIDATE_CHARACTERS = frozenset("._-+=,:@/%")  # besides letters and digits: nothing a shell reads


def fit_candidate(text):
    """A candidate a shell can put on the command line as it is: printable, at most 256
    characters, letters, digits and CANDIDATE_CHARACTERS only. Whatever else a server sends
    (spaces, quotes, $, ;, controls) is left out rather than changed."""
    return isinstance(text, str) and 0 < len(text) <= 256 and \
        all(c.isalnum() or c in CANDIDATE_CHARACTERS for c in text)


HELP_TOPIC_NAMES = ("global", "environment", "exit-codes")  # `help TOPIC` (HELP_TOPICS, in the help command)

# The kinds of value whose candidates one list of the server answers: "path field page-size".
LISTED_KINDS = {"rules": "/rules ref page_size", "triggers": "/triggers ref page_size",
                "sensors": "/sensors ref page_size", "workflows": "/workflows ref page_size",
                "workers": "/workers id page_size", "executions": "/executions id per_page",
                "events": "/events id per_page", "enforcements": "/enforcements id per_page"}


class Completion(CommandLine):
    """A line being completed: the words before the one being completed, read as the parser
    reads them (CommandLine); candidates() then answers for the word itself, from the
    declarations, the credential file or the server."""

    def __init__(self, table, words, env, clock):
        CommandLine.__init__(self, table, words)
        self.env, self.clock = env, clock
        self._context = None

    def candidates(self, current):
        """What the word `current` may become, at this place on the line."""
        if self.pending is not None:
            return self.values(self.value_of(self.pending), current)
        if current.startswith("-"):
            name, eq, value = current.partition("=")
            if eq:
                return [name + "=" + v for v in self.values(self.value_of(name), value)]
            return [option for option in self.options() if option.startswith(current)]
        entry = self.entry()
        if entry["children"] and len(self.positionals) == len(entry["positionals"]):
            return [name for name in entry["children"] if name.startswith(current)]
        kinds, index = entry["positionals"], len(self.positionals)
        if index < len(kinds):
            return self.values(kinds[index], current)
        if kinds and entry["repeats"]:
            return self.values(kinds[-1], current)
        # all its arguments given: a new word is one of its options, as the Rust CLI offers them after an action
        return list(self.options()) if not current and self.unknown is None else []

    def values(self, kind, prefix):
        """The values of one kind that start with prefix: choices, or what the credential
        file or the server knows."""
        if kind is None:
            return []
        if isinstance(kind, list):
            return [choice for choice in kind if choice.startswith(prefix)]
        values = self.listed_kind(kind) if kind in LISTED_KINDS else getattr(self, "kind_" + kind)(prefix)
        return [value for value in values if value.startswith(prefix)]

    # -- where the values come from -----------------------------------------
    def context(self):
        """The Context a command would get from the options on the line, under the budget."""
        if self._context is None:
            given = self.given
            args = Namespace(profile=given.get("--profile", given.get("-p")), api_url=given.get("--api-url"),
                             config=given.get("--config"), ca_bundle=given.get("--ca-bundle"),
                             insecure=given.get("--insecure") is True, wait_for_server=None, verbose=0,
                             output=None, json=False, yaml=False, command_path=["__complete"])
            self._context = Context(args, self.env, self.clock)
            self._context.deadline.until(time.monotonic() + COMPLETE_BUDGET)
        return self._context

    def get(self, path, query=None):
        """One GET through this line's session; None without a token to send (no request)."""
        session = self.context().session()
        return session.call("GET", path, query=query) if session.creds.access else None

    def listed(self, path, field="ref", query=None):
        body = self.get(path, dict(query or {"page_size": 100}))
        items = [] if body is None else list_items(body)
        return [str(item[field]) for item in items if type(item.get(field)) in (str, int)]

    def kind_commands(self, prefix):
        """What `help` takes next: the commands below the words given so far, and at first
        the topics as well."""
        below = self.table.entry(" ".join(self.positionals))["children"]
        return below + (list(HELP_TOPIC_NAMES) if not self.positionals else [])

    def kind_profiles(self, prefix):
        return sorted(set(self.context().store.profiles()) | {DEFAULT_PROFILE})

    def kind_packs(self, prefix):
        return self.listed("/packs")

    def kind_actions(self, prefix):
        """Packs as PACK. until the word has a dot, then the server's action search."""
        if "." not in prefix:
            return [ref + "." for ref in self.listed("/packs")]
        return self.listed("/actions/search", query={"q": prefix, "page_size": 100})

    def listed_kind(self, kind):
        """The refs or ids of a kind that one list answers (LISTED_KINDS); ids the most recent
        first."""
        path, field, size = LISTED_KINDS[kind].split()
        values = self.listed(path, field, {size: 100})
        return values if field != "id" else sorted(values, key=lambda i: -int(i) if i.isdigit() else 0)

    def kind_parameters(self, prefix):
        """NAME= for each parameter of the action on the line; after NAME=, its enum's values."""
        action = self.positionals[0] if self.positionals else ""
        if "." not in action:
            return []  # no action ref (execution rerun takes an id)
        body = self.get("/actions/" + path_segment(action))
        schema = envelope_data(body).get("param_schema") if isinstance(envelope_data(body), dict) else None
        if isinstance(schema, dict) and isinstance(schema.get("properties"), dict):
            schema = schema["properties"]  # a JSON schema rather than the flat form
        if not isinstance(schema, dict):
            return []
        name, eq, _ = prefix.partition("=")
        if not eq:
            return [key + "=" for key in schema]
        enum = schema.get(name).get("enum") if isinstance(schema.get(name), dict) else None
        return [name + "=" + (value if isinstance(value, str) else json.dumps(value))
                for value in (enum if isinstance(enum, list) else ())
                if isinstance(value, (str, int, float)) and value is not None]


def complete_after(argv):
    """Where the words of `attune GLOBAL-OPTIONS... __complete ...` begin (after __complete),
    when only global options (with their values) come before it; else None. From the
    declarations alone: nothing is read, so nothing can fail."""
    takes_value = {flag: value_completion(flags, spec) is not None for flags, spec in GLOBAL_OPTIONS for flag in flags}
    index = 0
    while index < len(argv) and argv[index] != "__complete":
        name, eq, _ = argv[index].partition("=")
        if name not in takes_value and name[:2] in takes_value and not name.startswith("--"):
            name, eq = name[:2], "="  # -pprod: the value attached
        if name not in takes_value:
            return None
        index += 2 if takes_value[name] and not eq else 1
    return index + 1 if index < len(argv) else None


def complete_command(argv, env, clock=None, before=()):
    """`attune __complete [--cursor N] [--] WORDS...`: the candidates, one a line; always 0.
    Nothing goes to stderr: a shell's completion has no place to show it. before: global
    options given ahead of __complete, read as if they began WORDS."""
    cursor = None
    if argv[:1] == ["--cursor"] and len(argv) > 1:
        cursor, argv = parse_number(argv[1], 0, 1 << 20, True), argv[2:]
        if cursor is None:
            return 0
    words = argv[1:] if argv[:1] == ["--"] else list(argv)
    cursor = max(len(words) - 1, 0) if cursor is None else cursor
    words = list(before) + words[:cursor + 1] + [""] * (cursor + 1 - len(words))
    saved, sys.stderr = sys.stderr, open(os.devnull, "w")
    try:
        found = Completion(command_table(), words[:-1], env, clock).candidates(words[-1])
    except Exception:  # anything at all: no candidates, and the shell goes on
        found = []
    finally:
        sys.stderr.close()
        sys.stderr = saved
    seen = set()
    for candidate in found:
        if fit_candidate(candidate) and candidate not in seen and len(seen) < CANDIDATE_LIMIT:
            seen.add(candidate)
            sys.stdout.write(candidate + "\n")
    return 0


# -- the scripts: bash, zsh, fish and PowerShell (`attune completion SHELL` prints one) -------
# Commands and options are written into each script as tables (command_tree()); everything
# else the script asks of `attune __complete` above.

FILE_OPTIONS = ("--config", "--ca-bundle", "--data")  # completed with file names


# The bash function that asks `attune __complete` (zsh runs it too, through bashcompinit).
BASH_DYNAMIC = """_attune_dynamic() {
    local cur="${COMP_WORDS[COMP_CWORD]}" line drop="" candidate IFS
    local -a words
    if [ -n "${ZSH_VERSION:-}" ]; then  # zsh (bashcompinit) hands over whole words
        words=("${COMP_WORDS[@]:1:$COMP_CWORD}")
    else  # bash breaks words at = and :, so read them whole from the line
        line="${COMP_LINE:0:COMP_POINT}"
        read -ra words <<< "$line"
        [[ -z "$line" || "$line" == *[[:space:]] ]] && words+=("")
        words=("${words[@]:1}")
        drop="${words[${#words[@]}-1]}"
        drop="${drop%"$cur"}"  # bash replaces only the part after its own word break (= or :)
    fi
    IFS=$'\n'
    COMPREPLY=($("${COMP_WORDS[0]}" __complete -- "${words[@]}" 2>/dev/null))
    [ -n "$drop" ] && COMPREPLY=("${COMPREPLY[@]#"$drop"}")
    for candidate in "${COMPREPLY[@]}"; do
        case "$candidate" in *.|*=) compopt -o nospace 2>/dev/null; break ;; esac
    done
}
"""


def command_tree():
    """(path, options, value options, subcommands) of the top level, each group and each
    command: completion_table() as the static completion scripts take it."""
    table = completion_table()
    own_global = [option for option in table["global"] if option not in ("-h", "--help", "--version")]
    common = ["-h", "--help"] + own_global + ["--version"]
    common_values = [option for option in own_global if table["global"][option] is not None]
    for path, entry in table["commands"].items():
        own = entry["options"]
        yield (tuple(path.split()), common + list(own),
               common_values + [option for option, value in own.items() if value is not None], entry["children"])


def completion_bash(tree):
    children = "".join('        "%s") echo "%s" ;;\n' % (" ".join(p), " ".join(c)) for p, _, _, c in tree if c)
    options = "".join('        "%s") echo "%s" ;;\n' % (" ".join(p), " ".join(o)) for p, o, _, _ in tree)
    takes_value = sorted(set(v for _, _, values, _ in tree for v in values))
    return """# bash completion for attune (attune.py %(version)s): eval "$(attune completion bash)"
# Commands and options are in the tables below; refs, ids, profiles and parameters come from
# `attune __complete` (at most 2 seconds, and silent when the server is down or slow).
# (No variable is called path: in zsh, which runs this through bashcompinit, that is PATH.)
_attune_children() {
    case "$1" in
%(children)s    esac
}
_attune_options() {
    case "$1" in
%(options)s    esac
}
%(dynamic)s_attune() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" place="" word i
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${COMP_WORDS[i]}"
        case " $(_attune_children "$place") " in *" $word "*) place="${place:+$place }$word" ;; esac
    done
    case "$prev" in
        %(files)s) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        %(values)s|=|:) _attune_dynamic; return ;;
    esac
    if [[ "$cur" == -*=* ]]; then  # zsh keeps --option=value whole
        _attune_dynamic
        return
    elif [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$(_attune_options "$place")" -- "$cur"))
        return
    fi
    [[ "$cur" == "=" || "$cur" == ":" ]] || COMPREPLY=($(compgen -W "$(_attune_children "$place")" -- "$cur"))
    [ ${#COMPREPLY[@]} -gt 0 ] || _attune_dynamic
}
complete -o default -F _attune attune attune.py
""" % {"version": __version__, "children": children, "options": options, "files": "|".join(FILE_OPTIONS),
       "dynamic": BASH_DYNAMIC,
       "values": "|".join(v for v in takes_value if v not in FILE_OPTIONS)}


def completion_fish(tree):
    lines = ["# fish completion for attune (attune.py %s): attune completion fish | source" % __version__,
             "# Commands and options are in the rules below; refs, ids, profiles, parameters and choices",
             "# come from `attune __complete` (at most 2 seconds, and silent when the server is down).",
             "function __attune_children",
             "    switch \"$argv[1]\""]
    for path, _, _, children in tree:
        if children:
            lines += ["        case '%s'" % " ".join(path), "            printf '%%s\\n' %s" % " ".join(children)]
    lines += ["    end", "end",
              "function __attune_path",
              "    set -l path ''",
              "    for word in (commandline -opc)[2..-1]",
              "        if contains -- $word (__attune_children \"$path\")",
              "            set path (string trim -- \"$path $word\")",
              "        end",
              "    end",
              "    echo $path",
              "end",
              "function __attune_at  # fish expands no (command) inside quotes, so compare here",
              "    set -l path (__attune_path)",
              "    test \"$path\" = \"$argv[1]\"",
              "end",
              "function __attune_dynamic",
              "    command -q attune; or return",
              "    set -l words (commandline -opc) (commandline -ct)",
              "    command attune __complete -- $words[2..-1] 2>/dev/null",
              "end",
              "function __attune_value  # an option's value: fish puts back the --option= itself",
              "    __attune_dynamic | string replace -r -- '^--[^=]*=' ''",
              "end",
              "complete -c attune -f",
              "complete -c attune -a '(__attune_children (__attune_path))'",
              "complete -c attune -a '(__attune_dynamic)'"]
    table = completion_table()
    for path, options, takes_value, _ in tree:
        own = table["commands"][" ".join(path)]["options"]
        for option in options:
            flag = "-l %s" % option[2:] if option.startswith("--") else "-s %s" % option[1:]
            kind = own.get(option, table["global"].get(option))
            value = " -r -F" if option in FILE_OPTIONS else " -x -a '(__attune_value)'" if kind else \
                " -x" if option in takes_value else ""
            lines.append("complete -c attune -n '__attune_at \"%s\"' %s%s" % (" ".join(path), flag, value))
    return "\n".join(lines) + "\n"


def completion_powershell(tree):
    def table(name, rows):
        lines = ["$%s = @{" % name]
        lines += ["    '%s' = @(%s)" % (" ".join(path), ", ".join("'%s'" % w for w in words)) for path, words in rows]
        return lines + ["}"]

    lines = ["# PowerShell completion for attune (attune.py %s):" % __version__,
             "#   attune completion powershell | Out-String | Invoke-Expression"]
    lines += table("AttuneChildren", [(p, c) for p, _, _, c in tree if c])
    lines += table("AttuneOptions", [(p, o) for p, o, _, _ in tree])
    lines += ["Register-ArgumentCompleter -Native -CommandName attune, attune.py -ScriptBlock {",
              "    param($wordToComplete, $commandAst, $cursorPosition)",
              "    $path = ''",
              "    foreach ($element in ($commandAst.CommandElements | Select-Object -Skip 1)) {",
              "        if ($element.Extent.EndOffset -ge $cursorPosition) { break }",
              "        $word = $element.ToString()",
              "        if ($AttuneChildren[$path] -contains $word) { $path = ($path + ' ' + $word).Trim() }",
              "    }",
              "    $candidates = if ($wordToComplete -like '-*') { $AttuneOptions[$path] } else { $AttuneChildren[$path] }",
              "    $candidates = @($candidates | Where-Object { $_ -like \"$wordToComplete*\" })",
              "    if ($candidates.Count -eq 0) {  # refs, ids, profiles, parameters: attune answers (at most 2 s)",
              "        $words = @($commandAst.CommandElements | Select-Object -Skip 1 |",
              "            Where-Object { $_.Extent.StartOffset -lt $cursorPosition } | ForEach-Object { $_.ToString() })",
              "        $cursor = if ($wordToComplete -eq '') { $words.Count } else { $words.Count - 1 }",
              "        $candidates = @(& $commandAst.CommandElements[0].ToString() __complete --cursor $cursor -- @words 2>$null)",
              "    }",
              "    $candidates | ForEach-Object {",
              "        [System.Management.Automation.CompletionResult]::new($_, $_, 'ParameterValue', $_)",
              "    }",
              "}"]
    return "\n".join(lines) + "\n"


def completion_script(shell):
    tree = list(command_tree())
    if shell == "fish":
        return completion_fish(tree)
    if shell == "powershell":
        return completion_powershell(tree)
    script = completion_bash(tree)
    if shell == "zsh":
        script = ("#compdef attune\n# zsh completion for attune: eval \"$(attune completion zsh)\"\n"
                  "autoload -U +X bashcompinit && bashcompinit\n") + script
    return script


def completion_target(shell, env):
    """Where each shell looks for a user's completion scripts."""
    home = os.path.expanduser("~") if "HOME" not in env else env["HOME"]
    if shell == "bash":
        data = env.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
        return os.path.join(data, "bash-completion", "completions", "attune")
    if shell == "fish":
        config = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        return os.path.join(config, "fish", "completions", "attune.fish")
    return os.path.join(home, ".zsh", "completions", "_attune")


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
    SECRETS.values.clear()  # a run knows the secrets it met itself
    EXIT_SIGNALS.running = True
    streams = sys.stdin, sys.stdout, sys.stderr
    if sys.stdin is None:  # started with stdin closed: reading it finds nothing
        sys.stdin = open(os.devnull)
    sys.stdout, sys.stderr = StandardStream(sys.stdout, "stdout"), StandardStream(sys.stderr, "stderr")
    try:
        if argv in (["--help"], ["-h"], []):  # the same text argparse shows, without importing it
            load_rest()
            write_text(sys.stdout, top_help(help_width()))
            code = 0
        elif argv == ["--version"]:
            sys.stdout.write(version_text() + "\n")
            code = 0
        elif argv[0] == "__complete" or (argv[0].startswith("-") and "__complete" in argv and complete_after(argv)):
            start = complete_after(argv)  # after any global options, as the Rust CLI takes them
            code = complete_command(argv[start:], env, clock, argv[:start - 1])
        else:
            args = quick_args(argv) or parse_args(argv)
            ctx = Context(args, env, clock)
            code = args.func(ctx, args) or 0
            if ctx.ui.fields is not None and not ctx.ui.fields_used:
                ctx.ui.warn("--fields has no effect on attune %s" % " ".join(args.command_path))
        sys.stdout.flush()  # a closed pipe or a full disk shows up here, inside the handlers below
        return code
    except AttuneError as e:
        try:
            sys.stdout.flush()  # what was printed before the error comes first
        except OutputError:
            pass
        say(sys.stderr, "attune: error: %s" % e)
        return e.exit_code
    except KeyboardInterrupt:
        write_text(sys.stderr, "\nattune: interrupted\n")
        return 130
    except Terminated as e:
        write_text(sys.stderr, "\nattune: %s\n" % ("hung up" if e.signum == 1 else "terminated"))  # SIGHUP is 1
        return 128 + e.signum
    except BrokenPipeError:  # the reader went away (`| head -1`): nothing left to say
        silence_stdout()
        return 0
    finally:
        EXIT_SIGNALS.disarm()
        if sys.stdin is not streams[0]:
            sys.stdin.close()
        sys.stdin, sys.stdout, sys.stderr = streams


def exit_process(code):
    """End the process with main()'s exit code without the interpreter's teardown.

    Freeing every module, function and string at exit costs about 2 ms, as much as loading this
    file's bytecode. Nothing needs it once main() has returned: files and locks are closed and
    temporary files removed in finally blocks, and attune.py starts no threads and registers no
    atexit handlers. os._exit is the documented way to leave without that work; the streams are
    flushed first, as the teardown would have."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: started with it closed
                stream.flush()
        except BrokenPipeError:  # the reader went away after main() returned
            pass
        except (OSError, ValueError):
            code = code or (1 if stream is sys.stdout else 0)  # output lost is a failure; a message lost is not
    os._exit(code)

# === Loaded on demand ========================================================
# Everything from here to the end defines the commands that `auth token` and `--version` do
# not need. In this file it is simply the rest of the module; the installed form keeps it in
# a second file that load_rest() runs only when a command needs it (see split_program()).
# The rule of this line: nothing above it names anything defined only below it, not even in
# a function that runs after load_rest(); what both halves use is defined above. The suite's
# SeamTests check it with the symbol table of the first half, and run `auth token` in every
# token state through the installed launcher.

# === Shared by the commands: lists, arguments, confirmations, tables =========
# What many of the command groups below use: lists and pages, JSON-ish arguments,
# confirmations, timestamps, a status line and the small pieces of table layout they repeat.
# What one group alone uses is written in that group's section.

# what the --help of each command that watches one execution says about the keys
WATCH_KEYS = ("While it watches: Ctrl+C asks the server to cancel the execution (exit 130), as the Rust CLI "
              "does; Ctrl+D, when stdin is the terminal, stops watching and leaves it running (exit 0).")


def update_body(pairs, body=None, hint=""):
    """The body of an update: the fields already decided (body) and each (key, value) of
    pairs that was given (not None); a usage error when there is none, before any request."""
    body = dict(body or {})
    body.update((key, value) for key, value in pairs if value is not None)
    if not body:
        raise UsageError("At least one field must be provided to update" + hint)
    return body


def patch_op(value, empty_clears=False):
    """A field the server patches: {"op": "set", "value": V}, {"op": "clear"} for an empty
    value when empty_clears, None when not given."""
    if value is None:
        return None
    return {"op": "clear"} if empty_clears and not value else {"op": "set", "value": value}


def emit_list(ctx, items, pagination, noun, columns, row=None):
    """A list command's output: the array in JSON and YAML, else a table of row(item)
    ("No <noun> found" when empty); then a note when more pages remain. items may be a
    ListWalk (or a generator over one): it is printed as it is read, and pagination is then
    the walk's (the last page's). Without row, columns is 'Label=key|...' (table_of())."""
    walk = pagination if isinstance(pagination, ListWalk) else None

    def table(page):
        headers, rows = table_of(columns, page) if row is None else (columns, list(map(row, page)))
        ctx.ui.table(headers, rows, empty="No %s found" % noun)

    shown = ctx.ui.emit_items(items, table)
    note_partial(ctx, walk.pagination if walk else pagination, shown, noun)


def note_partial(ctx, pagination, shown, noun):
    """Say on stderr when a list holds only its first page."""
    if isinstance(pagination, dict) and pagination.get("has_next") is True:
        total = pagination.get("total_items")
        ctx.ui.note("showing the first %s; add --all for every page"
                    % ("%d of %s" % (shown, counted(total, noun)) if isinstance(total, int) else counted(shown, noun)))


def counted(n, noun):
    """'1 execution', '3 executions': noun is the plural the lists use."""
    if n == 1 and noun.endswith("ies"):
        noun = noun[:-3] + "y"
    elif n == 1 and noun.endswith("s"):
        noun = noun[:-1]
    return "%d %s" % (n, noun)


def read_document(ctx, path, what):
    """The YAML (or JSON) document of a file, or of stdin for '-'; a file that cannot be
    read or parsed is a usage error naming it, with line:column."""
    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = read_input(ctx.ui.stdin)
        else:
            text = read_regular_file(path, DATA_FILE_LIMIT)[0].decode("utf-8")
        return yaml_loads(text)
    except YamlError as e:
        raise UsageError("Invalid %s: %s:%s" % (what, terminal_safe(name, keep=""), e))
    except UnicodeError:
        raise UsageError("Failed to read %s %s: it is not UTF-8 text" % (what, quoted(name)))
    except OSError as e:
        raise UsageError("Failed to read %s %s: %s" % (what, quoted(name), e.strerror or e))


def json_or_string(text):
    """A value given on the command line: JSON when it parses, else the string itself."""
    try:
        return json_loads(text)
    except ValueError:
        return text


def parse_json_arg(text, flag):
    try:
        return json_loads(text)
    except ValueError as e:
        raise UsageError("%s is not valid JSON: %s" % (flag, e))


def split_list(text):
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def parse_param_pairs(pairs, parse=json_or_string):
    """KEY=VALUE arguments as a dict; values parsed as JSON when they parse (by default)."""
    params = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError("Invalid parameter format: '%s'. Expected key=value" % pair)
        params[key] = parse(value)
    return params


def confirm(ctx, args, what, cancelled="Delete cancelled"):
    """Go ahead with a destructive command? --yes, or 'y' typed on a terminal; without
    a terminal and without --yes it is a usage error."""
    if getattr(args, "yes", False):
        return True
    if not can_prompt(ctx):
        raise UsageError("refusing to %s without confirmation (no terminal to ask on); add --yes" % what)
    if (ask(ctx, "Are you sure you want to %s? [y/N] " % what) or "").lower() in ("y", "yes"):
        return True
    ctx.ui.info(cancelled)
    return False


def delete_resource(ctx, args, what, path, success, json_message, cancelled="Delete cancelled"):
    """Confirm, DELETE, accept any 2xx with or without a body."""
    if not confirm(ctx, args, what, cancelled):
        return
    resp = ctx.session().request("DELETE", path)
    resp.check()
    if ctx.ui.emit_unless_table({"message": json_message}):
        ctx.ui.success(success)


def cell(item, key):
    """The value of a key of item as tables show it; after the key, '?' shows an empty value
    as '-', '@' a timestamp as format_timestamp() does ('@?': '-' for none), '~40' the text
    cut to 40 characters.
    Tables are written as data (labelled(), cells(), table_of()), not as code: a copied
    attune.py compiles every line on every run."""
    key, _, width = key.partition("~")
    if width:
        return clip(item.get(key) or "", int(width))
    name = key.rstrip("?")
    value = format_timestamp(item.get(name[:-1])) if name[-1] == "@" else item.get(name)
    return or_dash(value) if name != key else value


def table_of(spec, items):
    """A table written as 'Label=key|Other=key2@' (see cell()): its headers, and a row of each item."""
    parts = [part.partition("=") for part in spec.split("|")]
    return [label for label, _, _ in parts], [[cell(item, key) for _, _, key in parts] for item in items]


def labelled(item, spec):
    """(label, value) pairs for a table from 'Label=key|Other=key2?' (see table_of())."""
    labels, (row,) = table_of(spec, [item])
    return list(zip(labels, row))


def cells(item, keys):
    """A table row's cells: the values of the space-separated keys of item (see cell())."""
    return [cell(item, key) for key in keys.split()]



def format_timestamp(value):
    """'2026-11-24T12:00:00.123Z' as '2026-11-24 12:00:00' (UTC); anything else as is."""
    if not isinstance(value, str):
        return "" if value is None else str(value)
    if len(value) >= 19 and value[10] == "T":
        return value[:10] + " " + value[11:19]
    return value


def timestamps(obj):
    """The Created and Updated rows of a show table."""
    return labelled(obj, "Created=created@|Updated=updated@")


def or_dash(value):
    """A field the server left empty, as every table and list shows it."""
    return "-" if value is None or value == "" else value


def show_json_section(ctx, title, value):
    if value is not None:
        ctx.ui.section(title)
        ctx.ui.out(to_json(value))


class Progress:
    """One self-overwriting status line on stderr, only when stderr is a terminal that can
    take it (can_redraw)."""

    def __init__(self, ctx):
        self.enabled = can_redraw(ctx.ui.stderr, ctx.env)
        self.stream = ctx.ui.stderr
        self.width = 0

    def show(self, text):
        if self.enabled:
            write_text(self.stream, "\r" + terminal_safe(text).ljust(self.width), raw=True)
            self.stream.flush()
            self.width = len(text)

    def clear(self):
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


# === Commands: auth ==========================================================

LOGIN_URL = arg("--url: API URL to log in to (stored in the profile)")
SAVE_PROFILE = arg("--save-profile NAME: store the session in this profile")


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
    return "/auth/login", "direct"


def login_target(ctx, args):
    """(profile name, API URL) a login writes to: --save-profile or the selected profile;
    --url, then the usual URL precedence for that profile."""
    target = getattr(args, "save_profile", None)
    target = ctx.choice.profile if target is None else target
    if target != DEFAULT_PROFILE and ctx.store.profile(target) is None:
        check_profile_name(target)
    if getattr(args, "url", None):
        return target, check_api_url(args.url, "--url")
    return target, ctx.choice.api_url_for(target)[0]


def finish_login(ctx, session, target, url, path, body, method, username=None):
    """POST the login, store tokens, expiries, user and URL in the target profile."""
    sent_at = ctx.now()
    resp = session.request("POST", path, body, auth=False)
    if resp.status in (401, 403):
        raise AuthError("login failed: %s" % error_message(resp))
    if resp.status in (404, 405):  # most often a URL with /api/v1 or a web page's path in it
        raise AttuneError("no Attune login at %s (%d %s); the API URL is the server's address alone, such as "
                          "https://attune.example.com" % (quoted(url), resp.status, resp.reason))
    resp.check()
    store_login(ctx, target, url, envelope_data(resp.json()), sent_at, method, username)


def store_login(ctx, target, url, data, sent_at, method, username=None):
    """Store a login answer's tokens, expiries, user and URL in the target profile (all or
    nothing: a junk answer stores nothing) and report it."""
    pair = token_pair(data, sent_at, ctx.now())
    user = data.get("user") if isinstance(data.get("user"), dict) else {}
    login = user.get("login")
    username = login if isinstance(login, str) and login else username

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
    for name in TOKEN_VARIABLES:
        if ctx.env.get(name) and not ctx.choice.named:
            ctx.ui.warn("%s is set and takes precedence over the stored token" % name)
            break
    report_login(ctx, target, url, username, expires_at, already=False)


def report_login(ctx, target, url, username, expires_at, already):
    expires_in = None if expires_at is None else max(0, int(expires_at - ctx.now()))
    result = {"profile": target, "api_url": url, "username": username,
              "expires_at": expires_at, "expires_in": expires_in, "already_logged_in": already}

    if ctx.ui.emit_unless_table(result):
        ctx.ui.success("%s as %s" % ("Already logged in" if already else "Successfully logged in",
                                     username or "token user"))
        if expires_in is None:
            lifetime = "lifetime unknown"
        else:
            lifetime = "expires in " + format_duration(expires_in)
            lifetime += " (%d seconds)" % expires_in if expires_in >= 60 else ""
        ctx.ui.info("Profile '%s' at %s; token %s" % (target, url, lifetime))


def usable_login(ctx, args, target, url, stored):
    """For --if-needed: the stored session of target when it is for this URL and user and
    usable as it is (after a refresh if one is due); None when a login is needed."""
    if str(stored.get("api_url") or "").rstrip("/") != url:
        return None
    if args.username and stored.get("username") != args.username:
        return None
    session = ctx.session(profile=target, api_url=url, use_env=False)
    if not session.creds.access:
        return None
    try:
        session.token()
    except AuthError as e:
        ctx.ui.log("stored session not usable (%s); logging in" % e)
        return None
    return session


@command("auth login", "log in with a username and password",
         "-u --username: login name (default: the profile's stored username)",
         flag("--password-stdin: read the password from stdin"),
         "--password P: password (visible in the process list: avoid)",
         LOGIN_URL, SAVE_PROFILE,
         flag("--if-needed: do nothing (exit 0) when the profile already holds a usable session"),
         flag("--sso: log in through the identity provider (as auth sso-login)"),
         creates_profile=True,
         examples=("attune auth login --url http://localhost:8080 -u admin  # asks for the password",
                   "attune auth login -u admin --password-stdin < password.txt",
                   "attune auth login --if-needed -u admin --password-stdin < password.txt  # in a bootstrap script"))
def cmd_auth_login(ctx, args):
    target, url = login_target(ctx, args)
    stored = ctx.store.profile(target) or {}
    if args.if_needed:
        session = usable_login(ctx, args, target, url, stored)
        if session is not None:
            report_login(ctx, target, url, stored.get("username"), session.creds.access_expires_at, already=True)
            return
    ctx.store.check_writable()  # before a password is asked for or a session spent
    if args.sso:
        return device_login(ctx, target, url)
    username = args.username or ctx.env.get("ATTUNE_LOGIN") or stored.get("username") or ask(ctx, "Username: ")
    if not username:
        raise UsageError("a username is needed: use -u/--username")
    password = read_secret(ctx, "password", args.password_stdin, args.password,
                           "ATTUNE_PASSWORD", "--password")
    session = ctx.session(profile=target, api_url=url, use_env=False)
    path, method = login_endpoint(session)
    finish_login(ctx, session, target, url, path, {"login": username, "password": password},
                 method, username)


@command("auth token-login", "log in with an integration token",
         flag("--token-stdin: read the token from stdin"),
         "--token T: integration token (visible in the process list)",
         LOGIN_URL, SAVE_PROFILE, creates_profile=True,
         examples=("attune auth token-login --url https://attune.example.com --token-stdin < token.txt",))
def cmd_auth_token_login(ctx, args):
    target, url = login_target(ctx, args)
    ctx.store.check_writable()
    token = check_token(read_secret(ctx, "integration token", args.token_stdin, args.token, None, "--token"),
                        "--token-stdin" if args.token_stdin else "--token", UsageError)
    session = ctx.session(profile=target, api_url=url, use_env=False)
    finish_login(ctx, session, target, url, "/auth/token-login", {"token": token}, "token")


# -- SSO: the OAuth device authorization grant, through the Attune server --------
# The server starts the flow with the identity provider and hands out a sealed, opaque
# device_code that changes with every answer; attune.py polls until the user approves on
# any device. No listener, no callback: it works over SSH and in containers.

DEVICE_LIMIT = 86400  # seconds: the most an answer may ask for expires_in and interval


def loopback_host(host):
    if host.lower() == "localhost":
        return True
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_device_url(url, error):
    """An SSO device-login URL (ours or the server's): https, or http to a loopback host;
    printable ASCII, no user:password@."""
    scheme, sep, rest = url.partition("://") if isinstance(url, str) else ("", "", "")
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if not sep or not authority or "@" in authority or odd_character(url):
        raise error("the SSO device login URL is not usable: %s" % quoted(str(url)))
    if authority.startswith("["):
        host = authority[1:].partition("]")[0]
    else:
        host = authority.rpartition(":")[0] if ":" in authority else authority
    if scheme.lower() == "https" or (scheme.lower() == "http" and loopback_host(host)):
        return url
    raise error("SSO device login URLs must use HTTPS; HTTP is allowed only for loopback development servers")


def device_seconds(data, key, default=None):
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= DEVICE_LIMIT:
        raise ApiError("Authentication server returned invalid device polling limits")
    return value


def browser_allowed(env):
    """A browser can be shown: not over SSH, and on Linux and the BSDs a display to show it on."""
    if env.get("SSH_CONNECTION") or env.get("SSH_TTY"):
        return False
    return WINDOWS or sys.platform == "darwin" or bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def open_browser(ctx, url):
    import webbrowser
    try:
        opened = webbrowser.open(url)
    except Exception as e:  # webbrowser runs whatever BROWSER names; any failure only means "no browser"
        opened, why = False, str(e)
    else:
        why = "no browser found"
    if not opened:
        say(ctx.ui.stderr, "Could not open the browser: %s. Use the URL and code above on any device." % why)


def device_login(ctx, target, url, timeout=None, browser=True):
    """Log target in through POST /auth/oidc/device/start and .../poll: anonymous requests
    (no token, no refresh), the newest device_code resent every time and never shown,
    interval, slow_down and the deadline honoured; tokens stored as a password login's."""
    check_device_url(url, ConfigError)
    ctx.store.check_writable()  # an approval whose tokens could not be stored would be lost
    session = ctx.session(profile=target, api_url=url, use_env=False)
    resp = session.request("POST", "/auth/oidc/device/start", {}, auth=False)
    if resp.status == 501:
        raise ApiError("SSO is not configured on this server (%s)" % error_message(resp), 501)
    resp.check()
    start = envelope_data(resp.json())
    if not isinstance(start, dict):
        raise ApiError("the server's answer to the SSO start is not an object")
    user_code, code = start.get("user_code"), SECRETS.add(start.get("device_code"))
    if not isinstance(user_code, str) or not user_code.strip() or any(map(is_control, user_code)):
        raise ApiError("Authentication server returned an invalid user code")
    if not isinstance(code, str) or not code:
        raise ApiError("Authentication server returned no device code")
    verify = check_device_url(start.get("verification_uri"), ApiError)
    complete = start.get("verification_uri_complete")
    complete = check_device_url(complete, ApiError) if complete is not None else verify
    expires_in = device_seconds(start, "expires_in")
    interval = device_seconds(start, "interval", 5)
    say(ctx.ui.stderr, "Go to %s and enter code %s." % (verify, user_code))
    if browser and browser_allowed(ctx.env):
        open_browser(ctx, complete)
    say(ctx.ui.stderr, "Waiting for approval. Press Ctrl+C to cancel.")
    deadline = ctx.deadline.until(time.monotonic() + min(timeout or expires_in, expires_in))
    while True:
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
        left = deadline - time.monotonic()
        if left <= 0:
            raise AttuneError("SSO device login timed out; start a new login")
        sent_at = ctx.now()
        try:
            resp = session.request("POST", "/auth/oidc/device/poll", {"device_code": code}, auth=False,
                                   timeout=left)  # the request, too, ends at the deadline
        except NetworkError as e:
            if e.kind != "timeout":
                raise
            interval = min(interval * 2, DEVICE_LIMIT)  # a slow provider: same code, longer wait
            continue
        resp.check()
        data = envelope_data(resp.json())
        status = data.get("status") if isinstance(data, dict) else None
        if status == "authorized":
            tokens = data.get("tokens")
            if not isinstance(tokens, dict) or not tokens.get("access_token") or not tokens.get("refresh_token"):
                raise ApiError("Authentication server returned empty credentials")
            return store_login(ctx, target, url, tokens, sent_at, "sso")
        if status == "waiting":
            code = SECRETS.add(data.get("device_code")) or code  # re-sealed on every answer: always send the newest
            floor = {"slow_down": interval + 5, "provider_timeout": interval * 2}.get(data.get("reason"), interval)
            interval = min(max(device_seconds(data, "interval", floor), floor), DEVICE_LIMIT)
        elif status == "access_denied":
            raise AttuneError("SSO device authorization was denied")
        elif status == "expired":
            raise AttuneError("SSO device code expired; start a new login")
        else:
            raise ApiError("the server's answer to the SSO poll is not understood (status %s)"
                           % quoted(str(status)))


@command("auth sso-login", "log in through the identity provider (OIDC device flow; works over SSH)",
         LOGIN_URL, SAVE_PROFILE,
         arg("--timeout SECONDS: give up after this long (default: the code's life)", type=Seconds(1)),
         flag("--no-browser: only print the URL and code; never open a browser"),
         creates_profile=True,
         examples=("attune auth sso-login --url https://attune.example.com --no-browser",))
def cmd_auth_sso_login(ctx, args):
    target, url = login_target(ctx, args)
    device_login(ctx, target, url, args.timeout, browser=not args.no_browser)


PASSWORD_LENGTH = (8, 128)  # characters, the server's rule for a new password


def check_new_password(password, what="the new password"):
    low, high = PASSWORD_LENGTH
    if not low <= len(password) <= high:
        raise UsageError("%s must be %d to %d characters long (it has %d)" % (what, low, high, len(password)))
    return password


def ask_new_password(ctx):
    """The new password typed twice on a terminal."""
    import getpass
    first = as_given(getpass.getpass("New password: ", stream=ctx.ui.stderr))  # counted as typed, under LANG=C too
    check_new_password(first)
    if SECRETS.add(first) != as_given(getpass.getpass("New password again: ", stream=ctx.ui.stderr)):
        raise UsageError("the two new passwords differ; nothing was changed")
    return first


@command("auth change-password", "change your own password (the server checks the current one)",
         flag("--password-stdin: read the current password, then the new one, from stdin (one a line)"),
         flag("--if-needed: exit 0 without a change when the new password is already the current one"),
         examples=("attune auth change-password  # asks for both, the new one twice",
                   "attune auth change-password --password-stdin --if-needed < passwords  # current, new"))
def cmd_auth_change_password(ctx, args):
    if args.password_stdin:
        current, new = read_secret_lines(ctx, ("current password", "new password"))
    elif can_prompt(ctx):
        import getpass
        current = SECRETS.add(as_given(getpass.getpass("Current password: ", stream=ctx.ui.stderr)))
        new = ask_new_password(ctx)
    else:
        raise UsageError("the passwords are needed but there is no terminal to ask on; use --password-stdin "
                         "(the current password, then the new one, one a line)")
    check_new_password(new)
    if new == current:
        raise UsageError("the new password is the current one; nothing to change")
    session = ctx.session()
    me = session.fetch("GET", "/auth/me")  # a live session first: a 401 below is the password's
    login = str(me.get("login")) if isinstance(me, dict) else "?"
    resp = session.request("POST", "/auth/change-password", {"current_password": current, "new_password": new},
                           reactive=False)
    if resp.status == 401:
        if args.if_needed and password_accepted(session, login, new):
            if ctx.ui.emit_unless_table({"login": login, "changed": False}):
                ctx.ui.info("The password of %s is already the new one; nothing changed"
                            % quoted(login))
            return
        raise AuthError("the server refused the current password of %s (%s); the password is unchanged"
                        % (quoted(login), error_message(resp)))
    resp.check()
    if ctx.ui.emit_unless_table({"login": login, "changed": True}):
        ctx.ui.success("Password changed for %s" % quoted(login))


def password_accepted(session, login, password):
    """Does the server take password for login? A login whose tokens are dropped unused."""
    resp = session.request("POST", "/auth/login", {"login": login, "password": password}, auth=False)
    data = envelope_data(resp.json()) if resp.ok else None
    for value in (data.values() if isinstance(data, dict) else ()):
        if isinstance(value, str):
            SECRETS.add(value)
    return resp.ok


@command("auth logout", "forget the stored tokens (the server keeps no session)",
         flag("--all: log out of every profile"),
         examples=("attune auth logout",
                   "attune auth logout --all  # every profile"))
def cmd_auth_logout(ctx, args):
    names = sorted(ctx.store.profiles()) if args.all else [ctx.choice.profile]

    def forget(doc):
        for name in names:
            profile = doc["profiles"].get(name)
            if isinstance(profile, dict):
                for key in TOKEN_KEYS:
                    profile.pop(key, None)

    if ctx.store.exists and any(isinstance(ctx.store.profiles().get(n), dict) for n in names):
        ctx.store.modify(forget)
    for name in TOKEN_VARIABLES:
        if ctx.env.get(name):
            ctx.ui.warn("%s is still set in the environment" % name)
    if ctx.ui.emit_unless_table({"message": "Successfully logged out", "profiles": names}):
        ctx.ui.success("Successfully logged out" + (
                        " of all profiles" if args.all else " (profile '%s')" % names[0]))


@command("auth whoami", "show the identity the server sees",
         examples=("attune auth whoami",
                   "attune -p staging auth whoami -j"))
def cmd_auth_whoami(ctx, args):
    session = ctx.session()
    if not session.creds.access:
        raise session.no_session()
    me = session.fetch("GET", "/auth/me")
    if ctx.ui.emit_unless_table({key: me.get(key) for key in ("id", "login", "display_name")}):
        ctx.ui.pairs([*labelled(me, "Login=login|Display Name=display_name"),
                      ("API Host", session.api_url), ("ID", me.get("id"))], "Current Identity")


def token_times(creds, now):
    def left(at):
        return None if at is None else int(at - now)
    return {"access_token_expires_at": creds.access_expires_at,
            "access_token_expires_in": left(creds.access_expires_at),
            "refresh_token_expires_at": creds.refresh_expires_at,
            "refresh_token_expires_in": left(creds.refresh_expires_at)}


def stored_current(ctx):
    """The credential file's current profile (what config profiles marks), not the one -p picks."""
    try:
        return ctx.store.current_profile() or DEFAULT_PROFILE
    except ConfigError:
        return None


def profile_status(ctx, name, offline, use_env):
    """One profile's status and the exit code it implies: 0 usable, 4 login needed,
    5 server unreachable (6 server error, 1 other API error). Online, the session
    refreshes when due and asks /auth/me who we are."""
    session = ctx.session(profile=name, use_env=use_env)
    usable_here = session.creds.usable(ctx.now())  # what is known without the server
    code = 0 if usable_here else 4
    server = None
    if not offline and session.creds.access:
        try:
            me = session.fetch("GET", "/auth/me")
            server, code = {"reachable": True, "login": me.get("login")}, 0
        except AttuneError as e:
            server = {"reachable": not isinstance(e, NetworkError), "error": str(e)}
            code = e.exit_code if e.exit_code in (4, 5, 6) else 1
    creds, now = session.creds, ctx.now()  # after any refresh
    stored = ctx.store.profile(name) or {}
    status = {"profile": name, "current": name == stored_current(ctx), "api_url": session.api_url,
              "api_url_source": session.selection.api_url_source, "username": stored.get("username"),
              "token_source": creds.source if creds.access else None,
              "token_origin": creds.origin if creds.access else None,
              "invalidated_at": epoch(stored.get("invalidated_at")) if creds.source == "file" else None}
    status.update(token_times(creds, now))
    if server is not None:
        status["server"] = server
    status["logged_in"] = code == 0
    status["usable_here"] = usable_here  # the local tokens, whatever the server said or could not
    status["state"] = {0: "logged in", 4: "login needed", 5: "server unreachable", 6: "server error"}.get(
        code, "API error")
    return status, code


def status_pairs(status, now):
    if "error" in status:
        return [("Problem", status["error"]), ("Status", "unusable")]

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
    pairs.append(("Status", status_text(status)))
    return pairs


def status_text(status):
    """A profile's state in words. A server that cannot be asked (down, or failing) is not a
    login that is needed: what the local tokens allow is said beside it. An invalidated
    session whose access token still works is usable only until that token expires."""
    if status["state"] not in ("logged in", "login needed") and status["usable_here"]:
        return "%s; the session stored here has not expired (no login is needed)" % status["state"]
    if not status["logged_in"]:
        return "login needed"
    if status["invalidated_at"]:
        return ("usable until the access token expires, not after (the refresh was refused); "
                "run: attune auth login --profile %s" % status["profile"])
    return "logged in"


@command("auth status", "show each profile's login state; exit 0 only when usable",
         flag("--offline: do not contact the server"),
         flag("--all: every profile in the credential file"),
         examples=("attune auth status || attune auth login -u admin",
                   "attune auth status --all --offline"))
def cmd_auth_status(ctx, args):
    names = sorted(set(ctx.store.profiles()) | {ctx.choice.profile}) if args.all else [ctx.choice.profile]
    results, code = [], 0
    for name in names:
        try:
            status, status_code = profile_status(ctx, name, args.offline, use_env=name == ctx.choice.profile)
        except ConfigError as e:
            if not args.all:
                raise
            status, status_code = {"profile": name, "current": name == stored_current(ctx), "error": str(e),
                                   "logged_in": False, "usable_here": False, "state": "unusable"}, e.exit_code
            # one broken profile spoils no other
        results.append(status)
        if status_code and code in (0, 4):
            code = status_code  # network trouble outranks a missing login
    now = ctx.now()

    if ctx.ui.emit_unless_table(results if args.all else results[0]):
        for i, status in enumerate(results):
            if i:
                ctx.ui.out()
            title = "Profile: %s%s" % (status["profile"], " (current)" if status["current"] else "")
            ctx.ui.pairs(status_pairs(status, now), title)
    return code


@command("auth refresh", "refresh the access token now",
         examples=("attune auth refresh",))
def cmd_auth_refresh(ctx, args):
    session = ctx.session()
    if not session.creds.access and not session.creds.refresh:
        raise session.no_session()
    if session.creds.platform and not session.creds.state_path:
        raise session.platform_error("is not refreshed here")
    if not session.creds.refresh and session.creds.source == "env":
        raise AuthError("%s comes without a refresh token (ATTUNE_REFRESH_TOKEN); set a fresh token instead"
                        % session.creds.origin)
    if not session.creds.refresh and session.creds.source == "file":
        raise AuthError("profile '%s' has no refresh token; run: attune auth login --profile %s"
                        % (session.profile, session.profile))
    try:
        session.refresh()
    except AuthError:
        if session.creds.source != "file":
            raise
        return log_in_again(ctx, session)
    expires_at = session.creds.access_expires_at
    expires_in = None if expires_at is None else int(expires_at - ctx.now())

    if ctx.ui.emit_unless_table({"profile": session.profile, "api_url": session.api_url,
                                 "expires_at": expires_at, "expires_in": expires_in}):
        ctx.ui.success("Token refreshed successfully")
        ctx.ui.info("New token expires in %s" % ("an unknown time" if expires_in is None
                                                 else "%d seconds" % expires_in))


LOGIN_COMMANDS = {"direct": "auth login", "ldap": "auth login", "token": "auth token-login", "sso": "auth sso-login"}


def log_in_again(ctx, session):
    """auth refresh when the refresh token is dead: on a terminal, log in again the way the
    profile did (SSO, or a password prompt for its user); otherwise, or for an integration
    token, exit 4 with the exact command to run. Scripts are never prompted."""
    stored = ctx.store.profile(session.profile) or {}
    method = {"password": "direct"}.get(stored.get("auth_method"), stored.get("auth_method"))
    username = stored.get("username") if isinstance(stored.get("username"), str) else None
    command = "attune %s --profile %s" % (LOGIN_COMMANDS.get(method, "auth login"), session.profile)
    if method in ("direct", "ldap"):
        command += " -u %s" % shell_quote(username) if username else " -u <username>"
    if method not in ("sso", "direct", "ldap") or not can_prompt(ctx) or (method != "sso" and not username):
        raise AuthError("Session for profile '%s' has expired; run: %s" % (session.profile, command))
    if method == "sso":
        ctx.ui.warn("Session expired. Re-initiating SSO login in your browser...")
        return device_login(ctx, session.profile, session.api_url)
    ctx.ui.warn("Session expired. Re-authenticating as '%s'..." % username)
    password = read_secret(ctx, "password", False, None, None, "--password")
    login = ctx.session(profile=session.profile, api_url=session.api_url, use_env=False)
    path, method = login_endpoint(login)
    finish_login(ctx, login, session.profile, session.api_url, path, {"login": username, "password": password},
                 method, username)


# -- integration tokens: long-lived machine credentials, managed per identity -------

IDENTITY_ID = (arg("--identity LOGIN: the identity the tokens belong to, by its login"),
               arg("--identity-id N: the same, by its id", type=ID_NUMBER))
TOKEN_ID = arg("token_id TOKEN_ID: integration token id", type=ID_NUMBER)


def integration_tokens_path(session, args, *rest):
    """The identity's integration-tokens path; --identity LOGIN is looked up once."""
    if (args.identity is None) == (args.identity_id is None):
        raise UsageError("name the identity by --identity LOGIN or --identity-id N (one of them)")
    if args.identity_id is None:
        args.identity_id = identity_id_of(session, args.identity)
    return "/".join(["/identities/%d/integration-tokens" % args.identity_id] + list(map(str, rest)))


def token_hint(token):
    """What lists show of an integration token: its prefix and suffix, never the token."""
    return "%s...%s" % (token.get("token_prefix") or "", token.get("token_suffix") or "")


@command("auth token create", "create an integration token (shown once, here)", *(IDENTITY_ID + (
         arg("--label: what the token is for", required=True),
         arg("--description: a longer note on what it is for"),
         arg("--expires-at RFC3339: when it stops working (default: never)"),
         flag("--if-missing: create none when the identity has an active token with this label (exit 0)"),
         flag("--raw: print the token alone, for a pipe or a secret store"))),
         examples=("attune auth token create --identity ci-bot --label ci --expires-at 2027-01-01T00:00:00Z",
                   "token=$(attune auth token create --identity ci-bot --label ci --if-missing --raw)"))
def cmd_auth_token_create(ctx, args):
    body = {"label": args.label}
    body.update((k, v) for k, v in (("description", args.description), ("expires_at", args.expires_at)) if v)
    session = ctx.session()
    path = integration_tokens_path(session, args)
    if args.if_missing:
        held = [t for t in list_items(session.call("GET", path)) if isinstance(t, dict)
                and t.get("label") == args.label and t.get("active")]
        if held:  # its token was shown once, when it was made: nothing to print now
            if not args.raw:
                if ctx.ui.emit_unless_table({"created": False, "integration_token": held[0]}):
                    ctx.ui.info(
                        "Identity %d has an active integration token labelled %s (id %s, %s); none created"
                        % (args.identity_id, quoted(args.label), held[0].get("id"), token_hint(held[0])))
            return
    data = session.fetch("POST", path, body)
    token = data.get("integration_token") if isinstance(data.get("integration_token"), dict) else {}
    if args.raw:
        ctx.ui.stdout.write(check_token(data.get("token"), "the server's answer", ApiError) + "\n")
        return

    if ctx.ui.emit_unless_table(data):
        ctx.ui.success("Integration token created")
        ctx.ui.warn("Copy this token now. It will not be shown again after this response.")
        ctx.ui.pairs([("Token", data.get("token")), *labelled(token, "ID=id|Identity ID=identity_id|Label=label"),
                      ("Expires", token.get("expires_at") or "never")])


@command("auth token list", "list an identity's integration tokens (prefix...suffix only)", *IDENTITY_ID,
         examples=("attune auth token list --identity ci-bot",))
def cmd_auth_token_list(ctx, args):
    session = ctx.session()
    items, _ = fetch_list(session, integration_tokens_path(session, args))
    if ctx.ui.emit_unless_table(items):
        ctx.ui.table(
            ["ID", "Label", "Token", "Active", "Expires", "Last Used"],
            [[*cells(t, "id label"), token_hint(t), "true" if t.get("active") else "false",
              t.get("expires_at") or "never", t.get("last_used_at") or "-"] for t in items],
            empty="No integration tokens found")


@command("auth token revoke", "revoke an integration token (it stops working at once)", *(IDENTITY_ID + (
         TOKEN_ID, arg("--reason: why, for the audit trail"))),
         examples=("attune auth token revoke --identity-id 7 12 --reason 'leaked in a log'",))
def cmd_auth_token_revoke(ctx, args):
    body = {"reason": args.reason} if args.reason else {}
    session = ctx.session()
    token = session.fetch("POST", integration_tokens_path(session, args, args.token_id, "revoke"), body)
    if ctx.ui.emit_unless_table(token):
        ctx.ui.success("Integration token revoked")
        ctx.ui.pairs(labelled(token, "ID=id|Label=label|Revoked At=revoked_at"))


@command("auth token delete", "delete an integration token's record", *(IDENTITY_ID + (TOKEN_ID, YES)),
         examples=("attune auth token delete --identity-id 7 12 --yes",))
def cmd_auth_token_delete(ctx, args):
    if not confirm(ctx, args, "delete integration token metadata record %d" % args.token_id):
        return
    session = ctx.session()
    data = session.fetch("DELETE", integration_tokens_path(session, args, args.token_id))
    message = data.get("message") if isinstance(data.get("message"), str) else "Integration token deleted"
    if ctx.ui.emit_unless_table({"message": message}):
        ctx.ui.success(message)


@command("auth exec", "run a command with ATTUNE_API_URL and a fresh ATTUNE_API_TOKEN",
         MIN_TTL, flag("--keep-fresh: stay the parent and keep a token file fresh for as long as the command runs"),
         arg("command: the command to run, after --", nargs=REMAINDER, metavar="-- COMMAND [ARGS...]"),
         examples=("attune auth exec -- ./deploy.sh  # $ATTUNE_API_TOKEN is fresh inside",
                   "attune auth exec --keep-fresh -- ./long-job.sh  # hours: reads $ATTUNE_TOKEN_FILE"))
def cmd_auth_exec(ctx, args):
    """Run a command with ATTUNE_API_URL and a fresh ATTUNE_API_TOKEN in its environment
    (never on its argv). On POSIX the command replaces this process, so signals reach it
    directly and its exit code is ours. With --keep-fresh attune.py stays the parent and
    keeps the token in a private file fresh until the command ends."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("auth exec needs a command: attune auth exec [--min-ttl S] -- COMMAND [ARGS...]")
    session = ctx.session()
    token = session.token(min_ttl=args.min_ttl)
    env = dict(ctx.env)
    env.update(ATTUNE_API_URL=session.api_url, ATTUNE_API_TOKEN=token)
    for name in CHILD_WITHHELD:  # the child gets the URL and its access token, no other credential
        env.pop(name, None)
    ctx.ui.stdout.flush()
    ctx.ui.stderr.flush()
    try:
        if args.keep_fresh:
            return run_keeping_fresh(ctx, session, command, env)
        if not WINDOWS:
            os.execvpe(command[0], command, env)
        import subprocess  # Windows has no exec that keeps the exit code
        child = subprocess.Popen(command, env=env)
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # the console sends Ctrl-C to the child too
                continue
    except FileNotFoundError:
        raise ExitWith("command not found: %s" % command[0], 127)
    except OSError as e:
        raise ExitWith("cannot run %s: %s" % (command[0], e.strerror or e), 126)


FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")


CHILD_WITHHELD = ("ATTUNE_AUTH_TOKEN", "ATTUNE_KEEP_FRESH", "ATTUNE_REFRESH_TOKEN", "ATTUNE_PASSWORD",
                  "ATTUNE_TOKEN_FILE")


def private_token_directory(env):
    """The path for a new 0700 directory under $XDG_RUNTIME_DIR (else the temp directory);
    the caller creates it (mkdir) inside the try that removes it."""
    import tempfile
    runtime = env.get("XDG_RUNTIME_DIR", "")
    base = runtime if os.path.isabs(runtime) and os.path.isdir(runtime) else tempfile.gettempdir()
    return fresh_name(base, "attune-exec-")


def terminal_delivers(signum):
    """True when the terminal sends this Ctrl-C / Ctrl-\\ to the child itself: we are in the
    foreground process group of our terminal, and so is the child."""
    import signal
    if signum not in (signal.SIGINT, getattr(signal, "SIGQUIT", None)):
        return False
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (AttributeError, OSError, ValueError):
        return False


def run_keeping_fresh(ctx, session, command, env):
    """auth exec --keep-fresh: the child gets ATTUNE_TOKEN_FILE (rewritten atomically
    before each token nears expiry), ATTUNE_API_URL and, for tools that read only that,
    ATTUNE_API_TOKEN with the first token; ATTUNE_KEEP_FRESH names the file so nested
    attune calls read it first. Signals are passed on; the file and its directory are
    removed however this ends. Returns the child's exit code (128+N for signal N)."""
    import shutil
    import signal
    import subprocess
    written = session.creds.access
    previous = {}
    directory = None
    try:  # the directory's name is known before it exists: however this ends, it goes
        while directory is None:
            directory = private_token_directory(ctx.env)
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:  # taken: not ours to remove
                directory = None
        path = os.path.join(directory, "token")
        write_atomic(path, (written + "\n").encode("ascii"))
        env.update(ATTUNE_TOKEN_FILE=path, ATTUNE_KEEP_FRESH=path)
        child = subprocess.Popen(command, env=env)

        def forward(signum, frame):
            if not terminal_delivers(signum):
                child.send_signal(signum)

        for name in FORWARDED_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                previous[signum] = signal.signal(signum, forward)
        failed = False
        while True:
            creds, now = session.creds, ctx.now()
            left = creds.access_left(now)
            due_in = 60.0 if left is None else left - refresh_margin(creds.lifetime)
            try:  # wake when the token is due (at most a minute, at least a second apart)
                code = child.wait(timeout=min(60.0, max(1.0, due_in)))
                break
            except subprocess.TimeoutExpired:
                pass
            try:
                token = session.token()
            except AttuneError as e:
                if not failed:
                    ctx.ui.warn("cannot renew the token for %s: %s; it keeps the current one"
                                % (command[0], e))
                failed = True
                continue
            failed = False
            if token != written:
                write_atomic(path, (token + "\n").encode("ascii"))
                written = token
                ctx.ui.log("wrote a fresh token to %s" % path)
        return 128 - code if code < 0 else code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


# -- auth doctor: everything attune.py depends on here, in one report --------------
def lock_probe(lock_path, instead=None):
    """One try at the credential lock: 'refused' is what a working lock answers while held."""
    lock = FileLock(lock_path, 0.0, "attune lock probe", lambda message: None, lambda message: None,
                    instead=instead)
    if not lock.acquire():
        return "refused"
    lock.release()
    return "acquired"


def probe_lock_from_child(lock_path, instead=None):
    """lock_probe() from another process: a forked child. Where there is no fork (Windows)
    it runs here with a handle of its own, which msvcrt locks refuse as another process."""
    if not hasattr(os, "fork"):
        return lock_probe(lock_path, instead)
    import warnings
    with warnings.catch_warnings():  # 3.12+ warn about forking beside threads (a test's server)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: only the probe, then out without running anything of the parent's
        code = 2
        try:
            code = 0 if lock_probe(lock_path, instead) == "refused" else 1
        finally:
            os._exit(code)
    status = os.waitpid(pid, 0)[1]
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    return {0: "refused", 1: "acquired"}.get(code, "the probe failed")


class Doctor:
    """auth doctor: one report of everything that decides whether attune.py will work here.
    Local problems exit 3, an unreachable server 5; --repair fixes what it safely can."""

    def __init__(self, ctx, repair):
        self.ctx, self.repair = ctx, repair
        self.report, self.problems, self.notes = {}, [], []
        self.unreachable, self.unwritable = False, None

    def run(self):
        self.check_file()
        session = self.check_profile()
        self.check_writable(session)
        self.check_lock()
        if session is not None:
            self.check_network(session)
            self.check_server(session)
            self.check_token(session)
        code = 3 if self.problems else 5 if self.unreachable else 0
        self.report.update(problems=self.problems, notes=self.notes, exit_code=code)
        return code

    def check_file(self):
        ctx = self.ctx
        info = {"path": ctx.choice.config_path, "source": ctx.choice.config_source, "exists": False}
        self.report["credential_file"] = info
        if ctx.choice.config_path is None:  # said by check_writable, as a login would say it
            self.unwritable = self.writable_problem(info)
            return
        try:
            st = os.stat(ctx.choice.config_path)
        except (FileNotFoundError, NotADirectoryError):
            self.notes.append("no credential file yet; there is one implicit profile, 'default'")
            self.unwritable = self.writable_problem(info)
            return
        except OSError as e:
            self.problems.append("cannot inspect %s: %s" % (ctx.choice.config_path, e.strerror or e))
            return
        info.update(exists=True, mode="%03o" % (st.st_mode & 0o777), owner_uid=st.st_uid)
        problems = file_safety_problems(ctx.choice.config_path, st)
        if "mode" in problems and self.repair:
            os.chmod(ctx.choice.config_path, 0o600)
            info["mode"] = "600"
            self.notes.append("repaired: mode of %s set to 600" % ctx.choice.config_path)
            del problems["mode"]
        self.problems.extend(problems.values())
        ctx.store._checked_safety = True  # reported here; no second warning from the store
        try:
            doc = ctx.store.load()
            info.update(parses=True, version=doc.get("version", FILE_VERSION), profiles=sorted(doc["profiles"]))
            self.unwritable = self.writable_problem(info)
        except ConfigError as e:
            info.update(parses=False, error=str(e))
            if self.repair:
                info["moved_aside_to"] = self.move_aside()
                info["parses"] = True
                self.notes.append("repaired: the corrupt file was kept as %s and a fresh one started"
                                  % info["moved_aside_to"])
            else:
                self.problems.append("%s does not parse; run: attune auth doctor --repair" % ctx.choice.config_path)

    def writable_problem(self, info):
        """Why the next login or refresh could not store its session here (the question
        they ask before anything is sent: the file, its directory or where it would be
        made), or None."""
        try:
            self.ctx.store.check_writable()
        except ConfigError as e:
            info["writable"] = False
            return str(e)
        info["writable"] = True
        return None

    def check_writable(self, session):
        """An unwritable credential file is a problem for a session kept in it (its refresh
        stops) or for none at all (a login stops); beside a token from elsewhere, a note."""
        if self.unwritable:
            elsewhere = session is not None and session.creds.access and session.creds.source != "file"
            (self.notes if elsewhere else self.problems).append(
                "%s: a login or refresh here will stop with this" % self.unwritable)

    def move_aside(self):
        """Keep a copy of the corrupt file beside it (through a dotfiles link: beside the file
        the link names) and start a fresh one where it is, as every write goes: the link stays
        a link, a file mounted on its own is rewritten in place. The copy's path."""
        store = self.ctx.store
        target = own_link_target(store.path)[0]
        aside = "%s.corrupt-%s" % (os.path.realpath(target), time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        owner = root_keeps_owner(target)
        with store.lock():
            try:
                write_atomic(aside, read_regular_file(target, CREDENTIAL_FILE_LIMIT)[0],
                             keep=owner + (0o600,) if owner else None)
            except OSError as e:
                raise ConfigError("cannot keep a copy of the corrupt credential file as %s: %s; move it "
                                  "aside yourself" % (aside, e.strerror or e))
            store.modify_locked(lambda doc: None, fresh=True)
        return aside

    def check_profile(self):
        ctx = self.ctx
        try:
            session = ctx.session()
        except ConfigError as e:
            self.problems.append(str(e))
            return None
        creds, chosen = session.creds, session.selection
        self.report["profile"] = {"name": chosen.profile, "source": chosen.profile_source, "api_url": chosen.api_url,
                                  "api_url_source": chosen.api_url_source,
                                  "token_source": creds.source if creds.access else None,
                                  "token_origin": creds.origin if creds.access else None}
        return session

    def check_lock(self):
        if self.ctx.choice.config_path is None:
            self.report["lock"] = {"path": None, "status": "not checked: there is no credential file"}
            return
        lock_path = self.ctx.choice.config_path + ".lock"
        info = {"path": lock_path}
        self.report["lock"] = info
        if not os.path.isdir(os.path.dirname(lock_path)):
            info["status"] = "not checked: %s does not exist yet" % os.path.dirname(lock_path)
            return
        lock = FileLock(lock_path, 1.0, "attune auth doctor", self.ctx.ui.log, self.ctx.ui.log,
                        instead=self.ctx.choice.config_path)
        if not lock.acquire():
            info["status"] = "not available (the file system refuses locks, or another process holds it)"
            self.notes.append("the credential lock is not available; attune.py goes on without it (still safe)")
            lock.release()
            return
        try:
            info["path"] = lock.locked  # the credential file itself where no lock file can be made
            info["method"] = "msvcrt" if fcntl is None else ("flock", "lockf")[lock._method]
            outcome = probe_lock_from_child(lock_path, lock.instead)
        finally:
            lock.release()
        if outcome == "refused":
            info["status"] = "works: another process was refused while it was held"
        else:
            info["status"] = "another process got the lock while it was held (%s)" % outcome
            self.problems.append("the credential lock %s does not keep other processes out (%s)" % (lock_path, outcome))

    def check_network(self, session):
        ctx = self.ctx
        proxy = proxy_for(session.api_url, ctx.env)
        bundle, bundle_source = session.selection.ca_bundle
        info = {"proxy": masked_url(proxy) if proxy else None,
                "no_proxy": ctx.env.get("no_proxy") or ctx.env.get("NO_PROXY") or None,
                "ca_bundle": bundle, "ca_bundle_source": bundle_source,
                "insecure": bool(getattr(ctx.args, "insecure", False))}
        self.report["network"] = info
        if session.api_url.startswith("https:") or bundle:
            try:
                ctx.http.ssl_context(session.selection.ca_bundle)
            except ConfigError as e:
                self.problems.append(str(e))

    def check_server(self, session):
        info = {"reachable": False}
        self.report["server"] = info
        sent = time.time()
        try:
            resp = session.transport.request(HttpRequest("GET", session.url("/health")))
        except (NetworkError, ConfigError) as e:
            info["error"] = str(e)
            self.unreachable = isinstance(e, NetworkError)
            if not self.unreachable:
                self.problems.append(str(e))
            return
        received = time.time()
        info.update(reachable=True, health_status=resp.status)
        if not resp.ok:
            info["error"] = str(api_error(resp))
        date = http_date(resp.headers.get("Date") if resp.headers is not None else None)
        if date is not None:
            # Date has one-second resolution: the whole seconds are all the report can claim.
            skew = int(round(date - (sent + received) / 2))
            info["clock_skew_seconds"] = skew
            if abs(skew) > 60:
                self.notes.append("this clock and the server's differ by %s; tokens attune.py received itself "
                                  "are not affected, tokens from the environment are judged by their JWT exp"
                                  % format_duration(abs(skew)))

    def check_token(self, session):
        creds, now = session.creds, self.ctx.now()
        claims = jwt_claims(creds.access) or {}
        info = {"source": creds.source if creds.access else None, "issued_at": epoch(claims.get("iat"))}
        info.update(token_times(creds, now))
        info.update(invalidated_at=creds.invalidated_at, usable=creds.usable(now))
        self.report["token"] = info
        if not creds.access:
            self.notes.append("not logged in; run: attune auth login")
        elif not info["usable"]:
            self.notes.append("the session needs a new login; run: attune auth login --profile %s" % session.profile)

    def print_table(self):
        ctx, report = self.ctx, self.report
        now = ctx.now()
        when = lambda at: "-" if at is None else describe_expiry(at, now)  # noqa: E731
        profile = report.get("profile")
        if profile:
            ctx.ui.pairs([("Profile", "%s (from %s)" % (profile["name"], profile["source"])),
                          ("API URL", "%s (from %s)" % (profile["api_url"], profile["api_url_source"])),
                          ("Token", describe_source(profile["token_source"], profile["token_origin"]))], "Profile")
        info = report["credential_file"]
        pairs = [("Path", "%s (from %s)" % (info["path"] or "none", info["source"])), ("Exists", info["exists"])]
        if info["exists"]:
            pairs += [*labelled(info, "Mode=mode|Owner uid=owner_uid"),
                      ("Parses", info.get("parses") if not info.get("error") else info["error"])]
        ctx.ui.pairs(pairs, "Credential file")
        lock = report["lock"]
        ctx.ui.pairs([("Path", lock["path"] or "-"), ("Status", lock["status"])] +
                     ([("Method", lock["method"])] if lock.get("method") else []), "Lock")
        network = report.get("network")
        if network:
            ctx.ui.pairs([("Proxy", network["proxy"] or "none"), ("NO_PROXY", network["no_proxy"] or "-"),
                          ("CA bundle", "%s (from %s)" % (network["ca_bundle"], network["ca_bundle_source"])
                           if network["ca_bundle"] else "system trust store only"),
                          ("Verify TLS", not network["insecure"])], "Network")
        server = report.get("server")
        if server:
            pairs = [("Reachable", server["reachable"] if "error" not in server else server["error"])]
            if "clock_skew_seconds" in server:
                pairs.append(("Clock skew", "%+d s (server minus this machine)" % server["clock_skew_seconds"]))
            ctx.ui.pairs(pairs, "Server")
        token = report.get("token")
        if token:
            ctx.ui.pairs([("Source", token["source"] or "none"),
                          ("Issued", "-" if token["issued_at"] is None else format_time(token["issued_at"])),
                          ("Access token", when(token["access_token_expires_at"])),
                          ("Refresh token", when(token["refresh_token_expires_at"])),
                          ("Usable", token["usable"])], "Token")
        ctx.ui.section("Summary")
        for note in self.notes:
            ctx.ui.out(INFO + " " + note)
        for problem in self.problems:
            ctx.ui.out(CROSS + " " + problem)
        if self.unreachable:
            ctx.ui.out(CROSS + " the server is unreachable: %s" % server["error"])
        if not self.problems and not self.unreachable:
            ctx.ui.out(CHECK + " no problems found")


@command("auth doctor", "check everything attune.py depends on here, offline too",
         flag("--repair: move a corrupt credential file aside and start a fresh one; chmod 600 an open one"),
         examples=("attune auth doctor",
                   "attune auth doctor --repair"))
def cmd_auth_doctor(ctx, args):
    doctor = Doctor(ctx, args.repair)
    code = doctor.run()
    ctx.ui.emit(doctor.report, doctor.print_table)
    return code


# === Commands: config ========================================================

group("config", "manage profiles and settings in the credential file")


CONFIG_ALIASES = {"output_format": "format", "default_output_format": "format",
                  "current_profile": "profile"}
CONFIG_KEYS = ("api_url", "format", "profile", "description", "ca_bundle")


TOKEN_CONFIG_KEYS = ("auth_token", "refresh_token")  # config get shows them masked; set them by logging in


def config_key(key, readable=False):
    """The setting a key names (aliases resolved); readable: the token keys too."""
    key = CONFIG_ALIASES.get(key, key)
    known = CONFIG_KEYS + (TOKEN_CONFIG_KEYS if readable else ())
    if key in TOKEN_CONFIG_KEYS and not readable:
        raise UsageError("%s is set by logging in (attune auth login), not by config set" % key)
    if key not in known:
        raise UsageError("unknown key '%s'; keys: %s" % (key, ", ".join(known)))
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


@command("config list", "show the settings in effect (tokens masked)",
         examples=("attune config list",))
def cmd_config_list(ctx, args):
    name = ctx.choice.profile
    profile = ctx.store.profile(name) or {}
    data = {"config_file": ctx.choice.config_path, "current_profile": ctx.store.current_profile() or DEFAULT_PROFILE,
            "profile": name, "format": ctx.store.load().get("format") or "table",
            "api_url": ctx.choice.api_url_for(name)[0]}
    for key in ("description", "ca_bundle", "username", "auth_method"):
        data[key] = profile.get(key)
    data["auth_token"] = masked(profile, "auth_token")
    data["refresh_token"] = masked(profile, "refresh_token")
    if ctx.ui.emit_unless_table(data):
        ctx.ui.pairs([(k, "(not set)" if v is None else v) for k, v in data.items()],
                     "Configuration")


def config_value(ctx, key):
    if key == "profile":
        return ctx.choice.profile
    if key == "format":
        return ctx.store.load().get("format") or "table"
    if key == "api_url":
        return ctx.choice.api_url_for(ctx.choice.profile)[0]
    return (ctx.store.profile(ctx.choice.profile) or {}).get(key)


@command("config get", "print one setting (the tokens only as *** or (not set))",
         "key: one of: " + ", ".join(CONFIG_KEYS + TOKEN_CONFIG_KEYS),
         examples=("attune config get api_url",))
def cmd_config_get(ctx, args):
    key = config_key(args.key, readable=True)
    if key in TOKEN_CONFIG_KEYS:
        value = masked(ctx.store.profile(ctx.choice.profile) or {}, key)
        text = value or "(not set)"
    else:
        value = config_value(ctx, key)
        text = "" if value is None else str(value)
    if ctx.ui.emit_unless_table({"key": key, "value": value}):
        ctx.ui.out(text)


@command("config set", "change one setting", "key: one of: " + ", ".join(CONFIG_KEYS),
         "value: the new value",
         examples=("attune config set format json",
                   "attune config set api_url https://attune.example.com"))
def cmd_config_set(ctx, args):
    key, value = config_key(args.key), args.value
    if key == "format":
        value = value.lower()
    if key == "format" and value not in OUTPUT_FORMATS:
        raise UsageError("format must be one of: %s" % ", ".join(OUTPUT_FORMATS))
    if key == "profile":
        ctx.choice.require_profile(value)
    if key == "api_url":
        value = check_api_url(value, "config set api_url")
    if key == "ca_bundle" and value:  # the next run may start in another directory
        value = absolute_path(value, "config set ca_bundle", ctx.env)
    name = ctx.choice.profile

    def change(doc):
        if key == "format":
            doc["format"] = value
        elif key == "profile":
            doc["current_profile"] = value
        else:
            profile = doc["profiles"].setdefault(name, {})
            profile.setdefault("api_url", DEFAULT_API_URL)
            if key == "api_url":
                point_profile(ctx, name, profile, value)
            elif value == "":
                profile.pop(key, None)
            else:
                profile[key] = value

    ctx.store.modify(change)
    if ctx.ui.emit_unless_table({"key": key, "value": value}):
        ctx.ui.success("Set %s = %s" % (key, value))


def point_profile(ctx, name, profile, url):
    """Set a profile's api_url. A session belongs to the server that issued it: when the
    origin changes, the stored tokens are dropped (said on stderr), never sent to the new one."""
    old = profile.get("api_url", DEFAULT_API_URL)
    profile["api_url"] = url
    if url_origin(old if isinstance(old, str) else "") != url_origin(url) and \
            any(map(profile.get, ("auth_token", "refresh_token"))):
        for key in TOKEN_KEYS:
            profile.pop(key, None)
        ctx.ui.warn("profile '%s' now points at %s: its session for %s is dropped; run: attune auth login "
                    "--profile %s" % (name, url, terminal_safe(str(old)), name))


@command("config path", "print the credential file path",
         examples=("attune config path",))
def cmd_config_path(ctx, args):
    if ctx.choice.config_path is None:
        ctx.store.lock()  # raises: there is no place for the file
    if ctx.ui.emit_unless_table({"path": ctx.choice.config_path, "source": ctx.choice.config_source,
                                 "exists": ctx.store.exists or os.path.exists(ctx.choice.config_path)}):
        ctx.ui.out(ctx.choice.config_path)


@command("config profiles", "list profiles, current marked",
         flag("--names: just the names, one per line"),
         examples=("attune config profiles",
                   "attune config profiles --names"))
def cmd_config_profiles(ctx, args):
    current = ctx.store.current_profile() or DEFAULT_PROFILE
    profiles = dict(ctx.store.profiles())
    profiles.setdefault(DEFAULT_PROFILE, {"api_url": DEFAULT_API_URL})
    if args.names:  # for shell completion and scripts
        write_text(ctx.ui.stdout, "".join(name + "\n" for name in sorted(profiles)))
        return
    rows = []
    for name in sorted(profiles):
        profile = profiles[name] if isinstance(profiles[name], dict) else {}
        rows.append({"name": name, "current": name == current, "api_url": profile.get("api_url"),
                     "username": profile.get("username"), "description": profile.get("description"),
                     "logged_in": bool(profile.get("auth_token"))})
    if ctx.ui.emit_unless_table(rows):
        ctx.ui.table(
            ["", "Name", "API URL", "User", "Description"],
            [["*" if r["current"] else "", r["name"], r["api_url"], r["username"], r["description"]]
             for r in rows])


@command("config current", "print the profile in effect",
         examples=("attune config current",))
def cmd_config_current(ctx, args):
    name, source = ctx.choice.profile_source
    if ctx.ui.emit_unless_table({"profile": name, "source": source}):
        ctx.ui.out(name)


@command("config use", "make a profile the current one", "name: profile name",
         examples=("attune config use staging",))
def cmd_config_use(ctx, args):
    ctx.choice.require_profile(args.name)

    def change(doc):
        doc["current_profile"] = args.name
        if args.name == DEFAULT_PROFILE:
            doc["profiles"].setdefault(DEFAULT_PROFILE, {"api_url": DEFAULT_API_URL})

    ctx.store.modify(change)
    if ctx.ui.emit_unless_table({"current_profile": args.name}):
        ctx.ui.success("Switched to profile '%s'" % args.name)


# --api-url (required here) and --ca-bundle are the global options of the same names
@command("config add-profile", "add a profile, or update its settings (--api-url URL "
         "[--description D] [--ca-bundle FILE])", "name: profile name",
         "--description: a note on what the profile is for",
         examples=("attune config add-profile staging --api-url https://staging.example.com",
                   "attune config add-profile lab --api-url https://lab.internal --ca-bundle lab-ca.pem"))
def cmd_config_add_profile(ctx, args):
    if not args.api_url:
        raise UsageError("config add-profile needs --api-url URL")
    url = check_api_url(args.api_url, "--api-url")
    existed = ctx.store.profile(args.name) is not None
    if not existed:
        check_profile_name(args.name)

    def change(doc):
        profile = doc["profiles"].setdefault(args.name, {})
        point_profile(ctx, args.name, profile, url)
        for key in ("description", "ca_bundle"):
            value = getattr(args, key)
            if value is not None:
                profile[key] = absolute_path(value, "--ca-bundle", ctx.env) if key == "ca_bundle" and value else value
        return profile_view(args.name, profile)

    view = ctx.store.modify(change)
    if ctx.ui.emit_unless_table(view):
        ctx.ui.success("Profile '%s' %s" % (args.name, "updated" if existed else "added"))


@command("config show-profile", "show one profile (tokens masked)", "name: profile name",
         examples=("attune config show-profile staging",))
def cmd_config_show_profile(ctx, args):
    ctx.choice.require_profile(args.name)
    profile = ctx.store.profile(args.name) or {"api_url": DEFAULT_API_URL}
    view = profile_view(args.name, profile)
    labels = {"api_url": "API URL", "auth_token": "Auth Token", "refresh_token": "Refresh Token"}

    if ctx.ui.emit_unless_table(view):
        now = ctx.now()
        pairs = []
        for key, value in view.items():
            if key == "name":
                continue
            if key.endswith(("_expires_at", "invalidated_at")) and epoch(value) is not None:
                value = describe_expiry(value, now) if key.endswith("_expires_at") else format_time(value)
            pairs.append((labels.get(key, key.replace("_", " ").title()), "" if value is None else value))
        ctx.ui.pairs(pairs, "Profile: %s" % args.name)


@command("config remove-profile", "remove a profile (not the current one)", "name: profile name",
         examples=("attune config remove-profile staging",))
def cmd_config_remove_profile(ctx, args):
    name = args.name
    if name not in ctx.store.profiles():  # a malformed entry can still be removed
        ctx.choice.require_profile(name)
    current = ctx.store.current_profile() or DEFAULT_PROFILE
    if name == current:
        raise AttuneError("Cannot remove active profile '%s'. Switch to another profile first." % name)
    if name == DEFAULT_PROFILE:
        raise AttuneError("Cannot remove the default profile")
    ctx.store.modify(lambda doc: doc["profiles"].pop(name, None))
    if ctx.ui.emit_unless_table({"removed": name}):
        ctx.ui.success("Profile '%s' removed" % name)


def rust_config_path(env):
    """Where the Rust CLI keeps config.yaml: $XDG_CONFIG_HOME/attune, else the platform's
    configuration directory (~/.config, ~/Library/Application Support, %APPDATA%)."""
    if env.get("XDG_CONFIG_HOME"):
        base = env["XDG_CONFIG_HOME"]
    elif WINDOWS:
        base = env.get("APPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Roaming")
    else:
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, "Library", "Application Support") if sys.platform == "darwin" \
            else os.path.join(home, ".config")
    return os.path.join(base, "attune", "config.yaml")


def rust_profiles(doc, where):
    """(current profile, {name: our profile entry}) of the Rust CLI's config document, every
    value checked as if typed (names, URLs, tokens); ConfigError naming the first bad one."""
    if not isinstance(doc, dict) or not isinstance(doc.get("profiles", {}), dict):
        raise ConfigError("%s is not the Rust CLI's config.yaml (no profiles: mapping)" % where)
    profiles = {}
    for name, entry in sorted(doc.get("profiles", {}).items()):
        check_profile_name(name)
        place = "profile %s in %s" % (quoted(name, 64), where)
        if not isinstance(entry, dict) or entry.get("api_url") is None:
            raise ConfigError("%s has no api_url" % place)
        ours = {"api_url": check_api_url(entry["api_url"], place)}
        for key in ("auth_token", "refresh_token"):
            if entry.get(key):
                ours[key] = check_token(entry[key], "%s (%s)" % (place, key))
        for key in ("description", "auth_method", "username"):
            if isinstance(entry.get(key), str) and entry[key]:
                ours[key] = entry[key]
        profiles[name] = ours
    current = doc.get("profile", doc.get("current_profile"))
    return (current if current in profiles else None), profiles


@command("config import", "bring the Rust CLI's profiles (its config.yaml) into the credential file",
         arg("path PATH: the config.yaml (default: where the Rust CLI keeps it)", nargs="?"),
         flag("--overwrite: replace profiles of the same name (default: keep ours)"),
         flag("--dry-run: say what would change; write nothing"),
         examples=("attune config import  # ~/.config/attune/config.yaml",
                   "attune config import old-config.yaml --dry-run"))
def cmd_config_import(ctx, args):
    path = args.path or rust_config_path(ctx.env)
    try:
        data, st = read_regular_file(path, DATA_FILE_LIMIT)
        doc = yaml_loads(data.decode("utf-8"))
    except OSError as e:
        raise ConfigError("cannot read %s: %s" % (quoted(path), e.strerror or e))
    except (UnicodeError, YamlError) as e:
        raise ConfigError("%s is not readable YAML: %s" % (quoted(path), e))
    current, imported = rust_profiles(doc, quoted(path))
    if not WINDOWS and stat.S_IMODE(st.st_mode) & 0o077 and any("auth_token" in p or "refresh_token" in p
                                                          for p in imported.values()):
        ctx.ui.warn("%s holds tokens and is readable by others (mode %03o; the Rust CLI writes it so); "
                    "run: chmod 600 %s" % (quoted(path), stat.S_IMODE(st.st_mode), shell_quote(path)))
    existing = ctx.store.profiles()
    verbs = {}
    for name in imported:
        verbs[name] = ("replace" if args.overwrite else "keep") if name in existing else "add"

    def merge(doc):
        for name, profile in imported.items():
            if verbs[name] != "keep":
                doc["profiles"][name] = dict(profile)
        if doc.get("current_profile") is None and current is not None and verbs[current] != "keep":
            doc["current_profile"] = current  # kept when the file names one already

    if not args.dry_run and any(verb != "keep" for verb in verbs.values()):
        ctx.store.check_writable()
        ctx.store.modify(merge)
    done = {"add": "added", "replace": "replaced", "keep": "kept (exists; --overwrite replaces it)"}
    rows = [{"profile": name, "api_url": profile["api_url"],
             "tokens": "auth_token" in profile or "refresh_token" in profile,
             "result": ("would " + verbs[name]) if args.dry_run and verbs[name] != "keep" else done[verbs[name]]}
            for name, profile in imported.items()]
    if ctx.ui.emit_unless_table({"source": path, "dry_run": args.dry_run, "profiles": rows}):
        ctx.ui.table(
            ["Profile", "API URL", "Session", "Result"],
            [[r["profile"], r["api_url"], "yes" if r["tokens"] else "no", r["result"]] for r in rows],
            empty="No profiles in %s" % path)


# === Commands: packs =========================================================

group("pack", "list, show, create, install, register, upload, update and uninstall packs")

SKIP_TESTS = flag("--skip-tests: do not run the pack's tests")
ABSENT_METADATA = arg("--absent-metadata-policy: what happens to actions, rules, ... the new version no longer has "
                      "(default remove)", choices=("remove", "disable", "retain"), default="remove")
PACK_PATH_ARGS = (arg("path PATH: the pack directory (or .tar.gz archive for upload)"),
                  flag("-f --force: replace a pack with the same ref"), SKIP_TESTS,
                  ABSENT_METADATA)
INSTALL_POLL = 2  # seconds between looks at a pack install's tests
INSTALL_WAIT = 300  # seconds to wait for them
INSTALL_DONE = ("succeeded", "failed", "rolled_back")


def label_from_ref(ref):
    """'my_pack-name' -> 'My Pack Name', as the Rust CLI derives a pack label."""
    words = ref.replace("-", "_").replace(".", "_").split("_")
    return " ".join(w[:1].upper() + w[1:] for w in words if w)


def show_list_section(ctx, title, values):
    if values:
        ctx.ui.section(title)
        for value in values if isinstance(values, list) else [values]:
            ctx.ui.out("  %s %s" % (BULLET, cell_text(value)))


def pack_report(ctx, session, result, verb):
    """The answer of install, register and upload: {pack, test_result?, tests_skipped,
    install_id?}. With an install_id the server runs the pack's tests after answering:
    wait for them (every 2 s, up to 5 minutes). Failed tests are exit 1: the install was
    rolled back, or the pack is in place with failing tests."""
    pack = result.get("pack") if isinstance(result.get("pack"), dict) else {}
    install = wait_for_pack_tests(ctx, session, result.get("install_id"))
    if install:
        result = dict(result, install_status=install.get("status"), test_result=install.get("test_result"))

    if ctx.ui.emit_unless_table(result):
        if not install or install.get("status") == "succeeded":
            ctx.ui.success("Pack '%s' %s successfully" % (pack.get("ref"), verb))
        ctx.ui.info("  Version: %s" % pack.get("version"))
        ctx.ui.info("  ID: %s" % pack.get("id"))
        tests = result.get("test_result")
        if result.get("tests_skipped"):
            ctx.ui.info("  %s Tests were skipped" % CAUTION)
        elif isinstance(tests, dict):
            if tests.get("status") == "passed":
                ctx.ui.success("All tests passed")
            elif tests.get("status") == "failed":
                ctx.ui.out(CROSS + " Some tests failed")
            summary = tests.get("summary") if isinstance(tests.get("summary"), dict) else tests
            passed, total = summary.get("passed"), summary.get("total", summary.get("total_tests"))
            if isinstance(passed, int) and isinstance(total, int):
                ctx.ui.info("  Tests: %d/%d passed" % (passed, total))
    if install and install.get("status") != "succeeded":
        raise AttuneError("the pack's tests failed%s%s" % (
            " and the new pack install was rolled back" if install.get("status") == "rolled_back" else "",
            ": %s" % clip(str(install["error_message"]), 200) if install.get("error_message") else ""))


def wait_for_pack_tests(ctx, session, install_id):
    """GET /packs/install/{id} until its status is final; the install, or None when there
    is nothing to wait for or the wait ran out (said on stderr)."""
    if isinstance(install_id, bool) or not isinstance(install_id, int):
        return None
    ctx.ui.info("  Running pack tests (install %d)..." % install_id)
    deadline = ctx.deadline.until(time.monotonic() + INSTALL_WAIT)  # each request ends by then too
    while True:
        try:
            install = session.fetch("GET", "/packs/install/%d" % install_id)
        except NetworkError:
            if time.monotonic() < deadline:
                raise
            install = {}  # the look that ran out of time: the wait is over, the pack is in
        if install.get("status") in INSTALL_DONE:
            if install["status"] == "succeeded":
                ctx.ui.success("  Pack tests passed")
            return install  # failed tests: pack_report ends with the error
        if time.monotonic() + INSTALL_POLL > deadline:
            say(ctx.ui.stderr, "%s   Timed out waiting for pack tests to complete" % CROSS)
            return None
        time.sleep(INSTALL_POLL)


@command("pack list", "list installed packs",
         "-n --name: only packs whose ref contains this", ALL,
         examples=("attune pack list",
                   "attune pack list --name core -j"))
def cmd_pack_list(ctx, args):
    walk = ListWalk(ctx.session(), "/packs", every_page=args.all)
    packs = (p for p in walk if not args.name or args.name in str(p.get("ref", "")))
    emit_list(ctx, packs, walk, "packs", "Ref=ref|Version=version|Description=description~50")


@command("pack show", "show one pack", ref("pack", "packs"),
         examples=("attune pack show core",))
def cmd_pack_show(ctx, args):
    pack = ctx.session().fetch("GET", "/packs/" + path_segment(args.ref))
    meta = pack.get("meta") if isinstance(pack.get("meta"), dict) else {}

    if ctx.ui.emit_unless_table(pack):
        ctx.ui.pairs([*labelled(pack, "Ref=ref|Label=label|Version=version"),
                      ("Author", pack.get("author") or meta.get("author") or "Unknown"),
                      *labelled(pack, "Description=description?"),
                      ("Actions", pack.get("action_count") or 0), ("Triggers", pack.get("trigger_count") or 0),
                      ("Rules", pack.get("rule_count") or 0), ("Sensors", pack.get("sensor_count") or 0)]
                     + timestamps(pack), "Pack: %s" % pack.get("label"))
        show_list_section(ctx, "Runtime Dependencies", pack.get("runtime_deps"))
        show_list_section(ctx, "Pack Dependencies", pack.get("dependencies"))


@command("pack create", "create an empty pack",
         "-r --ref: unique pack ref (required)",
         "-l --label: label (default: the ref, title-cased)",
         "-d --description: description",
         arg("--pack-version VERSION: version (default 0.1.0)", default="0.1.0"),
         "--tags A,B: comma-separated tags",
         examples=("attune pack create -r mypack -d 'my actions'",))
def cmd_pack_create(ctx, args):
    if not args.ref:
        raise UsageError("Pack ref is required. Provide --ref <value>.")
    body = {"ref": args.ref, "label": args.label or label_from_ref(args.ref)}
    if args.description is not None:
        body["description"] = args.description
    body.update(version=args.pack_version, tags=split_list(args.tags))
    pack = ctx.session().fetch("POST", "/packs", body)
    if ctx.ui.emit_unless_table(pack):
        ctx.ui.success("Pack '%s' created successfully (id: %s)"
                       % (pack.get("ref"), pack.get("id")))


def pack_source_kind(source, no_registry):
    lowered = source.lower()
    if lowered.startswith(("git@", "git://", "ssh://")) or lowered.endswith(".git"):
        return "git repository"
    if lowered.startswith(("http://", "https://")):
        return "archive URL" if lowered.endswith((".tar.gz", ".tgz", ".zip")) else "URL"
    if os.path.exists(source) or source.startswith(("/", "./", "../")):
        return "local archive" if lowered.endswith((".tar.gz", ".tgz", ".zip")) else "local directory"
    return "unknown source" if no_registry else "registry reference"


@command("pack install", "install a pack from a registry, git, a URL or a path",
         "source SOURCE: registry pack ref, git URL, archive URL or path",
         "-r --ref-spec: git branch, tag or commit",
         arg("--registry-id N: install from this registry (pack index)", type=ID_NUMBER),
         flag("-f --force: reinstall if it exists"),
         SKIP_TESTS,
         flag("--skip-deps: skip dependency validation"),
         flag("--no-registry: treat SOURCE as a URL or path"), ABSENT_METADATA,
         examples=("attune pack install https://github.com/example/attune-pack-demo.git -r v1.2.0",
                   "attune pack install demo --registry-id 1"))
def cmd_pack_install(ctx, args):
    if args.registry_id is not None and args.no_registry:
        raise UsageError("--registry-id cannot be combined with --no-registry")
    body = {"source": args.source, "ref_spec": args.ref_spec, "registry_id": args.registry_id,
            "no_registry": args.no_registry, "force": args.force, "skip_tests": args.skip_tests,
            "skip_deps": args.skip_deps, "absent_metadata_policy": args.absent_metadata_policy}
    ctx.ui.info("Installing pack from source type: %s" % pack_source_kind(args.source, args.no_registry))
    ctx.ui.info("Starting installation...")
    if args.skip_deps:
        ctx.ui.info(CAUTION + " Dependency validation will be skipped")
    session = ctx.session()
    pack_report(ctx, session, session.fetch("POST", "/packs/install", body), "installed")


@command("pack register", "register a pack from a path the server can see", *PACK_PATH_ARGS,
         examples=("attune pack register /opt/attune/packs/mypack",))
def cmd_pack_register(ctx, args):
    if not args.path.startswith(("/opt/attune/", "/app/", "/packs")):
        ctx.ui.warn("'%s' looks like a local path; a server in a container may not see it. "
                    "Use 'attune pack upload %s' to send the pack itself" % (args.path, args.path))
    ctx.ui.info("Registering pack from: %s" % args.path)
    body = {"path": args.path, "force": args.force, "skip_tests": args.skip_tests,
            "absent_metadata_policy": args.absent_metadata_policy}
    session = ctx.session()
    pack_report(ctx, session, session.fetch("POST", "/packs/register", body), "registered")


def pack_ref_from_yaml(text):
    """The top-level 'ref:' of a pack.yaml (a one-line lookup; no YAML parser needed)."""
    for line in text.splitlines():
        if line.startswith("ref:"):
            return line[4:].split("#")[0].strip().strip("'\"") or None
    return None


def pack_archive(path):
    """(tar.gz bytes, pack ref) for a pack directory (packed in memory, .git and
    symlinks left out) or an existing .tar.gz file."""
    import tarfile
    if os.path.isdir(path):
        manifest = os.path.join(path, "pack.yaml")
        if not os.path.isfile(manifest):
            raise UsageError("No pack.yaml found in: %s" % path)
        try:
            text = read_regular_file(manifest, DATA_FILE_LIMIT)[0].decode("utf-8", "replace")
        except OSError as e:
            raise UsageError("cannot read %s: %s" % (manifest, e.strerror or e))
        ref = pack_ref_from_yaml(text) or os.path.basename(os.path.abspath(path))
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d != ".git" and not os.path.islink(os.path.join(root, d)))
                for name in sorted(files):
                    full = os.path.join(root, name)
                    if not os.path.islink(full):
                        tar.add(full, arcname=os.path.relpath(full, path), recursive=False)
        return buffer.getvalue(), ref
    if os.path.isfile(path):
        try:
            data = read_regular_file(path, ARCHIVE_LIMIT)[0]
        except OSError as e:
            raise UsageError("cannot read %s: %s" % (path, e.strerror or e))
        if not data.startswith(b"\x1f\x8b"):
            raise UsageError("%s is neither a pack directory nor a .tar.gz archive" % path)
        ref = None
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
                for member in tar.getmembers():
                    if os.path.basename(member.name) == "pack.yaml" and member.name.count("/") <= 1:
                        ref = pack_ref_from_yaml(tar.extractfile(member).read().decode("utf-8", "replace"))
                        break
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UsageError("cannot read archive %s: %s" % (path, e))
        return data, ref or os.path.basename(path).split(".")[0]
    raise UsageError("Path does not exist: %s" % path)


def multipart_body(fields, file_field, filename, content, content_type):
    """(body, Content-Type) of a multipart/form-data request with text fields and one file."""
    boundary = "attune-py-" + binascii.hexlify(os.urandom(12)).decode("ascii")
    parts = []
    for name, value in fields:
        parts.append(('--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                      % (boundary, name, value)).encode("utf-8"))
    parts.append(('--%s\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
                  'Content-Type: %s\r\n\r\n' % (boundary, file_field, filename, content_type)).encode("utf-8"))
    parts.append(content + ("\r\n--%s--\r\n" % boundary).encode("ascii"))
    return b"".join(parts), "multipart/form-data; boundary=" + boundary


@command("pack upload", "upload a pack directory or .tar.gz and register it", *PACK_PATH_ARGS,
         examples=("attune pack upload ./mypack",
                   "attune pack upload mypack-1.0.0.tar.gz --force"))
def cmd_pack_upload(ctx, args):
    archive, ref = pack_archive(args.path)
    ctx.ui.info("Uploading pack '%s' from: %s" % (ref, args.path))
    ctx.ui.info("Archive ready (%d KB), uploading..." % (len(archive) // 1024))
    fields = [(name, "true") for name in ("force", "skip_tests") if getattr(args, name)]
    fields.append(("absent_metadata_policy", args.absent_metadata_policy))
    body, content_type = multipart_body(fields, "pack", ref + ".tar.gz", archive, "application/gzip")
    session = ctx.session()
    resp = session.request("POST", "/packs/upload", raw_body=body, content_type=content_type)
    resp.check()
    pack_report(ctx, session, unwrap(resp), "uploaded and registered")


@command("pack update", "change a pack's label, description or version", ref("pack", "packs"),
         "--label: new label", "--description: new description (an empty one clears it)",
         arg("--version --pack-version VERSION: the pack's new version", dest="pack_version"),
         examples=("attune pack update mypack --version 1.1.0",))
def cmd_pack_update(ctx, args):
    body = update_body([("label", args.label), ("description", patch_op(args.description, empty_clears=True)),
                        ("version", args.pack_version)])
    pack = ctx.session().fetch("PUT", "/packs/" + path_segment(args.ref), body)

    if ctx.ui.emit_unless_table(pack):
        ctx.ui.success("Pack '%s' updated successfully" % pack.get("ref"))
        ctx.ui.pairs(labelled(pack, "Ref=ref|Label=label|Version=version|Description=description?|Updated=updated@"))


@command("pack uninstall", "uninstall a pack", ref("pack", "packs"), YES,
         examples=("attune pack uninstall mypack --yes",))
def cmd_pack_uninstall(ctx, args):
    delete_resource(ctx, args, "uninstall pack '%s'" % args.ref, "/packs/" + path_segment(args.ref),
                    "Pack '%s' uninstalled successfully" % args.ref, "Pack uninstalled successfully",
                    "Uninstall cancelled")


# === Commands: actions =======================================================

group("action", "list, show, search, execute, enable, disable and delete actions")

# the options of action execute, run and execution rerun
EXECUTE_ARGS = (
    arg("--param KEY=VALUE: a parameter; the value is parsed as JSON when it parses (repeatable)", action="append",
        default=[], complete="parameters"),
    arg("--params-json JSON: all parameters as one JSON object"),
    arg("--worker-selector JSON: worker label selector (JSON object)"),
    arg("--worker-tolerations JSON: worker tolerations (JSON array)"),
    arg("--worker-affinity JSON: worker affinity (JSON object)"),
    arg("--execution-timeout SECONDS: timeout the server enforces on the execution", type=Seconds(1)),
    arg("--env KEY=VALUE: an environment variable for the action (repeatable)", action="append"),
    arg("--env-json JSON: all environment variables as one JSON object of strings"),
    arg("--permission-set REF: run with this permission set's grants (repeatable)", action="append"),
    flag("--no-api-token: give the execution no API token (no permission sets)"),
    arg("--artifact-retention-policy: how the execution's artifacts are kept: versions, days, hours or minutes",
        choices=("versions", "days", "hours", "minutes")),
    arg("--artifact-retention-limit N: how many artifact versions (or days, ...) to keep", type=ID_NUMBER),
    flag("-w --watch: wait for the execution to finish"),
    arg("--timeout SECONDS: with --watch: stop waiting after this long (default %d)" % WATCH_TIMEOUT, type=Seconds(1)),
    arg("--notifier-url URL: with --watch: the notifier's WebSocket URL (default: ATTUNE_NOTIFIER_WS_URL, else from "
        "the API URL)"))


def execution_parameters(args, base=None):
    """--params-json replaces everything; --param k=v pairs go on top of base."""
    if args.params_json is not None and args.param:
        raise UsageError("use either --param or --params-json, not both")
    if args.params_json is not None:
        params = parse_json_arg(args.params_json, "--params-json")
        if not isinstance(params, dict):
            raise UsageError("--params-json must be a JSON object")
        return params
    params = dict(base or {})
    params.update(parse_param_pairs(args.param))
    return params


def execute_body(args, action_ref, parameters):
    """The POST /executions/execute body, optional fields only when given."""
    body = {"action_ref": action_ref, "parameters": parameters}
    for flag in ("worker_selector", "worker_tolerations", "worker_affinity"):
        value = getattr(args, flag)
        if value is not None:
            body[flag] = parse_json_arg(value, "--" + flag.replace("_", "-"))
    if args.execution_timeout is not None:
        body["timeout_seconds"] = args.execution_timeout
    env = environment_variables(args)
    if env is not None:
        body["env_vars"] = env
    if args.permission_set is not None and args.no_api_token:
        raise UsageError("--permission-set and --no-api-token contradict each other")
    if args.permission_set is not None:
        if not all(ref.strip() for ref in args.permission_set):
            raise UsageError("Permission set refs cannot be empty")
        body["permission_set_refs"] = args.permission_set
    elif args.no_api_token:
        body["permission_set_refs"] = []  # an explicit empty list: not the action's default sets
    if args.artifact_retention_policy is not None:
        body["artifact_retention_policy"] = args.artifact_retention_policy
    if args.artifact_retention_limit is not None:
        body["artifact_retention_limit"] = args.artifact_retention_limit
    return body


def environment_variables(args):
    """env_vars from --env KEY=VALUE or --env-json; None when neither is given. Names with
    the ATTUNE_ prefix are the worker's own and are refused."""
    if args.env and args.env_json is not None:
        raise UsageError("--env and --env-json contradict each other")
    if args.env_json is not None:
        env = parse_json_arg(args.env_json, "--env-json")
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise UsageError("Invalid --env-json: it must be a JSON object of strings")
    elif args.env:
        env = {}
        for item in args.env:
            name, eq, value = item.partition("=")
            if not eq:
                raise UsageError("Invalid environment variable %s. Expected KEY=VALUE" % quoted(item))
            if not name:
                raise UsageError("Environment variable name cannot be empty")
            env[name] = value
    else:
        return None
    reserved = sorted(name for name in env if name.upper().startswith("ATTUNE_"))
    if reserved:
        raise UsageError("environment variable %s uses the reserved ATTUNE_ prefix" % quoted(reserved[0]))
    return env


def schema_rows(schema):
    """Rows (name, type, required, default, description) of a parameter schema, in the
    flat form packs use ({"name": {"type": ...}}) or as a JSON Schema object."""
    if not isinstance(schema, dict):
        return []
    required = set()
    properties = schema
    if isinstance(schema.get("properties"), dict):
        properties = schema["properties"]
        required = set(schema.get("required") or ())
    rows = []
    for name, spec in properties.items():
        spec = spec if isinstance(spec, dict) else {"type": spec}
        default = spec.get("default")
        rows.append([name, spec.get("type"), name in required or spec.get("required") is True,
                     default if default is None or isinstance(default, str) else json.dumps(default),
                     spec.get("description")])
    return rows


def show_schema(ctx, title, schema):
    if schema in (None, {}, []):
        return
    ctx.ui.section(title)
    rows = schema_rows(schema)
    if rows and all(isinstance(v, dict) for v in (schema.get("properties") or schema).values()):
        ctx.ui.table(["Name", "Type", "Required", "Default", "Description"], rows)
    else:
        ctx.ui.out(to_json(schema))


def runtime_text(item, is_workflow=None):
    if item.get("workflow_def") is not None if is_workflow is None else is_workflow:
        return "Workflow"
    ref, constraint = item.get("runtime_ref"), item.get("runtime_version_constraint")
    if ref:
        return "%s (%s)" % (ref, constraint) if constraint else ref
    return "(unknown) (%s)" % constraint if constraint else "none"


def action_pairs(action, entry_label="Entry Point"):
    return [*labelled(action, "Reference=ref|Pack=pack_ref|Label=label|Description=description?"),
            (entry_label, action.get("entrypoint")),
            ("Runtime", runtime_text(action)), ("Enabled", action.get("enabled"))]


@command("action list", "list actions", "--pack: only this pack's actions",
         "-n --name: only actions whose ref contains this", ALL,
         examples=("attune action list --pack core",))
def cmd_action_list(ctx, args):
    path = "/packs/%s/actions" % path_segment(args.pack) if args.pack else "/actions"
    walk = ListWalk(ctx.session(), path, every_page=args.all)
    actions = (a for a in walk if not args.name or args.name in str(a.get("ref", "")))
    emit_list(ctx, actions, walk, "actions", ["Ref", "Label", "Runtime", "Enabled", "Description"],
              lambda a: [*cells(a, "ref label"), runtime_text(a), *cells(a, "enabled description~40")])


@command("action show", "show one action and its parameters", ref("action", "actions"),
         examples=("attune action show core.echo  # with its parameters",))
def cmd_action_show(ctx, args):
    action = ctx.session().fetch("GET", "/actions/" + path_segment(args.ref))

    if ctx.ui.emit_unless_table(action):
        ctx.ui.pairs(action_pairs(action) + timestamps(action), "Action: %s" % action.get("ref"))
        show_schema(ctx, "Parameters Schema", action.get("param_schema"))


@command("action search", "search actions by keywords",
         arg("query QUERY: keywords, all of which must match", nargs="?"),
         arg("--pack P: only in this pack (repeatable)", action="append"),
         arg("--limit: at most this many (default 50)", type=Number(1, 100000), default=50),
         examples=("attune action search http --pack core",))
def cmd_action_search(ctx, args):
    query = {"q": (args.query or "").strip() or None, "packs": ",".join(args.pack) if args.pack else None,
             "page_size": max(1, min(args.limit, ALL_PAGE_SIZE)), "page": 1}
    hits, _ = fetch_list(ctx.session(), "/actions/search", query)
    if ctx.ui.emit_unless_table(hits):
        ctx.ui.table(
            ["Ref", "Pack", "Label", "Runtime", "MCP", "Description"],
            [[*cells(h, "ref pack_ref label"), runtime_text(h, bool(h.get("is_workflow"))),
              "yes" if h.get("accesses_mcp") else "", cell(h, "description~50")] for h in hits],
            empty="No actions matched the search query")


@command("action update", "change an action (only the fields given)", ref("action", "actions"),
         "--label: new label",
         "--description: new description",
         "--entrypoint: new entry point (the script or workflow file)",
         arg("--runtime RUNTIME_ID: runtime id", type=ID_NUMBER),
         arg("--enabled BOOL: true or false", type=parse_bool),
         arg("--timeout-seconds N: the action's execution timeout", type=Seconds(1, MAX_SECONDS)),
         flag("--clear-timeout: remove the action's execution timeout"),
         examples=("attune action update mypack.build --timeout-seconds 10m",))
def cmd_action_update(ctx, args):
    if args.timeout_seconds is not None and args.clear_timeout:
        raise UsageError("--timeout-seconds and --clear-timeout contradict each other")
    timeout = {"op": "clear"} if args.clear_timeout else patch_op(args.timeout_seconds)
    body = update_body([("label", args.label), ("description", args.description), ("entrypoint", args.entrypoint),
                        ("runtime", args.runtime), ("enabled", args.enabled), ("timeout_seconds", timeout)])
    update_action(ctx, args.ref, body)


def update_action(ctx, ref, body):
    action = ctx.session().fetch("PUT", "/actions/" + path_segment(ref), body)

    if ctx.ui.emit_unless_table(action):
        ctx.ui.success("Action '%s' updated successfully" % action.get("ref"))
        ctx.ui.pairs(action_pairs(action, "Entrypoint") + labelled(action, "Updated=updated@"))


@command("action disable", "disable an action", ref("action", "actions"), enable=False,
         examples=("attune action disable mypack.build",))
@command("action enable", "enable an action", ref("action", "actions"), enable=True,
         examples=("attune action enable mypack.build",))
def cmd_action_toggle(ctx, args):
    update_action(ctx, args.ref, {"enabled": args.enable})


@command("action delete", "delete an action", ref("action", "actions"), YES,
         examples=("attune action delete mypack.build --yes",))
def cmd_action_delete(ctx, args):
    delete_resource(ctx, args, "delete action '%s'" % args.ref, "/actions/" + path_segment(args.ref),
                    "Action '%s' deleted successfully" % args.ref, "Action deleted successfully")


def start_execution(ctx, args, body, started_message, extra_pairs=()):
    """POST /executions/execute; print it, or with --watch wait and print the outcome."""
    if args.timeout is not None and not args.watch:
        raise UsageError("--timeout only applies with --watch")
    if args.notifier_url is not None and not args.watch:
        raise UsageError("--notifier-url only applies with --watch")
    session = ctx.session()
    execution = session.fetch("POST", "/executions/execute", body)
    if not args.watch:
        if ctx.ui.emit_unless_table(execution):
            ctx.ui.success(started_message % execution.get("id"))
            ctx.ui.pairs(labelled(execution, "Execution ID=id|Action=action_ref|Status=status") + list(extra_pairs))
        return
    ctx.ui.info("Waiting for execution %s to complete..." % execution.get("id"))
    timeout = args.timeout if args.timeout is not None else WATCH_TIMEOUT
    return watch_execution(ctx, session, int(execution["id"]), timeout, notifier_base(ctx, session))


@command("action execute", "run an action", ref("action (pack.action)", "actions"), *EXECUTE_ARGS,
         examples=("attune action execute core.echo --param message=hello -w",), note=WATCH_KEYS)
@command("run", "run an action (same as action execute)", ref("action (pack.action)", "actions"), *EXECUTE_ARGS,
         note=WATCH_KEYS, examples=("attune run core.echo --param message=hello  # prints the execution id",
                   "attune run core.echo --param message=hello -w  # waits; exit 0 only when it succeeds",
                   "attune run core.http --params-json '{\"url\": \"https://example.com\"}' -w --timeout 10m"))
def cmd_action_execute(ctx, args):
    body = execute_body(args, args.ref, execution_parameters(args))
    ctx.ui.info("Executing action: %s" % args.ref)
    return start_execution(ctx, args, body, "Execution %s started")


# === Commands: executions ====================================================

group("execution", "list, show, watch, cancel and rerun executions, read logs")


# -- waiting for an execution (run --wait, execution watch) and reading its logs ----------

class Detached(Exception):
    """Ctrl+D during a watch: stop watching, leave the execution running."""


class WatchControls:
    """The keys and signals of a watch. SIGINT (Ctrl+C) always means cancel, even when the
    shell started us with SIGINT ignored. When stdin is the terminal in whose foreground we
    run, the terminal stops echoing and line-buffering (signals and output processing stay
    as they were) so Ctrl+D arrives as a key and detaches; the mode is restored on every
    way out, before any cancel request is sent. Use it as a `with` block; keys=False arms
    SIGINT only (the list watch, which Ctrl+C just ends)."""

    def __init__(self, ctx, keys=True):
        self.ui = ctx.ui
        self.keys = keys
        self.fd = None  # the terminal's descriptor while keys are read
        self.saved_mode = self.saved_sigint = None

    def __enter__(self):
        import signal
        EXIT_SIGNALS.arm()  # SIGTERM and SIGHUP restore the terminal too
        try:
            self.saved_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        except ValueError:  # not the main thread (attune.main() called from a thread): signals stay as they are
            self.saved_sigint = None
        try:
            fd = self.ui.stdin.fileno()
            if not self.keys or not os.isatty(fd) or os.tcgetpgrp(fd) != os.getpgrp():
                return self  # piped, closed, /dev/null or a background job: no keys
            import termios
            self.saved_mode = termios.tcgetattr(fd)
            mode = termios.tcgetattr(fd)
            mode[3] &= ~(termios.ICANON | termios.ECHO)
            mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
            termios.tcsetattr(fd, termios.TCSANOW, mode)
            self.fd = fd
        except (AttributeError, ValueError, OSError, ImportError):
            self.saved_mode = None
            return self
        say(self.ui.stderr, "Ctrl+C requests cancellation; Ctrl+D detaches.")
        return self

    def __exit__(self, *exc):
        import signal
        if self.fd is not None:
            import termios
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved_mode)
            except (OSError, termios.error):
                self.ui.warn("Failed to restore terminal mode")
            self.fd = None
        if self.saved_sigint is not None:
            signal.signal(signal.SIGINT, self.saved_sigint)

    def pause(self, seconds, sock=None):
        """Sleep up to seconds; True as soon as sock (if any) has something to read. Ctrl+D
        raises Detached, a Ctrl+C that arrives as a key raises KeyboardInterrupt."""
        watched = [f for f in (self.fd, sock) if f is not None]
        if not watched:
            time.sleep(max(0.0, seconds))
            return False
        import select
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready = select.select(watched, [], [], left)[0]
            if self.fd is not None and self.fd in ready:
                try:
                    keys = os.read(self.fd, 64)
                except OSError:  # EIO: the terminal hung up
                    keys = b""
                if not keys:
                    raise AttuneError("Terminal input stream closed")
                if b"\x04" in keys:
                    raise Detached()
                if b"\x03" in keys:
                    raise KeyboardInterrupt()
            if sock is not None and sock in ready:
                return True


def watch_execution(ctx, session, execution_id, timeout, notifier_url):
    """The one watch behind run -w, action execute --watch, execution rerun --watch and
    execution watch ID: wait for the end, or cancel on Ctrl+C (exit 130), or detach on
    Ctrl+D (exit 0); the finished execution's summary otherwise."""
    try:
        with WatchControls(ctx) as controls:
            execution = wait_for_execution(ctx, session, execution_id, timeout, controls, notifier_url)
    except KeyboardInterrupt:
        return cancel_watched(ctx, session, execution_id)
    except Detached:
        if ctx.ui.emit_unless_table({"execution_id": execution_id, "watch_status": "detached",
                                     "execution_status": None}):
            ctx.ui.info("Detached from execution %d. No cancellation was requested." % execution_id)
        return 0
    show_finished_execution(ctx, execution)
    return 0


CANCEL_TIMEOUT = 10  # seconds a watch's cancel request may take


def cancel_watched(ctx, session, execution_id):
    """Ctrl+C during a watch: ask the server to cancel, without a prompt; exit 130."""
    try:
        execution = session.fetch("POST", "/executions/%d/cancel" % execution_id, {}, timeout=CANCEL_TIMEOUT)
    except NetworkError as e:
        if e.kind != "timeout":
            raise
        raise AttuneError("Cancellation request timed out; its server-side outcome is unknown")
    status = execution.get("status") if isinstance(execution, dict) else None
    if ctx.ui.emit_unless_table({"execution_id": execution_id, "watch_status": "cancel_requested",
                                 "execution_status": status}):
        ctx.ui.info("Cancellation requested for execution %d" % execution_id)
    return 130


def wait_for_execution(ctx, session, execution_id, timeout, controls, notifier_url=None):
    """The execution once its status is terminal, or exit 1 when the timeout passes first.
    Live updates come from the notifier while it answers (all but the last 10 s of the
    timeout); then GET /executions/{id} with a growing interval, up to 2 s."""
    started = time.monotonic()
    deadline = ctx.deadline.until(started + timeout)
    progress = Progress(ctx)
    try:
        if notifier_url:
            live_until = deadline - 10 if timeout > 10 else deadline
            try:
                execution = notifier_wait(ctx, session, execution_id, notifier_url, live_until, controls, progress)
                if execution is not None:
                    return execution
            except (OSError, ValueError, WebSocketError) as e:
                ctx.ui.log("notifier %s: %s; polling instead" % (notifier_url, e))
        return poll_execution(session, execution_id, timeout, deadline, controls.pause, lambda status: progress.show(
            "Execution %d: %s (%ds)" % (execution_id, status or "?", time.monotonic() - started)))
    except NetworkError as e:  # the notifier's first look at the execution, cut short by the deadline
        raise wait_timed_out(e, deadline, timeout, execution_id)
    finally:
        progress.clear()


def show_finished_execution(ctx, execution):
    """'Execution N completed', its details, stdout and result; exit 1 unless it succeeded."""
    status = str(execution.get("status") or "")

    if ctx.ui.emit_unless_table(execution):
        result = execution.get("result")
        stdout = result.get("stdout") if isinstance(result, dict) else None
        if status.lower() in SUCCESS_STATUSES:
            ctx.ui.success("Execution %s completed" % execution.get("id"))
        else:
            ctx.ui.out(CROSS + " " + terminal_safe("Execution %s %s" % (execution.get("id"), status or "ended"), keep=""))
        ctx.ui.pairs([*labelled(execution, "Execution ID=id|Action=action_ref"),
                      ("Status", status)] + timestamps(execution), "Execution Details")
        if isinstance(stdout, str):
            ctx.ui.section("Stdout")
            ctx.ui.out(stdout.rstrip("\n"))
            result = {k: v for k, v in result.items() if k != "stdout"}
        show_json_section(ctx, "Result", result)
    if status.lower() not in SUCCESS_STATUSES:
        raise AttuneError("execution finished with status '%s'" % status)


EVENT_STREAM = "text/event-stream"  # what session.request(stream=...) asks for to read server-sent events


def sse_events(stream):
    """(event, data, id) for each server-sent event; comments come as ('comment', text, None).
    Ends at the end of the stream; a dropped connection raises OSError or HTTPException."""
    event, data, event_id, size = None, [], None, 0
    while True:
        raw = stream.readline(EVENT_LIMIT + 1)
        size += len(raw)
        if size > EVENT_LIMIT:
            raise ServerError("an event of the server's stream is larger than %d MiB, the most "
                              "attune.py reads into memory" % (EVENT_LIMIT >> 20))
        if not raw:
            return
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data or event:
                yield event or "message", "\n".join(data), event_id
            event, data, event_id, size = None, [], None, 0
        elif line.startswith(":"):
            size = size if data else 0  # a keep-alive comment between events
            yield "comment", line[1:].strip(), None
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                event_id = value


def read_log_stream(ctx, session, execution_id, name, follow, write):
    """Read /executions/{id}/logs/{name}/stream, passing content to write(text).
    Without follow: the catch-up only. With follow: until the 'done' event,
    reconnecting from the last byte offset when the connection drops (a 401 on
    reconnect refreshes the token, as every request does) and when the token it was
    opened with is renewed, so an hours-long follow always holds a live token. Returns
    the offset."""
    import http.client
    path = "/executions/%d/logs/%s/stream" % (execution_id, name)
    offset, drops = 0, 0
    while True:
        resp = session.request("GET", path, query={"offset": offset} if offset else None,
                               stream=EVENT_STREAM)
        resp.check()
        opened_with = session.creds.access
        events = sse_events(resp.stream)
        renewed = False
        try:
            while True:
                try:  # only reading the stream counts as a drop; a failing write() is not one
                    event, data, event_id = next(events)
                except StopIteration:
                    break
                except (OSError, http.client.HTTPException) as e:
                    ctx.ui.log("log stream interrupted: %s" % e.__class__.__name__)
                    break
                if event in ("content", "append"):
                    write(data)
                    if event_id and set(event_id) <= DIGITS:
                        offset = int(event_id)
                    drops = 0
                elif event == "done":
                    return offset
                elif event == "error":
                    raise ApiError("the log stream failed: %s" % data)
                elif not follow and (data == "initial-catchup-complete" or (
                        event == "waiting" and data == "Waiting for log output")):
                    return offset
                if follow and opened_with and session.token() != opened_with:  # refreshed when due
                    renewed = True
                    break
        finally:
            resp.stream.close()
        if renewed:
            ctx.ui.log("the access token was renewed; reopening the log stream at byte %d" % offset)
            continue
        drops += 1
        if drops > 5:
            raise NetworkError("the log stream of execution %d keeps dropping (at byte %d)"
                               % (execution_id, offset))
        ctx.ui.log("log stream ended before 'done'; reconnecting from byte %d" % offset)
        time.sleep(min(0.2 * drops, 2.0))


# -- the notifier's WebSocket: what a watch listens to before it polls --------------
# Attune's notifier pushes status changes over a WebSocket (RFC 6455). The client side
# needs little: an HTTP/1.1 upgrade, masked text frames out, unmasked frames in, pongs for
# pings, and a close. Whatever goes wrong, the watch falls back to polling.

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WEBSOCKET_MESSAGE_LIMIT = 1 << 20  # bytes: a notification is a few hundred


def notifier_base(ctx, session):
    """The notifier's URL (its /ws is added when connecting): --notifier-url,
    ATTUNE_NOTIFIER_WS_URL, or the API URL with ws(s) for http(s), port 8081 for 8080 (the
    server's defaults) and its path kept (a reverse proxy's https://gw/attune gives
    wss://gw/attune/ws). None when the watch must poll instead: a stored session is sent
    only to a notifier on its API's host, over wss when the API is https."""
    flag = getattr(ctx.args, "notifier_url", None)
    env = (ctx.env.get("ATTUNE_NOTIFIER_WS_URL") or "").strip()
    if flag is not None:
        url, where = check_api_url(flag, "--notifier-url", "notifier URL", ("ws", "wss")), "--notifier-url"
    elif env:
        url, where = check_api_url(env, "ATTUNE_NOTIFIER_WS_URL", "notifier URL", ("ws", "wss")), \
            "ATTUNE_NOTIFIER_WS_URL"
    else:
        scheme, _, rest = session.api_url.partition("://")
        authority, slash, path = rest.partition("/")
        if authority.endswith(":8080"):
            authority = authority[:-4] + "8081"
        return ("wss" if scheme.lower() == "https" else "ws") + "://" + authority + slash + path
    if session.creds.source == "file" and not notifier_may_carry(url, session.api_url):
        ctx.ui.log("the notifier %s (%s) is not on the host of %s over the same security: the stored session "
                   "is not sent there; polling instead" % (url, where, session.api_url))
        return None
    return url


def notifier_may_carry(url, api_url):
    """True when a stored session may go to the notifier at url: the API's host, wss for https."""
    notifier, api = origin(url), origin(api_url)
    secure = {"ws": "http", "wss": "https"}.get(notifier[0])
    return notifier[1] == api[1] and (secure == api[0] or (api[0] == "http" and secure == "https"))


class WebSocket:
    """One client connection to a WebSocket server."""

    def __init__(self, sock, buffered=b""):
        self.sock = sock
        self.buffer = buffered

    @classmethod
    def connect(cls, url, token, deadline, tls):
        """Open url (ws:// or wss://) with the attune.v1 protocol and the bearer token (None:
        none); each step of it, and of what follows, under deadline (a RequestDeadline).
        tls() gives the SSL context of the session whose token it carries."""
        import hashlib
        import socket
        from urllib.parse import urlsplit
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host, port = parts.hostname, parts.port or (443 if secure else 80)
        sock = socket.create_connection((host, port), deadline.left())
        try:
            if secure:
                sock.settimeout(deadline.left())  # the bound of the whole handshake
                sock = tls().wrap_socket(sock, server_hostname=host)
            sock = DeadlineSocket(sock, deadline)
            key = binascii.b2a_base64(os.urandom(16)).decode("ascii").strip()
            lines = ["GET %s HTTP/1.1" % (parts.path or "/"), "Host: %s" % parts.netloc,
                     "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: " + key,
                     "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: attune.v1",
                     "User-Agent: " + user_agent()]
            if token:
                lines.append("Authorization: Bearer " + token)
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk or len(head) > 16384:
                    raise WebSocketError("no upgrade answer")
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            status, _, fields = head.decode("latin-1").partition("\r\n")
            if status.split(" ")[1:2] != ["101"]:
                raise WebSocketError("the upgrade was refused (%s)" % terminal_safe(status[:80]))
            headers = {}
            for field in fields.split("\r\n"):
                name, _, value = field.partition(":")
                headers[name.strip().lower()] = value.strip()
            expected = binascii.b2a_base64(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode().strip()
            if headers.get("sec-websocket-accept") != expected:
                raise WebSocketError("the upgrade answer has a wrong Sec-WebSocket-Accept")
            return cls(sock, rest)
        except BaseException:
            sock.close()
            raise

    def _read(self, count):
        while len(self.buffer) < count:
            chunk = self.sock.recv(max(4096, count - len(self.buffer)))
            if not chunk:
                raise WebSocketError("the connection closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def pending(self):
        """Bytes already received but not yet read (select() cannot see them)."""
        return bool(self.buffer) or bool(getattr(self.sock, "pending", lambda: 0)())

    def receive(self):
        """The next text message as a str; pings are answered on the way, a close frame or
        anything outside the protocol raises WebSocketError."""
        import struct
        message = None
        while True:
            first, second = bytearray(self._read(2))
            opcode, final = first & 0x0F, first & 0x80
            if first & 0x70 or second & 0x80:
                raise WebSocketError("a frame with reserved bits or a mask")
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            if length > WEBSOCKET_MESSAGE_LIMIT or (opcode >= 8 and (length > 125 or not final)):
                raise WebSocketError("a frame of %d bytes" % length)
            payload = self._read(length)
            if opcode == 9:
                self.send(10, payload)
            elif opcode == 8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                raise WebSocketError("closed by the server (%d %s)"
                                     % (code, terminal_safe(payload[2:].decode("utf-8", "replace")[:80])))
            elif (opcode == 1 and message is None) or (opcode == 0 and message is not None):
                message = (message or b"") + payload
                if len(message) > WEBSOCKET_MESSAGE_LIMIT:
                    raise WebSocketError("a message over %d bytes" % WEBSOCKET_MESSAGE_LIMIT)
                if final:
                    return message.decode("utf-8")
            elif opcode != 10:
                raise WebSocketError("an unexpected frame (opcode %d)" % opcode)

    def send(self, opcode, payload):
        """One final frame, masked as a client must."""
        import struct
        mask = bytearray(os.urandom(4))
        size = len(payload)
        header = bytearray([0x80 | opcode])
        if size < 126:
            header.append(0x80 | size)
        elif size < 65536:
            header += bytearray([0x80 | 126]) + struct.pack(">H", size)
        else:
            header += bytearray([0x80 | 127]) + struct.pack(">Q", size)
        masked = bytearray(b ^ mask[i % 4] for i, b in enumerate(bytearray(payload)))
        self.sock.sendall(bytes(header + mask + masked))

    def send_json(self, value):
        self.send(1, json.dumps(value).encode("utf-8"))

    def close(self):
        try:
            self.send(8, b"\x03\xe8")  # 1000: normal closure
        except OSError:
            pass
        self.sock.close()


NOTIFIER_POLL = 2  # seconds between GETs while the notifier is quiet
NOTIFIER_PING = 15  # seconds between pings


def notifier_wait(ctx, session, execution_id, url, until, controls, progress):
    """Wait for execution_id over the notifier until `until` (time.monotonic()): the
    finished execution, or None when time runs out. The socket is reopened with the new
    token whenever the session's token is renewed (the server closes it when the token it
    was opened with expires)."""
    started = time.monotonic()
    ws, ws_token, last_ping = None, None, started
    try:
        while True:
            execution = session.fetch("GET", "/executions/%d" % execution_id)
            status = str(execution.get("status") or "")
            if status.lower() in TERMINAL_STATUSES:
                return execution
            progress.show("Execution %d: %s (%ds)" % (execution_id, status or "?", time.monotonic() - started))
            if ws is None or ws_token != session.creds.access:
                if ws is not None:
                    ws.close()
                    ws = None
                ws, ws_token = notifier_subscribe(ctx, session, execution_id, url, until), session.creds.access
                continue  # the GET after subscribing closes the gap before it
            quiet_until = min(time.monotonic() + NOTIFIER_POLL, until)
            while time.monotonic() < quiet_until:
                if not (ws.pending() or controls.pause(quiet_until - time.monotonic(), ws.sock)):
                    break
                update = notifier_update(ws.receive(), execution_id)
                if update is not None and str(update.get("status") or "").lower() in TERMINAL_STATUSES:
                    try:
                        return session.fetch("GET", "/executions/%d" % execution_id)
                    except AttuneError:  # the payload has no result, but it is the outcome
                        return update
            if time.monotonic() >= until:
                return None
            if time.monotonic() - last_ping >= NOTIFIER_PING:
                ws.send_json({"type": "ping"})
                last_ping = time.monotonic()
    finally:
        if ws is not None:
            ws.close()


def notifier_subscribe(ctx, session, execution_id, url, until):
    """Connect, get the welcome and subscribe to one execution: all of it within 5 s (and
    the watch's own deadline), however slowly the notifier answers."""
    left = until - time.monotonic()
    if left <= 0:
        raise WebSocketError("no time left for the notifier")
    ctx.ui.log("> WebSocket %s/ws" % url)
    import socket
    limit = min(5.0, left)
    deadline = RequestDeadline(limit, limit)
    ws = None
    try:
        ws = WebSocket.connect(url + "/ws", session.creds.access, deadline, lambda: ctx.http.ssl_context(session.selection.ca_bundle))
        welcome = json_loads(ws.receive())
        if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
            raise WebSocketError("no welcome message")
        ws.send_json({"type": "subscribe", "filter": "entity:execution:%d" % execution_id})
        deadline.lift()  # from now on each read is bounded, the watch its own deadline
        return ws
    except socket.timeout:
        if ws is not None:
            ws.sock.close()
        raise WebSocketError("the notifier did not answer within %gs" % limit)
    except BaseException:
        if ws is not None:
            ws.sock.close()
        raise


def notifier_update(text, execution_id):
    """The payload of a notification about execution_id, None for other messages; an
    error message from the server raises WebSocketError."""
    message = json_loads(text)
    if not isinstance(message, dict):
        raise WebSocketError("a message that is not an object")
    if message.get("type") == "error":
        raise WebSocketError("the notifier said: %s" % clip(str(message.get("message")), 80))
    payload = message.get("payload")
    if (message.get("type") == "notification" and message.get("entity_type") == "execution"
            and message.get("entity_id") == execution_id and isinstance(payload, dict)):
        return payload
    return None


# -- the commands ---------------------------------------------------------------

def matches_ref(actual, pattern):
    """Exact match, or 'pack.*' for every ref in a pack."""
    if pattern is None:
        return True
    if not actual:
        return False
    if pattern.endswith(".*"):
        return len(pattern) > 2 and actual.startswith(pattern[:-1])
    return actual == pattern


def execution_matches(execution, args, statuses, result_text):
    """The Rust CLI's client-side filters: wildcards, several statuses, result text."""
    if args.top_level_only and execution.get("parent") is not None:
        return False
    action = execution.get("action_ref") or ""
    if args.pack and not action.startswith(args.pack + "."):
        return False
    if not (matches_ref(action, args.action) and matches_ref(execution.get("rule_ref"), args.rule)
            and matches_ref(execution.get("trigger_ref"), args.trigger)):
        return False
    if args.trace_tag is not None and execution.get("trace_tag") != args.trace_tag:
        return False
    if statuses and str(execution.get("status") or "").lower() not in statuses:
        return False
    if result_text is not None and "result" in execution:
        return result_text in json.dumps(execution.get("result")).lower()
    return True


# the filters of execution list and of execution watch without an id
EXECUTION_STATUSES = ("requested", "scheduling", "scheduled", "running", "completed", "failed", "canceling",
                      "cancelled", "timeout", "abandoned")  # the server's, in their order
STATUS_SPELLINGS = {"succeeded": "completed", "success": "completed", "canceled": "cancelled",
                    "cancelling": "canceling", "timed_out": "timeout", "pending": "requested"}
EXECUTION_LIMIT = 50  # executions listed when --limit is not given
EXECUTION_FILTERS = (
    arg("--pack: only actions of this pack"),
    arg("-a --action: action ref, or pack.* for a whole pack"),
    arg("--rule: rule ref, or pack.*"),
    arg("--trigger: trigger ref, or pack.*"),
    arg("-s --status: only this status (repeatable): " + ", ".join(EXECUTION_STATUSES), action="append",
        complete=list(EXECUTION_STATUSES)),
    arg("-r --result TEXT: result contains this text (any case)"),
    arg("--trace-tag: exact trace tag"),
    flag("--top-level-only: leave out child executions"),
    arg("-l --limit: at most this many (default 50)", type=Number(1, 100000), default=EXECUTION_LIMIT))
EXECUTION_COLUMNS = ["ID", "Action", "Trace Tag", "Rule", "Trigger", "Status", "Created"]


def execution_row(e):
    return cells(e, "id action_ref trace_tag? rule_ref? trigger_ref? status created@")


def newest_first(executions):
    return sorted(executions, key=lambda e: (str(e.get("created") or ""), e.get("id") or 0), reverse=True)


def wanted_statuses(args):
    """The --status values, each one the server knows (it answers 400 to any other)."""
    wanted = [s.strip().lower() for s in args.status or () if s.strip()]
    for status in wanted:
        if status not in EXECUTION_STATUSES:
            hint = " (did you mean %s?)" % STATUS_SPELLINGS[status] if status in STATUS_SPELLINGS else ""
            raise UsageError("unknown execution status %s%s; statuses: %s"
                             % (quoted(status, 40), hint, ", ".join(EXECUTION_STATUSES)))
    return wanted


def fetch_executions(session, args, every_page=False):
    """GET /executions with the filters the server knows, then the rest on this side;
    (executions newest first, pagination)."""
    statuses = wanted_statuses(args)
    result_text = args.result.lower() if args.result else None  # lower-cased, as the Rust CLI sends it
    query = {"per_page": args.limit, "pack_name": args.pack, "action_ref": args.action,
             "rule_ref": args.rule, "trigger_ref": args.trigger, "trace_tag": args.trace_tag,
             "status": statuses[0] if len(statuses) == 1 else None, "result_contains": result_text,
             "top_level_only": "true" if args.top_level_only else None}
    found, pagination = fetch_list(session, "/executions", query, "per_page", every_page)
    rows = newest_first(e for e in found if execution_matches(e, args, statuses, result_text))
    return (rows if every_page else rows[:args.limit]), pagination


@command("execution list", "list executions, newest first", *(EXECUTION_FILTERS + (ALL,)),
         examples=("attune execution list --status running",
                   "attune execution list --action core.echo --limit 5 -j"))
def cmd_execution_list(ctx, args):
    rows, pagination = fetch_executions(ctx.session(), args, args.all)
    emit_list(ctx, rows, pagination, "executions", EXECUTION_COLUMNS, execution_row)


def format_timeout_seconds(seconds):
    if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds <= 0:
        return "Not configured"
    hours, minutes, rest = seconds // 3600, seconds % 3600 // 60, seconds % 60
    human = ("%dh %dm" % (hours, minutes) if hours else
             "%dm %ds" % (minutes, rest) if minutes else "%ds" % rest)
    return "%s (%ds)" % (human, seconds)


@command("execution show", "show one execution", EXECUTION_ID,
         examples=("attune execution show 42",))
def cmd_execution_show(ctx, args):
    execution = ctx.session().fetch("GET", "/executions/%d" % args.id)

    if ctx.ui.emit_unless_table(execution):
        ctx.ui.pairs([*labelled(execution, "ID=id|Action=action_ref|Status=status|Trace Tag=trace_tag?"),
                      ("Timeout", format_timeout_seconds(execution.get("timeout_seconds"))),
                      *labelled(execution, "Parent ID=parent?|Enforcement ID=enforcement?|Executor ID=executor?")]
                     + timestamps(execution), "Execution: %s" % execution.get("id"))
        show_json_section(ctx, "Configuration", execution.get("config"))
        show_json_section(ctx, "Result", execution.get("result"))


HISTORY_ARGS = (PAGE, arg("--per-page: records per page, 1 to 1000 (default 50)", type=Number(1, 1000),
                          default=50), ALL,
                arg("--field NAME: only the records in which this field changed"))


def emit_history(ctx, path, args):
    """An entity's change records (GET .../history, the server's history tables), newest first."""
    walk = ListWalk(ctx.session(), path, {"page": args.page, "page_size": args.per_page,
                                          "changed_field": args.field}, every_page=args.all)
    emit_list(ctx, walk, walk, "history records", ["Time", "Operation", "Changed", "Before", "After"],
              lambda r: [format_timestamp(r.get("time")), r.get("operation"), cell_text(r.get("changed_fields")),
                         clip(compact_json(r.get("old_values")), 40), clip(compact_json(r.get("new_values")), 40)])


@command("execution reschedule", "hand an execution stuck in 'requested' to the scheduler again", EXECUTION_ID, YES,
         examples=("attune execution reschedule 815 --yes",))
def cmd_execution_reschedule(ctx, args):
    if not confirm(ctx, args, "reschedule execution %d" % args.id, "Reschedule cancelled"):
        return
    resp = ctx.session().request("POST", "/executions/%d/reschedule" % args.id, {})  # a POST: never sent twice
    if resp.status == 409:
        raise ApiError("execution %d was not rescheduled: %s (only an execution still 'requested' can be, a few times "
                       "at most; see: attune execution show %d)" % (args.id, error_message(resp), args.id), 409)
    resp.check()
    done = unwrap(resp)
    execution = done.get("execution") if isinstance(done.get("execution"), dict) else {}
    if ctx.ui.emit_unless_table(done):
        ctx.ui.success("Execution %d handed to the scheduler again" % args.id)
        ctx.ui.pairs([("Status", execution.get("status")),
                      *labelled(done, "Attempt=attempt_count|Last Attempt=last_attempt_at@")])


@command("execution history", "what changed in an execution, and when (newest first)", EXECUTION_ID,
         *HISTORY_ARGS, examples=("attune execution history 812 --field status",))
def cmd_execution_history(ctx, args):
    emit_history(ctx, "/executions/%d/history" % args.id, args)


@command("execution stats", "how many executions are in each state (those you may see)",
         examples=("attune -j execution stats",))
def cmd_execution_stats(ctx, args):
    stats = ctx.session().fetch("GET", "/executions/stats")
    if ctx.ui.emit_unless_table(stats):
        ctx.ui.pairs(labelled(stats, "Total=total|Pending=pending|Running=running|"
                              "Completed=completed|Failed=failed|Cancelled=cancelled|"
                              "Timed out=timeout|Abandoned=abandoned"), "Executions")


@command("execution result", "print an execution's result", EXECUTION_ID,
         arg("-f --format: json (default) or yaml", choices=("json", "yaml")),
         examples=("attune execution result 42 -f json",))
def cmd_execution_result(ctx, args):
    execution = ctx.session().fetch("GET", "/executions/%d" % args.id)
    if execution.get("result") is None:
        raise AttuneError("Execution %d has no result yet" % args.id)
    fmt = args.format or ("yaml" if ctx.ui.output == "yaml" else "json")
    ctx.ui.write_document(to_yaml if fmt == "yaml" else to_json, execution["result"])


@command("execution cancel", "cancel an execution", EXECUTION_ID, YES,
         examples=("attune execution cancel 42 --yes",))
def cmd_execution_cancel(ctx, args):
    if not confirm(ctx, args, "cancel execution %d" % args.id, "Cancellation aborted"):
        return
    execution = ctx.session().fetch("POST", "/executions/%d/cancel" % args.id, {})
    if ctx.ui.emit_unless_table(execution):
        ctx.ui.success("Execution %d cancelled" % args.id)


@command("execution watch", "wait for an execution to finish; without an id, follow a list of executions",
         arg("id ID: execution id (a whole number)", nargs="?", type=ID_NUMBER, complete="executions"),
         *(EXECUTION_FILTERS + (
             arg("--timeout SECONDS: stop waiting after this long (default %d)" % WATCH_TIMEOUT, type=Seconds(1),
                 default=WATCH_TIMEOUT),
             arg("--notifier-url URL: the notifier's WebSocket URL (default: ATTUNE_NOTIFIER_WS_URL, else from the "
                 "API URL)"))),
         examples=("attune execution watch 42",
                   "attune execution watch --status running  # every one that starts"),
         note="With an ID: Ctrl+C asks the server to cancel that execution (exit 130), whoever started it, as "
              "the Rust CLI does; Ctrl+D, when stdin is the terminal, stops watching and leaves it running. "
              "Following a list, Ctrl+C only ends the watch.")
def cmd_execution_watch(ctx, args):
    session = ctx.session()
    if args.id is None:
        return watch_executions(ctx, session, args)
    if list_filters_given(args):
        raise UsageError("execution watch <id> observes a single execution and does not accept list-watch filters")
    ctx.ui.info("Observing execution %d..." % args.id)
    return watch_execution(ctx, session, args.id, args.timeout, notifier_base(ctx, session))


def list_filters_given(args):
    """Did the command line give any of the list filters?"""
    return (any(value is not None for value in (args.pack, args.action, args.rule, args.trigger, args.trace_tag,
                                                args.result))
            or bool(wanted_statuses(args)) or args.top_level_only or args.limit != EXECUTION_LIMIT)


def filter_summary(args):
    """The list watch's filters in one line, as the Rust CLI shows them."""
    parts = ["%s=%s" % (name, value) for name, value in (
        ("pack", args.pack), ("action", args.action), ("rule", args.rule), ("trigger", args.trigger),
        ("trace_tag", args.trace_tag), ("status", ",".join(wanted_statuses(args)) or None))
        if value is not None]
    if args.result is not None:
        parts.append("result~=%s" % args.result)
    return " ".join(parts + ["scope=%s" % ("top-level" if args.top_level_only else "all"),
                             "limit=%d" % args.limit])


class ExecutionsView:
    """The list watch's screen. On a terminal the whole list is redrawn at each change;
    into a pipe the list is printed once and then each changed execution as one row."""

    def __init__(self, ctx, args):
        self.ui, self.args = ctx.ui, args
        self.redraw = can_redraw(ctx.ui.stdout, ctx.env)
        self.widths = None
        self.shown = {}  # id -> the row last printed

    def show(self, executions):
        rows = list(map(execution_row, executions))
        if self.redraw or self.widths is None:
            if self.redraw:
                write_text(self.ui.stdout, "\x1b[2J\x1b[H", raw=True)
            self.ui.out("Watching executions")
            self.ui.out("Press Ctrl+C to stop")
            self.ui.out("Filters: " + filter_summary(self.args))
            self.ui.out()
            if self.redraw and not rows:
                self.ui.info("No executions found")
            elif self.redraw:
                self.ui.out(render_table(EXECUTION_COLUMNS, rows, self.ui.terminal_width()))
            else:  # one header, whatever comes later: widths that a usual row fits in
                cells = [list(map(cell_text, row)) for row in rows]
                self.widths = [max([least, len(name)] + [len(r[i]) for r in cells])
                               for i, (name, least) in enumerate(zip(EXECUTION_COLUMNS, WATCH_WIDTHS))]
                for line in [EXECUTION_COLUMNS, [RULE * w for w in self.widths]] + cells:
                    self.ui.out(table_line(line, self.widths))
        else:
            for row in rows:
                if self.shown.get(row[0]) != row:  # the header's columns, widened rather than cut
                    cells = list(map(cell_text, row))
                    self.ui.out(table_line(cells, [max(w, len(c)) for w, c in zip(self.widths, cells)]))
        self.ui.stdout.flush()
        self.shown = {row[0]: row for row in rows}


WATCH_WIDTHS = (6, 24, 10, 20, 20, 9, 19)  # a list watch into a pipe: the least width of each column


def merge_execution_update(known, data, args):
    """Fold one event of /executions/stream into known ({id: execution}); True when the
    event is about an execution. Malformed events are an error: the stream is not Attune's."""
    try:
        event = json_loads(data)
    except ValueError:
        event = None
    payload = event.get("payload") if isinstance(event, dict) else None
    if not isinstance(payload, dict):
        raise ApiError("Failed to parse execution stream notification")
    eid = payload.get("id", event.get("entity_id"))
    if not isinstance(eid, int) or isinstance(eid, bool):
        raise ApiError("Failed to parse execution stream notification")
    row = dict(known.get(eid) or {"id": eid})
    row.update((k, payload[k]) for k in ("action_ref", "status", "parent", "enforcement", "rule_ref",
                                         "trigger_ref", "trace_tag", "result", "created", "updated")
               if k in payload)
    if row.get("action_ref") and row.get("status") and row.get("created"):
        known[eid] = row
    return True


def visible_executions(known, args):
    statuses = wanted_statuses(args)
    result_text = args.result.lower() if args.result else None
    return newest_first(e for e in known.values() if execution_matches(e, args, statuses, result_text))[:args.limit]


def all_done(executions):
    return all(str(e.get("status") or "").lower() in TERMINAL_STATUSES for e in executions)


def watched_done(watched):
    """Has the watch shown at least one execution, and is each one it has shown done? A
    watch that has shown none yet goes on following until one starts (or --timeout)."""
    return bool(watched) and all_done(watched.values())


def note_watched(watched, executions):
    """Remember the latest state of each execution the watch shows (also once it has left
    the view, as a --status running one does when it ends)."""
    watched.update((e["id"], e) for e in executions if isinstance(e.get("id"), int))


def watch_executions(ctx, session, args):
    """execution watch without an id: the list, then live updates from /executions/stream
    (polling every 2 s when the stream cannot be opened), until every execution it has shown
    is done (exit 0; with none shown yet it waits for one to start), --timeout passes (exit 1)
    or Ctrl-C (exit 130)."""
    if ctx.ui.output != "table":
        raise UsageError("execution watch without an id prints a table only; use execution list for %s"
                         % ctx.ui.output.upper())
    with WatchControls(ctx, keys=False):  # Ctrl+C ends it even when the shell ignores SIGINT
        return follow_executions(ctx, session, args, ctx.deadline.until(time.monotonic() + args.timeout))


def follow_executions(ctx, session, args, deadline):
    import http.client
    view = ExecutionsView(ctx, args)
    executions = fetch_executions(session, args)[0]
    known = {e["id"]: e for e in executions if isinstance(e.get("id"), int)}
    watched = dict(known)
    view.show(executions)
    drops = 0
    while not watched_done(watched):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AttuneError("timed out after %gs watching executions (%d not done)"
                              % (args.timeout, sum(1 for e in watched.values() if not all_done([e]))))
        try:
            resp = session.request("GET", "/executions/stream", stream=EVENT_STREAM, timeout=min(left, 30))
            resp.check()
        except (NetworkError, ApiError) as e:
            if drops == 0:
                ctx.ui.warn("Live stream unavailable (%s); falling back to polling every 2s" % e)
            else:
                ctx.ui.log("the executions stream cannot be reopened (%s); polling every 2s" % e)
            return poll_executions(ctx, session, args, view, executions, watched, deadline)
        opened_with = session.creds.access
        try:
            for event, data, _ in sse_events(resp.stream):
                if event != "comment" and data and merge_execution_update(known, data, args):
                    drops = 0
                    note_watched(watched, [e for eid, e in known.items() if eid in watched])
                    latest = visible_executions(known, args)
                    note_watched(watched, latest)
                    known = {e["id"]: e for e in latest}  # what leaves the view is forgotten
                    if latest != executions:
                        executions = latest
                        view.show(executions)
                    if watched_done(watched):
                        break
                if time.monotonic() >= deadline or (opened_with and session.token() != opened_with):
                    break  # out of time, or a renewed token: reopen with it
            else:
                drops += 1
        except (OSError, http.client.HTTPException) as e:
            ctx.ui.log("executions stream interrupted: %s" % e.__class__.__name__)
            drops += 1
        finally:
            resp.stream.close()
        if drops > 5:
            raise NetworkError("the executions stream keeps dropping")
        if drops:
            time.sleep(min(0.2 * drops, 2.0))
    ctx.ui.success("All watched executions are done")
    return 0


LIST_WATCH_POLL = 2  # seconds between lists when the executions stream cannot be opened


def poll_executions(ctx, session, args, view, executions, watched, deadline):
    """The list watch without a stream: the list again every 2 s; an execution the watch
    showed that has left the list since (and was not done) is asked for by its id."""
    while not watched_done(watched):
        if time.monotonic() + LIST_WATCH_POLL > deadline:
            time.sleep(max(0.0, deadline - time.monotonic()))
            raise AttuneError("timed out after %gs watching executions" % args.timeout)
        time.sleep(LIST_WATCH_POLL)
        try:
            latest = fetch_executions(session, args)[0]
            listed = {e.get("id") for e in latest}
            note_watched(watched, latest + [session.fetch("GET", "/executions/%d" % eid) for eid, e in
                                            list(watched.items()) if eid not in listed and not all_done([e])])
        except (NetworkError, ApiError) as e:
            ctx.ui.warn("Execution watch refresh failed: %s" % e)
            continue
        if latest != executions:
            executions = latest
            view.show(executions)
    ctx.ui.success("All watched executions are done")
    return 0


@command("execution trace-report", "everything that carried one trace tag",
         "tag TAG: the trace tag",
         examples=("attune execution trace-report deploy-2026-12-03",))
def cmd_execution_trace_report(ctx, args):
    report = ctx.session().fetch("GET", "/traces/" + path_segment(args.tag))

    def count(key):
        value = report.get(key)
        return len(value) if isinstance(value, list) else 0

    if ctx.ui.emit_unless_table(report):
        origins = report.get("origins") if isinstance(report.get("origins"), list) else []
        ctx.ui.pairs([("Executions", count("executions")), ("Enforcements", count("enforcements")),
                      ("Events", count("events")), ("Queue Dispatches", count("queue_dispatches")),
                      ("Queue Items", count("queue_items")),
                      ("Origins", ", ".join(map(cell_text, origins)) or "-")], "Trace Report: %s" % args.tag)
        ctx.ui.out()
        ctx.ui.out(to_json(report))


@command("execution logs", "print an execution's stdout (or stderr)", EXECUTION_ID,
         flag("--stderr: the stderr stream instead of stdout"),
         flag("-f --follow: keep printing until the execution ends"),
         examples=("attune execution logs 42",
                   "attune execution logs 42 --stderr -f  # follow until it ends"))
def cmd_execution_logs(ctx, args):
    name = "stderr" if args.stderr else "stdout"
    chunks = []
    table = ctx.ui.output == "table"

    def write(text):
        if table:
            write_text(ctx.ui.stdout, text, raw=True)  # the action's own output, as it wrote it
            ctx.ui.stdout.flush()
        else:
            chunks.append(text)

    offset = read_log_stream(ctx, ctx.session(), args.id, name, args.follow, write)
    if not table:
        ctx.ui.emit({"execution_id": args.id, "stream": name, "content": "".join(chunks), "offset": offset})


def secret_marker_paths(value, path=""):
    """JSON pointers of every redacted secret marker ({"$attune_secret": true, ...}) in value."""
    if isinstance(value, dict):
        if value.get("$attune_secret") is True:
            return [path or "/"]
        found = []
        for key, child in value.items():
            found += secret_marker_paths(child, "%s/%s" % (path, str(key).replace("~", "~0").replace("/", "~1")))
        return sorted(found)
    if isinstance(value, list):
        return sorted(p for i, child in enumerate(value) for p in secret_marker_paths(child, "%s/%d" % (path, i)))
    return []


@command("execution rerun", "run an execution again, with changed parameters if you like",
         EXECUTION_ID, *EXECUTE_ARGS, note=WATCH_KEYS,
         examples=("attune execution rerun 42 --param message=again -w",))
def cmd_execution_rerun(ctx, args):
    original = ctx.session().fetch("GET", "/executions/%d" % args.id)
    action_ref = original.get("action_ref")
    if not action_ref:
        raise AttuneError("Execution %d has no action_ref (may have been triggered by a deleted action)"
                          % args.id)
    config = original.get("config")
    if config is not None and not isinstance(config, dict):
        raise AttuneError("Original execution config is not a JSON object (got %s); cannot rerun"
                          % type(config).__name__)
    parameters = execution_parameters(args, config)
    markers = secret_marker_paths(parameters)
    if markers:
        raise UsageError("rerun parameters still contain redacted secrets at %s; give each a new value "
                         "with --param before rerunning" % ", ".join(markers))
    ctx.ui.info("Rerunning execution %d (action: %s)" % (args.id, action_ref))
    return start_execution(ctx, args, execute_body(args, action_ref, parameters),
                    "Execution %%s started (rerun of %d)" % args.id, [("Rerun of", args.id)])


# === Commands: inquiries =====================================================

group("inquiry", "list, show and answer inquiries (a workflow waiting for a person)")

INQUIRY_ID = arg("id ID: inquiry id (a whole number)", type=ID_NUMBER)


def compact_json(value):
    return "-" if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def inquiry_creator(inquiry):
    """The execution that asked: created_by_execution (newer servers) or execution."""
    creator = inquiry.get("created_by_execution", inquiry.get("execution"))
    return "-" if creator in (None, 0) else creator


def show_inquiry(ctx, inquiry):
    if ctx.ui.emit_unless_table(inquiry):
        ctx.ui.pairs([
            *labelled(inquiry, "ID=id|Status=status|Prompt=prompt"),
            ("Purpose", inquiry.get("purpose") or "-"), ("Created by", inquiry_creator(inquiry)),
            *labelled(inquiry, "Assigned to=assigned_to?"),
            ("Response schema", compact_json(inquiry.get("response_schema"))),
            ("Response options", compact_json(inquiry.get("response_options") or [])),
            ("Response", compact_json(inquiry.get("response")))] + timestamps(inquiry))


@command("inquiry list", "list inquiries (offset and limit, as the server pages them)",
         arg("--status: only inquiries in this status", choices=("pending", "responded", "timeout", "cancelled")),
         arg("--created-by-execution ID: only those this execution asked", type=ID_NUMBER),
         arg("--assigned-to IDENTITY_ID: only those assigned to this identity", type=ID_NUMBER),
         arg("--offset: skip this many (default 0)", type=WHOLE_NUMBER, default=0),
         arg("--limit: at most this many, 1 to 500 (default 50)", type=Number(1, 500), default=50),
         examples=("attune inquiry list --status pending",))
def cmd_inquiry_list(ctx, args):
    body = ctx.session().call("GET", "/inquiries", query={
        "offset": args.offset, "limit": args.limit, "status": args.status,
        "created_by_execution": args.created_by_execution, "assigned_to": args.assigned_to})
    items = list_items(body)
    pagination = pagination_of(body)
    if ctx.ui.emit_unless_table({"items": items, "pagination": pagination}):
        ctx.ui.table(
            ["ID", "Status", "Prompt", "Created by", "Assigned to", "Created"],
            [[*cells(i, "id status prompt~60"), inquiry_creator(i), *cells(i, "assigned_to? created@")] for i in items])
    note_partial(ctx, pagination, len(items), "inquiries")


@command("inquiry show", "show one inquiry", INQUIRY_ID)
def cmd_inquiry_show(ctx, args):
    show_inquiry(ctx, ctx.session().fetch("GET", "/inquiries/%d" % args.id))


@command("inquiry respond", "answer a pending inquiry with one of its options or a JSON object", INQUIRY_ID,
         "--option REF: the ref of one of the inquiry's response options",
         "--response-json JSON: the response, a JSON object")
def cmd_inquiry_respond(ctx, args):
    if (args.option is None) == (args.response_json is None):
        raise UsageError("give exactly one of --option REF and --response-json JSON")
    session = ctx.session()
    if args.option is not None:
        inquiry = session.fetch("GET", "/inquiries/%d" % args.id)
        options = inquiry.get("response_options")
        chosen = [o for o in options if isinstance(o, dict) and o.get("ref") == args.option] \
            if isinstance(options, list) else []
        if not chosen:
            raise AttuneError("Inquiry %d has no response option with ref %s" % (args.id, quoted(args.option)))
        response = chosen[0].get("response")
    else:
        try:
            response = json_loads(args.response_json)
        except ValueError:
            raise UsageError("--response-json must contain valid JSON")
        if not isinstance(response, dict):
            raise UsageError("Inquiry response must be a JSON object")
    show_inquiry(ctx, session.fetch("POST", "/inquiries/%d/respond" % args.id, {"response": response}))


command("inquiry execution", "what an execution does with its own token: create, cancel")(needs_a_command)


@command("inquiry execution create", "create an inquiry (needs the execution token of a running workflow)",
         arg("--request-file PATH: the request, a YAML or JSON object; - for stdin", required=True))
def cmd_inquiry_execution_create(ctx, args):
    request = read_document(ctx, args.request_file, "inquiry request")
    if not isinstance(request, dict):
        raise UsageError("Inquiry create request must be a JSON object")
    created = ctx.session().fetch("POST", "/inquiries", request)
    if ctx.ui.emit_unless_table(created):
        ctx.ui.out(to_json(created))


@command("inquiry execution cancel", "cancel an inquiry (the execution token of the workflow that asked it)",
         INQUIRY_ID)
def cmd_inquiry_execution_cancel(ctx, args):
    show_inquiry(ctx, ctx.session().fetch("POST", "/inquiries/%d/cancel" % args.id, {}))


# === Commands: artifacts =====================================================
# What executions produce: files, JSON documents, progress. Each artifact has versions;
# a download writes the bytes to a temporary file beside the target and renames it into
# place only when every byte has arrived, so an interrupted transfer leaves no partial file.

group("artifact", "list, show, download, upload, create and delete what executions produce")

ARTIFACT_ID = arg("id ID: artifact id (a whole number)", type=ID_NUMBER)
VERSION_NUMBER = arg("version N: version number", type=ID_NUMBER)
CONTENT_EXTENSIONS = (("text/plain", ".txt"), ("application/json", ".json"), ("application/x-yaml", ".yaml"),
                      ("application/yaml", ".yaml"), ("text/yaml", ".yaml"), ("application/xml", ".xml"),
                      ("text/xml", ".xml"), ("text/html", ".html"), ("text/css", ".css"),
                      ("application/javascript", ".js"), ("text/javascript", ".js"), ("image/png", ".png"),
                      ("image/jpeg", ".jpg"), ("image/gif", ".gif"), ("image/svg+xml", ".svg"),
                      ("application/pdf", ".pdf"), ("application/zip", ".zip"), ("application/gzip", ".gz"),
                      ("application/x-gzip", ".gz"), ("text/csv", ".csv"), ("text/markdown", ".md"))


def human_size(size):
    """Bytes as the Rust CLI prints them: N B, x.y KB, x.y MB, x.yy GB (powers of 1024)."""
    if not isinstance(size, int) or isinstance(size, bool):
        return "-" if size is None else cell_text(size)
    for unit, scale, digits in (("GB", 1 << 30, 2), ("MB", 1 << 20, 1), ("KB", 1 << 10, 1)):
        if size >= scale:
            return "%.*f %s" % (digits, size / scale, unit)
    return "%d B" % size


def guess_content_type(filename):
    extension = os.path.splitext(filename)[1].lower()
    if extension in (".txt", ".log"):
        return "text/plain"
    if extension == ".yml":
        return "application/x-yaml"
    return next((kind for kind, ext in CONTENT_EXTENSIONS if ext == extension), "application/octet-stream")


@command("artifact list", "list artifacts",
         "--scope: only this owner type (action, pack, trigger, sensor, rule, identity)",
         "--owner: only artifacts of this owner ref",
         "--type: only this type (file_text, file_binary, progress, url, ...)",
         "--visibility: public or private",
         arg("--execution ID: only what this execution produced", type=ID_NUMBER),
         "--name: name contains this",
         PAGE, PER_PAGE,
         examples=("attune artifact list --execution 42",))
def cmd_artifact_list(ctx, args):
    body = ctx.session().call("GET", "/artifacts", query={
        "page": args.page, "per_page": args.per_page, "scope": args.scope, "owner": args.owner, "type": args.type,
        "visibility": args.visibility, "execution": args.execution, "name": args.name})
    items = list_items(body)

    def table():
        if not items:
            return ctx.ui.info("No artifacts found")
        ctx.ui.table(["Ref", "Name", "Type", "Visibility", "Size", "Created", "ID"],
                     [[*cells(a, "ref name? type visibility"), human_size(a.get("size_bytes")),
                       *cells(a, "created@ id")] for a in items])
        ctx.ui.info("%d artifact(s)" % len(items))

    ctx.ui.emit(items, table)
    note_partial(ctx, pagination_of(body), len(items), "artifacts")


@command("artifact show", "show one artifact, by id or ref", "ref ID|REF: artifact id or ref")
def cmd_artifact_show(ctx, args):
    path = "/artifacts/%s" % args.ref if args.ref and set(args.ref) <= DIGITS else \
        "/artifacts/ref/" + path_segment(args.ref)
    artifact = ctx.session().fetch("GET", path)

    if ctx.ui.emit_unless_table(artifact):
        policy, limit = artifact.get("retention_policy"), artifact.get("retention_limit")
        pairs = [*labelled(artifact,
                           "Reference=ref|ID=id|Name=name?|Type=type|Visibility=visibility|Scope=scope|Owner=owner"),
                 ("Retention", "%s (limit: %s)" % (policy, limit)),
                 *labelled(artifact, "Content Type=content_type?"), ("Size", human_size(artifact.get("size_bytes")))]
        if artifact.get("description"):
            pairs.append(("Description", artifact["description"]))
        if artifact.get("data") is not None:
            pairs.append(("Data", clip(to_json(artifact["data"]), 200)))
        ctx.ui.pairs(pairs + timestamps(artifact), "Artifact: %s" % artifact.get("ref"))


@command("artifact create", "create an artifact (its content comes as versions)",
         arg("--ref: unique artifact ref", required=True),
         arg("--owner: the ref of what owns it", required=True),
         arg("--scope: action (default), pack, trigger, sensor, rule or identity", default="action"),
         arg("--type: file_text (default), file_binary, file_datatable, "
             "file_image, progress, url, ...", default="file_text"),
         arg("--visibility: public or private (default: the server's)", choices=("public", "private")),
         arg("--retention-policy: versions (default), days, hours or minutes", default="versions"),
         arg("--retention-limit: how many to keep (default 5)", type=ID_NUMBER, default=5),
         "--name: display name",
         "--description: description",
         "--content-type: MIME type of its content (text/plain, ...)")
def cmd_artifact_create(ctx, args):
    body = {"ref": args.ref, "scope": args.scope, "owner": args.owner, "type": args.type,
            "retention_policy": args.retention_policy, "retention_limit": args.retention_limit}
    body.update((k, v) for k, v in (("visibility", args.visibility), ("name", args.name),
                                    ("description", args.description), ("content_type", args.content_type))
                if v is not None)
    artifact = ctx.session().fetch("POST", "/artifacts", body)

    if ctx.ui.emit_unless_table(artifact):
        ctx.ui.success("Artifact '%s' created successfully" % artifact.get("ref"))
        ctx.ui.pairs([*labelled(artifact,
                                "Reference=ref|ID=id|Name=name?|Type=type|Visibility=visibility|Scope=scope|"
                                "Owner=owner|Created=created@")])


@command("artifact delete", "delete an artifact and all its versions", ARTIFACT_ID, YES)
def cmd_artifact_delete(ctx, args):
    delete_resource(ctx, args, "delete artifact %d and all its versions" % args.id, "/artifacts/%d" % args.id,
                    "Artifact %d deleted successfully" % args.id, "Artifact deleted successfully", "Deletion cancelled")


DOWNLOAD_ARGS = (
    arg("-o --output PATH: where to write it; - for stdout (default: the server's file name)", dest="target"),
    flag("-f --force: replace the file if it exists"))


@command("artifact download", "download an artifact's latest version (or -V N)", ARTIFACT_ID,
         arg("-V --version N: this version, not the latest", type=ID_NUMBER),
         *DOWNLOAD_ARGS)
def cmd_artifact_download(ctx, args):
    download_version(ctx, args, args.id, args.version)


def download_name(resp, artifact_id, version):
    """The file name: the server's Content-Disposition filename when it is a plain name
    (printable ASCII and spaces, no directory, not hidden), else artifact_<id>_<vN|latest><ext>."""
    disposition = resp.headers.get("Content-Disposition") or ""
    name = disposition.partition("filename=")[2].split(";")[0].strip().strip('"')
    if name and not odd_character(name.replace(" ", "_")) and not set(name) & set("/\\\\") and \
            not name.startswith((".", " ")) and len(name) <= 255:
        return name
    kind = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    extension = next((ext for k, ext in CONTENT_EXTENSIONS if k == kind), ".bin")
    return "artifact_%d_%s%s" % (artifact_id, "v%d" % version if version else "latest", extension)


def download_version(ctx, args, artifact_id, version):
    """GET .../download into args.target (or the server's name), atomically."""
    if args.target in OUTPUT_FORMATS + ("ndjson",):  # -o here is this command's own: a path
        ctx.ui.warn("writing a file named %s: after `%s`, -o is the file to write; the output format goes "
                    "before the command (attune -o %s %s ...)" % (quoted(args.target), " ".join(args.command_path),
                                                                   args.target, " ".join(args.command_path)))
    if args.target not in (None, "-") and os.path.exists(args.target) and not args.force:
        raise UsageError("%s exists; add --force to replace it" % quoted(args.target))
    path = "/artifacts/%d/%s" % (artifact_id, "versions/%d/download" % version if version else "download")
    resp = ctx.session().request("GET", path, stream="*/*")
    resp.check()
    try:
        if args.target == "-":
            size = copy_stream(resp, ctx.ui.stdout.buffer, Progress(ctx))
            return ctx.ui.stdout.buffer.flush()
        target = args.target or download_name(resp, artifact_id, version)
        if os.path.exists(target) and not args.force:
            raise UsageError("%s exists; add --force to replace it" % quoted(target))
        try:
            size = write_atomic(target, lambda f: copy_stream(resp, f, Progress(ctx)), shared=True,
                                links_ok=args.force)
        except OSError as e:  # a directory, a missing or read-only place
            raise AttuneError("cannot write %s: %s" % (quoted(target), e.strerror or e))
    finally:
        resp.stream.close()
    what = "version %d" % version if version else "latest version"
    if ctx.ui.emit_unless_table({"artifact_id": artifact_id, "version": version, "path": target, "size_bytes": size}):
        ctx.ui.success("Downloaded %s to %s (%s)" % (what, quoted(target), human_size(size)))


def copy_stream(resp, out, progress):
    """Copy the open body to out, showing progress on a terminal; the byte count. A body
    shorter than its Content-Length is a network error (the connection dropped)."""
    import http.client
    expected = resp.headers.get("Content-Length")
    expected = int(expected) if expected and set(expected) <= DIGITS and len(expected) < 20 else None
    size = 0
    try:
        while True:
            chunk = resp.stream.read(1 << 16)
            if not chunk:
                break
            out.write(chunk)
            size += len(chunk)
            progress.show("Downloading %s%s" % (human_size(size), " of " + human_size(expected) if expected else ""))
    except (OSError, http.client.HTTPException) as e:
        raise NetworkError("the download broke off after %s: %s" % (human_size(size), e.__class__.__name__))
    finally:
        progress.clear()
    if expected is not None and size != expected:
        raise NetworkError("the download broke off after %s of %s" % (human_size(size), human_size(expected)))
    return size


def upload_version(ctx, args):
    """A multipart POST of a file as a new version of artifact args.id."""
    try:
        content, _ = read_regular_file(args.file, ARCHIVE_LIMIT)
    except OSError as e:
        raise UsageError("cannot read %s: %s" % (quoted(args.file), e.strerror or e))
    if args.meta is not None:
        try:
            json_loads(args.meta)
        except ValueError:
            raise UsageError("Invalid meta JSON: %s" % quoted(args.meta))
    name = os.path.basename(args.file)
    content_type = args.content_type or guess_content_type(name)
    fields = [(k, v) for k, v in (("content_type", args.content_type), ("created_by", args.created_by),
                                  ("meta", args.meta)) if v is not None]
    body, multipart_type = multipart_body(fields, "file", name, content, content_type)
    ctx.ui.info("Uploading %s (%s) to artifact %d..." % (quoted(name), human_size(len(content)), args.id))
    resp = ctx.session().request("POST", "/artifacts/%d/versions/upload" % args.id, raw_body=body,
                                 content_type=multipart_type)
    resp.check()
    version = unwrap(resp)
    if ctx.ui.emit_unless_table(version):
        ctx.ui.success("Version %s uploaded successfully" % version.get("version"))
        ctx.ui.pairs(version_pairs(version))


def version_pairs(version):
    return [*labelled(version, "Version ID=id|Version Number=version|Artifact ID=artifact|Content Type=content_type?"),
            ("Size", human_size(version.get("size_bytes"))),
            *labelled(version, "Created By=created_by?|Created=created@")]


UPLOAD_ARGS = (
    arg("file FILE: the file to upload"),
    arg("--content-type: its media type (default: from the file name)"),
    arg("--created-by: who made it"),
    arg("--meta JSON: metadata, a JSON value"))


@command("artifact upload", "upload a file as a new version", ARTIFACT_ID, *UPLOAD_ARGS)
def cmd_artifact_upload(ctx, args):
    upload_version(ctx, args)


command("artifact version", "an artifact's versions: list, show, download, upload, create-json, delete")(needs_a_command)


@command("artifact version list", "list an artifact's versions", ARTIFACT_ID)
def cmd_artifact_version_list(ctx, args):
    versions = list_items(ctx.session().call("GET", "/artifacts/%d/versions" % args.id))

    if ctx.ui.emit_unless_table(versions):
        if not versions:
            return ctx.ui.info("No versions found for artifact %d" % args.id)
        ctx.ui.table(["ID", "Version", "Content Type", "Size", "File Path", "Created By", "Created"],
                     [[v.get("id"), "v%s" % v.get("version"), cell(v, "content_type?"), human_size(v.get("size_bytes")),
                       v.get("file_path") or "(db)", *cells(v, "created_by? created@")] for v in versions])
        ctx.ui.info("%d version(s) for artifact %d" % (len(versions), args.id))


@command("artifact version show", "show one version", ARTIFACT_ID, VERSION_NUMBER)
def cmd_artifact_version_show(ctx, args):
    version = ctx.session().fetch("GET", "/artifacts/%d/versions/%d" % (args.id, args.version))

    if ctx.ui.emit_unless_table(version):
        pairs = version_pairs(version)[:5]
        pairs.append(("File Path", version["file_path"]) if version.get("file_path") else ("Storage", "Database"))
        if version.get("content_json") is not None:
            pairs.append(("JSON Content", clip(to_json(version["content_json"]), 300)))
        if version.get("meta") is not None:
            pairs.append(("Metadata", clip(to_json(version["meta"]), 200)))
        pairs += version_pairs(version)[5:]
        ctx.ui.pairs(pairs, "Version %d of Artifact %d" % (args.version, args.id))


@command("artifact version download", "download one version", ARTIFACT_ID, VERSION_NUMBER, *DOWNLOAD_ARGS)
def cmd_artifact_version_download(ctx, args):
    download_version(ctx, args, args.id, args.version)


@command("artifact version upload", "upload a file as a new version", ARTIFACT_ID, *UPLOAD_ARGS)
def cmd_artifact_version_upload(ctx, args):
    upload_version(ctx, args)


@command("artifact version create-json", "add a version holding a JSON document", ARTIFACT_ID,
         "content CONTENT: the document, JSON",
         "--content-type: MIME type (default application/json)",
         "--created-by: who made this version (free text)",
         "--meta JSON: metadata of the version (JSON object)")
def cmd_artifact_version_create_json(ctx, args):
    body = {}
    for key, text in (("content", args.content), ("meta", args.meta)):
        if text is not None:
            try:
                body[key] = json_loads(text)
            except ValueError:
                raise UsageError("Invalid %s JSON: %s" % ("meta" if key == "meta" else "content", quoted(text)))
    body.update((k, v) for k, v in (("content_type", args.content_type), ("created_by", args.created_by))
                if v is not None)
    version = ctx.session().fetch("POST", "/artifacts/%d/versions" % args.id, body)
    if ctx.ui.emit_unless_table(version):
        ctx.ui.success("JSON version %s created successfully" % version.get("version"))
        ctx.ui.pairs(version_pairs(version))


@command("artifact version delete", "delete one version", ARTIFACT_ID, VERSION_NUMBER, YES)
def cmd_artifact_version_delete(ctx, args):
    delete_resource(ctx, args, "delete version %d of artifact %d" % (args.version, args.id),
                    "/artifacts/%d/versions/%d" % (args.id, args.version),
                    "Version %d of artifact %d deleted successfully" % (args.version, args.id),
                    "Version deleted successfully", "Deletion cancelled")


# === Commands: identities ====================================================
# Who can log in, their roles and whether they are frozen. Changes print a mutation
# result {operation, target, dry_run, changed, would_change, before, after}, and with
# --dry-run nothing is sent; a change that is already in place sends nothing either.

group("identity", "identities: list, show, create, update, delete; their roles; freeze")

IDENTITY_SELECTOR = (
    arg("login LOGIN: the identity's login", nargs="?"),
    arg("--identity-id N: the identity's id instead of its login", type=ID_NUMBER))
DRY_RUN = flag("--dry-run: say what would change; change nothing")


def selected_identity(session, args):
    """GET /identities/ID of LOGIN (resolved through ?login=) or --identity-id."""
    if (args.login is None) == (args.identity_id is None):
        raise UsageError("name the identity by LOGIN or --identity-id N (one of them)")
    identity_id = args.identity_id if args.identity_id is not None else identity_id_of(session, args.login)
    return session.fetch("GET", "/identities/%d" % identity_id)


def identities_named(session, login):
    """The identities whose login is exactly login. The server lists identities without a
    login filter (?login= is sent for one that has it), so the pages are walked until it shows."""
    def match(item):
        return item.get("login") == login
    return [i for i in ListWalk(session, "/identities", {"login": login}, every_page=True, until=match) if match(i)]


def identity_id_of(session, login):
    found = [i for i in identities_named(session, login) if isinstance(i.get("id"), int)]
    if not found:
        raise ApiError("Identity %s not found" % quoted(login), 404)
    return found[0]["id"]


def identity_roles(identity):
    roles = identity.get("roles")
    return [r for r in roles if isinstance(r, dict)] if isinstance(roles, list) else []


def role_rows(identity):
    return [[*cells(r, "id role source managed")] for r in identity_roles(identity)]


def role_names(identity):
    return sorted(str(r.get("role")) for r in identity_roles(identity))


def mutation_result(ctx, operation, target, dry_run, before, after):
    result = {"operation": operation, "target": target, "dry_run": dry_run,
              "changed": not dry_run and before != after, "would_change": before != after,
              "before": before, "after": after}
    if ctx.ui.emit_unless_table(result):
        ctx.ui.out(to_json(result))


@command("identity list", "list identities",
         "--login: only this login",
         PAGE, PER_PAGE,
         examples=("attune identity list",))
def cmd_identity_list(ctx, args):
    session = ctx.session()
    if args.login is not None:  # the server has no such filter: the pages are looked through
        items = identities_named(session, args.login)
        body = {"items": items, "pagination": None}
    else:
        body = session.call("GET", "/identities", query={"page": args.page, "page_size": args.per_page})
        items = list_items(body)
    if ctx.ui.emit_unless_table(body):
        ctx.ui.table(
            ["ID", "Login", "Display name", "Frozen", "Roles"],
            [[*cells(i, "id login display_name"), "true" if i.get("frozen") else "false",
              cell_text([r.get("role") if isinstance(r, dict) else r for r in i["roles"]]
                        if isinstance(i.get("roles"), list) else i.get("roles"))] for i in items])
    note_partial(ctx, pagination_of(body), len(items), "identities")


@command("identity show", "show an identity, its roles and direct permissions", *IDENTITY_SELECTOR)
def cmd_identity_show(ctx, args):
    show_identity(ctx, selected_identity(ctx.session(), args))


def show_identity(ctx, identity):
    if ctx.ui.emit_unless_table(identity):
        ctx.ui.pairs([*labelled(identity, "ID=id|Login=login|Display name=display_name"),
                      ("Frozen", "true" if identity.get("frozen") else "false")])
        if identity.get("attributes"):
            ctx.ui.section("Attributes")
            ctx.ui.out(to_yaml(identity["attributes"]).rstrip("\n"))
        ctx.ui.section("Roles")
        ctx.ui.table(["ID", "Role", "Source", "Managed"], role_rows(identity), empty="No roles")
        ctx.ui.section("Direct permissions")
        ctx.ui.out(to_yaml(identity.get("direct_permissions") or []).rstrip("\n"))


LOGIN_LENGTH = (3, 255)  # characters, the server's rule for a login
IDENTITY_FIELDS = (
    arg("--display-name TEXT: the name shown for it"),
    flag("--password-stdin: read its password from stdin (8 to 128 characters)"),
    arg("--attribute KEY=VALUE: an attribute; the value is parsed as JSON when it parses (repeatable)",
        action="append", default=[]))


def identity_body(ctx, args):
    """The fields of identity create/update that were given; the password from stdin."""
    body = {"display_name": args.display_name}
    if args.password_stdin:
        body["password"] = check_new_password(read_secret_lines(ctx, ("password",))[0], "the password")
    return {k: v for k, v in body.items() if v is not None}


def identity_target(identity):
    return {"identity_id": identity.get("id"), "login": identity.get("login")}


@command("identity create", "create an identity (a person or a service that logs in or holds tokens)",
         "login LOGIN: its login, 3 to 255 characters", *(IDENTITY_FIELDS + (
             flag("--if-missing: when the login exists already, show that identity and exit 0 (nothing changed)"),)),
         examples=("attune identity create ci-bot --display-name 'CI' --if-missing",
                   "attune identity create alice --password-stdin < password.txt"))
def cmd_identity_create(ctx, args):
    low, high = LOGIN_LENGTH
    if not low <= len(args.login) <= high:
        raise UsageError("a login must be %d to %d characters long" % (low, high))
    body = dict(identity_body(ctx, args), login=args.login)
    attributes = parse_param_pairs(args.attribute)
    if attributes:
        body["attributes"] = attributes
    session = ctx.session()
    resp = session.request("POST", "/identities", body)
    if resp.status == 409 and args.if_missing:
        args.identity_id = None
        identity = selected_identity(session, args)
        ctx.ui.info("Identity %s exists already (id %s); nothing changed" % (quoted(args.login), identity.get("id")))
    else:
        resp.check()
        identity = unwrap(resp)
        ctx.ui.info("Identity %s created (id %s)" % (quoted(args.login), identity.get("id")))
    show_identity(ctx, identity)


@command("identity update", "change an identity's display name, password or attributes",
         *(IDENTITY_SELECTOR + IDENTITY_FIELDS + (
             flag("--replace-attributes: the attributes become exactly the --attribute pairs (default: they are "
                  "added)"), DRY_RUN)),
         examples=("attune identity update ci-bot --display-name 'CI robot'",
                   "attune identity update alice --password-stdin < new-password.txt"))
def cmd_identity_update(ctx, args):
    if not (args.display_name is not None or args.password_stdin or args.attribute or args.replace_attributes):
        raise UsageError("At least one field must be provided to update (--display-name, --password-stdin, "
                         "--attribute)")
    session = ctx.session()
    identity = selected_identity(session, args)
    body = identity_body(ctx, args)
    pairs = parse_param_pairs(args.attribute)
    if pairs or args.replace_attributes:
        old = identity.get("attributes") if isinstance(identity.get("attributes"), dict) else {}
        hidden = sorted(k for k, v in old.items() if v == "***" and k not in pairs)
        if hidden and not args.replace_attributes:  # sending *** back would overwrite the secret with it
            raise UsageError("the server shows attribute(s) %s only as ***, so they cannot be kept while others "
                             "change; give every attribute with --attribute and add --replace-attributes"
                             % ", ".join(map(quoted, hidden)))
        body["attributes"] = {} if args.replace_attributes else dict(old)
        body["attributes"].update(pairs)
    before = {k: identity.get(k) for k in body if k != "password"}
    after = {k: v for k, v in body.items() if k != "password"}
    if "password" in body:
        before["password"], after["password"] = "(unchanged)", "(new)"
    if before != after and not args.dry_run:
        session.request("PUT", "/identities/%d" % identity["id"], body).check()
    mutation_result(ctx, "update", identity_target(identity), args.dry_run, before, after)


@command("identity delete", "delete an identity (not your own)", *(IDENTITY_SELECTOR + (YES,)),
         examples=("attune identity delete ci-bot --yes",))
def cmd_identity_delete(ctx, args):
    session = ctx.session()
    identity = selected_identity(session, args)
    if not confirm(ctx, args, "delete identity %s (id %s)" % (quoted(identity.get("login")), identity.get("id"))):
        return
    session.request("DELETE", "/identities/%d" % identity["id"]).check()
    if ctx.ui.emit_unless_table({"message": "Identity deleted successfully", "identity_id": identity.get("id")}):
        ctx.ui.success("Identity %s deleted" % quoted(identity.get("login")))


command("identity role", "an identity's roles: list, add, remove")(needs_a_command)


@command("identity role list", "list an identity's roles", *IDENTITY_SELECTOR)
def cmd_identity_role_list(ctx, args):
    identity = selected_identity(ctx.session(), args)
    if ctx.ui.emit_unless_table(identity_roles(identity)):
        ctx.ui.table(["ID", "Role", "Source", "Managed"], role_rows(identity), empty="No roles")


def role_argument(args):
    if not 0 < len(args.role) <= 255 or not args.role.strip():
        raise UsageError("Role name must contain 1 to 255 characters and cannot be blank")
    return args.role


@command("identity role add", "give an identity a role", *(IDENTITY_SELECTOR + (
    arg("role ROLE: role name"), DRY_RUN)))
def cmd_identity_role_add(ctx, args):
    role = role_argument(args)
    session = ctx.session()
    identity = selected_identity(session, args)
    before = role_names(identity)
    after = sorted(set(before) | {role})
    if after != before and not args.dry_run:
        resp = session.request("POST", "/identities/%d/roles" % identity["id"], {"role": role})
        if resp.status != 409 or role not in role_names(session.fetch("GET", "/identities/%d" % identity["id"])):
            resp.check()
    mutation_result(ctx, "role_add", {"identity_id": identity.get("id"), "login": identity.get("login"), "role": role},
                    args.dry_run, before, after)


@command("identity role remove", "take a role from an identity", *(IDENTITY_SELECTOR + (
    arg("role ROLE: role name"), DRY_RUN)))
def cmd_identity_role_remove(ctx, args):
    role = role_argument(args)
    session = ctx.session()
    identity = selected_identity(session, args)
    before = role_names(identity)
    assignments = [r for r in identity_roles(identity) if r.get("role") == role]
    if any(r.get("managed") for r in assignments):
        raise AttuneError("Role %s is provider-managed; update membership through identity provider sync"
                          % quoted(role))
    if assignments and not args.dry_run:
        for assignment in assignments:
            resp = session.request("DELETE", "/identities/roles/%s" % path_segment(assignment.get("id")))
            if resp.status != 404:  # already gone
                resp.check()
    mutation_result(ctx, "role_remove", {"identity_id": identity.get("id"), "login": identity.get("login"),
                                         "role": role}, args.dry_run, before, [r for r in before if r != role])


def freeze_identity(ctx, args, frozen):
    session = ctx.session()
    identity = selected_identity(session, args)
    before = bool(identity.get("frozen"))
    if before != frozen and not args.dry_run:
        session.request("POST", "/identities/%d/%s" % (identity["id"], "freeze" if frozen else "unfreeze"),
                        {}).check()
    mutation_result(ctx, "freeze" if frozen else "unfreeze",
                    {"identity_id": identity.get("id"), "login": identity.get("login")}, args.dry_run,
                    {"frozen": before}, {"frozen": frozen})


@command("identity freeze", "freeze an identity: it can no longer log in or act", *(IDENTITY_SELECTOR + (DRY_RUN,)))
def cmd_identity_freeze(ctx, args):
    freeze_identity(ctx, args, True)


@command("identity unfreeze", "unfreeze an identity", *(IDENTITY_SELECTOR + (DRY_RUN,)))
def cmd_identity_unfreeze(ctx, args):
    freeze_identity(ctx, args, False)


# === Commands: permissions ===================================================
# Permission sets (what may be done) and who holds them: identities directly, or
# every identity with a role. assign and revoke print a mutation result like the
# identity commands, and do nothing when the assignment is already as asked.

group("permission", "permission sets and their assignments to identities and roles")

PERMISSION_SET_REF = arg("ref REF: the permission set's ref")
PERMISSION_TARGET = (
    arg("--identity LOGIN: an identity, by its exact login"),
    arg("--identity-id N: an identity, by its id", type=ID_NUMBER),
    arg("--role ROLE: every identity with this role"))


def permission_set(session, ref):
    """GET /permissions/sets/by-ref/REF; 'standard' is never asked for."""
    if ref == "standard":
        raise AttuneError("'standard' is reserved for execution tokens and is not an assignable permission set")
    return session.fetch("GET", "/permissions/sets/by-ref/%s" % path_segment(ref))


def set_roles(permission_set):
    roles = permission_set.get("roles")
    return [r for r in roles if isinstance(r, dict)] if isinstance(roles, list) else []


def set_definition(permission_set):
    """The part of a set that a definition file holds: {ref, label?, description?, grants}."""
    definition = {"ref": permission_set.get("ref")}
    for key in ("label", "description"):
        if permission_set.get(key) is not None:
            definition[key] = permission_set[key]
    definition["grants"] = permission_set.get("grants")
    return definition


def binding_filters(identity_login=None, identity_id=None, role=None, set_ref=None):
    return {"identity_login": identity_login, "identity_id": identity_id, "role": role,
            "permission_set_ref": set_ref}


def binding_target(binding):
    """('identity', login) or ('role', role) of an assignment."""
    target = binding.get("target")
    target = target if isinstance(target, dict) else {}
    kind = target.get("type")
    return kind, target.get("login") if kind == "identity" else target.get("role")


command("permission set", "permission sets: list, show, export, update")(needs_a_command)


@command("permission set list", "list permission sets, who owns them and the roles they are mapped to",
         "--pack PACK: only the sets of this pack",
         flag("--include-retired: also the retired sets"),
         examples=("attune permission set list",))
def cmd_permission_set_list(ctx, args):
    sets = list_items(ctx.session().call("GET", "/permissions/sets", query={
        "include_retired": "true" if args.include_retired else "false", "pack_ref": args.pack}))
    if ctx.ui.emit_unless_table(sets):
        ctx.ui.table(
            ["ID", "Ref", "Pack", "Origin", "Status", "Roles"],
            [[*cells(s, "id ref"), s.get("pack_ref") or "", s.get("management_origin") or "",
              "retired" if s.get("retired_at") else "active",
              ", ".join(str(r.get("role")) for r in set_roles(s))] for s in sets])


def emit_yaml_in_table_mode(ctx, data):
    """show and export print YAML where other commands print a table."""
    if ctx.ui.emit_unless_table(data):
        ctx.ui.write_document(to_yaml, data)


@command("permission set show", "show a permission set: grants, ownership and role mappings (YAML)",
         PERMISSION_SET_REF)
def cmd_permission_set_show(ctx, args):
    emit_yaml_in_table_mode(ctx, permission_set(ctx.session(), args.ref))


@command("permission set export", "print a set as a definition file for permission set update (YAML)",
         PERMISSION_SET_REF)
def cmd_permission_set_export(ctx, args):
    emit_yaml_in_table_mode(ctx, set_definition(permission_set(ctx.session(), args.ref)))


@command("permission set update", "replace a set's grants from a definition file (YAML or JSON)",
         PERMISSION_SET_REF,
         arg("--file PATH: the definition {ref, label, description, grants}; - for stdin", required=True),
         flag("--dry-run: let the server check and preview it; change nothing"))
def cmd_permission_set_update(ctx, args):
    definition = read_document(ctx, args.file, "permission set definition")
    if not isinstance(definition, dict):
        raise UsageError("Invalid permission set definition: it must be a mapping")
    unknown = sorted(set(definition) - {"ref", "label", "description", "grants"})
    if unknown:
        raise UsageError("Invalid permission set definition: unknown field %s" % quoted(unknown[0]))
    if "ref" not in definition or "grants" not in definition:
        raise UsageError("Invalid permission set definition: it needs ref and grants")
    if definition["ref"] != args.ref:
        raise UsageError("Definition ref %s does not match target %s" % (quoted(str(definition["ref"])), quoted(args.ref)))
    if not isinstance(definition["grants"], list):
        raise UsageError("Permission set grants must be an array")
    session = ctx.session()
    before = permission_set(session, args.ref)
    if before.get("management_origin") == "platform":
        raise AttuneError("Permission set %s is platform-managed and cannot be updated" % quoted(args.ref))
    if before.get("retired_at"):
        raise AttuneError("Permission set %s is retired and cannot be updated" % quoted(args.ref))
    after = session.fetch("PUT", "/permissions/sets/%s" % path_segment(before.get("id")),
                          {"label": definition.get("label"), "description": definition.get("description"),
                           "grants": definition["grants"]},
                          query={"dry_run": "true" if args.dry_run else "false"})
    if before.get("management_origin") == "pack":
        ctx.ui.warn("Pack-owned definition %s: a later pack update can overwrite this edit." % quoted(args.ref))
    mutation_result(ctx, "set_update", {"permission_set_ref": args.ref, "permission_set_id": before.get("id")},
                    args.dry_run, set_definition(before), set_definition(after))


command("permission assignment", "assignments of sets to identities and roles: list")(needs_a_command)


@command("permission assignment list", "list assignments (direct ones for an identity, not inherited access)",
         *(PERMISSION_TARGET + (
             arg("--set REF: only assignments of this permission set"),
             PAGE, PER_PAGE)))
def cmd_permission_assignment_list(ctx, args):
    if args.role is not None and (args.identity is not None or args.identity_id is not None) \
            or args.identity is not None and args.identity_id is not None:
        raise UsageError("filter by one of --identity, --identity-id and --role")
    query = binding_filters(args.identity, args.identity_id, args.role, args.set)
    query.update(page=args.page, page_size=args.per_page)
    body = ctx.session().call("GET", "/permissions/assignments", query=query)
    items = list_items(body)
    pagination = pagination_of(body)
    if ctx.ui.emit_unless_table({"items": items, "pagination": pagination}):
        ctx.ui.table(
            ["ID", "Permission set", "Target type", "Target", "Created"],
            [[*cells(b, "id permission_set_ref"), *binding_target(b), cell(b, "created@")] for b in items],
            empty="No permission assignments found")
    note_partial(ctx, pagination, len(items), "assignments")


def check_permission_target(args):
    """Exactly one target flag: said before any request is sent."""
    given = [v for v in (args.identity, args.identity_id, args.role) if v is not None]
    if len(given) != 1 or args.role is not None and not args.role.strip():
        raise UsageError("Specify exactly one of --identity, --identity-id, or a nonempty --role")


def permission_assignee(session, args):
    """{"type": "identity", identity_id, login} or {"type": "role", role} from the flags."""
    if args.role is not None:
        return {"type": "role", "role": role_argument(args)}
    args.login = args.identity
    identity = selected_identity(session, args)
    return {"type": "identity", "identity_id": identity.get("id"), "login": identity.get("login")}


def find_binding(session, assignee, ref):
    """The assignment of set ref to the assignee, read from every page; or None."""
    if assignee["type"] == "identity":
        query = binding_filters(identity_id=assignee["identity_id"], set_ref=ref)
    else:
        query = binding_filters(role=assignee["role"], set_ref=ref)
    items, page, previous = [], 1, None
    while True:
        query.update(page=page, page_size=100)
        body = session.call("GET", "/permissions/assignments", query=query)
        chunk = list_items(body)
        check_next_page("/permissions/assignments", page, chunk, previous, len(items))
        items.extend(chunk)
        pagination = pagination_of(body)
        if not isinstance(pagination, dict) or not isinstance(pagination.get("has_next"), bool):
            raise ApiError("API pagination is missing has_next")
        if not pagination["has_next"]:
            return items[-1] if items else None
        page, previous = page + 1, chunk


def change_assignment(ctx, args, assign):
    check_permission_target(args)
    session = ctx.session()
    found = permission_set(session, args.ref)
    assignee = permission_assignee(session, args)
    binding = find_binding(session, assignee, args.ref)
    if assign and binding is None and found.get("retired_at"):
        raise AttuneError("Permission set %s is retired and cannot be newly assigned" % quoted(args.ref))
    before = binding is not None
    if not args.dry_run and assign and not before:
        if assignee["type"] == "identity":
            resp = session.request("POST", "/permissions/assignments",
                                   {"identity_id": assignee["identity_id"], "permission_set_ref": args.ref})
        else:
            resp = session.request("POST", "/permissions/sets/%s/roles" % path_segment(found.get("id")),
                                   {"role": assignee["role"]})
        if resp.status == 409 and find_binding(session, assignee, args.ref) is not None:
            before = True  # assigned meanwhile by someone else
        else:
            resp.check()
    elif not args.dry_run and not assign and before:
        kind = "assignments" if assignee["type"] == "identity" else "sets/roles"
        resp = session.request("DELETE", "/permissions/%s/%s" % (kind, path_segment(binding.get("id"))))
        if resp.status == 404:
            before = False  # removed meanwhile
        else:
            resp.check()
    mutation_result(ctx, "assign" if assign else "revoke", {"permission_set_ref": args.ref, "assignee": assignee},
                    args.dry_run, before, assign)


@command("permission assign", "assign a set to an identity or role (nothing happens when it already is)",
         PERMISSION_SET_REF, *(PERMISSION_TARGET + (DRY_RUN,)))
def cmd_permission_assign(ctx, args):
    change_assignment(ctx, args, True)


@command("permission revoke", "take a set from an identity or role (nothing happens when it is not assigned)",
         PERMISSION_SET_REF, *(PERMISSION_TARGET + (DRY_RUN,)))
def cmd_permission_revoke(ctx, args):
    change_assignment(ctx, args, False)


# === Commands: work queues ===================================================
# Queues hold items for a dispatch action. The items commands work on one queue:
# `queue items REF list|show|preview|update|reprioritize|delete`. Lease tokens let a
# worker acknowledge an item, so they are never printed (shown as ***).

group("queue", "work queues and their items: list, show, enable, update, enqueue")

QUEUE_REF = arg("ref REF: the queue's ref")
QUEUE_PAGE = (PAGE, PER_PAGE)
QUEUE_ITEM_STATUSES = ("queued", "leased", "retry", "completed", "failed", "skipped", "cancelled")
SELECTOR = (arg("--selector PATH: a SQL/JSONPath selector over the items' payload, metadata and fields", required=True),
            arg("--vars-json JSON: the selector's variables, a JSON object", default="{}"))
PREVIEW_LIMIT = arg("--preview-limit N: show at most N of the affected items, 1 to 100 (default 100)",
                    type=Number(1, 100), default=100)


def queue_path(ref, *rest):
    return "/".join(["/queues", path_segment(ref)] + list(map(path_segment, rest)))


def show_queue(ctx, queue, message=None):
    if ctx.ui.emit_unless_table(queue):
        if message:
            ctx.ui.success("Queue '%s' %s successfully" % (queue.get("ref"), message))
        else:
            ctx.ui.section("Queue: %s" % queue.get("ref"))
        allowed = queue.get("reference_allowed_pack_refs")
        ctx.ui.pairs([
            *labelled(queue,
                      "Ref=ref|Pack=pack_ref?|Label=label|Description=description?|Enabled=enabled|"
                      "Accepting Items=accepting_new_items|Reference Visibility=reference_visibility"),
            ("Allowed Pack Refs", or_dash(", ".join(map(str, allowed)) if isinstance(allowed, list) else allowed)),
            *labelled(queue,
                      "Dispatch Action=dispatch_action_ref|"
                      "Trace Tag Template=trace_tag_template?")] + timestamps(queue))


def without_lease_token(item):
    """A queue item as printed: its lease token, a secret, is *** (or null when it has none)."""
    if isinstance(item, dict) and item.get("lease_token") is not None:
        return dict(item, lease_token="***")
    return item


def queue_items_table(ctx, items, empty):
    ctx.ui.table(["ID", "Key", "Status", "Priority", "Attempts", "Payload", "Created"],
                 [[i.get("id"), i.get("item_key") or "", *cells(i, "status priority attempt_count"),
                   clip(compact_json(i.get("payload")), 96), cell(i, "created@")] for i in items],
                 empty=empty)


def json_object_arg(text, flag):
    try:
        value = json_loads(text)
    except ValueError:
        raise UsageError("Invalid JSON for %s" % flag)
    if not isinstance(value, dict):
        raise UsageError("%s must be a JSON object" % flag)
    return value


@command("queue list", "list work queues (all, or a pack's)",
         "--pack PACK: only this pack's queues",
         arg("--enabled BOOL: only enabled (true) or disabled (false) queues", type=parse_bool),
         arg("--is-adhoc BOOL: only ad-hoc (true) or declared (false) queues", type=parse_bool),
         "--search TEXT: ref, label or description containing this",
         "--referencing-pack-ref PACK: also restricted queues this pack may target",
         *QUEUE_PAGE,
         examples=("attune queue list --pack core",))
def cmd_queue_list(ctx, args):
    path = "/packs/%s/queues" % path_segment(args.pack) if args.pack else "/queues"
    body = ctx.session().call("GET", path, query={
        "enabled": None if args.enabled is None else str(args.enabled).lower(),
        "is_adhoc": None if args.is_adhoc is None else str(args.is_adhoc).lower(),
        "search": args.search, "referencing_pack_ref": args.referencing_pack_ref,
        "page": args.page, "per_page": args.per_page})
    items = list_items(body)
    pagination = pagination_of(body)
    if ctx.ui.emit_unless_table({"items": items, "pagination": pagination}):
        ctx.ui.table(*table_of("ID=id|Ref=ref|Pack=pack_ref?|Label=label|Enabled=enabled|"
                               "Accepting=accepting_new_items|Dispatch action=dispatch_action_ref|Created=created@",
                               items), empty="No work queues found.")
    note_partial(ctx, pagination, len(items), "queues")


@command("queue show", "show a work queue", QUEUE_REF)
def cmd_queue_show(ctx, args):
    show_queue(ctx, ctx.session().fetch("GET", queue_path(args.ref)))


@command("queue disable", "stop a queue dispatching its items", QUEUE_REF, enable=False)
@command("queue enable", "let a queue dispatch its items", QUEUE_REF, enable=True)
def cmd_queue_toggle(ctx, args):
    show_queue(ctx, ctx.session().fetch("PUT", queue_path(args.ref), {"enabled": args.enable}),
               "enabled" if args.enable else "disabled")


@command("queue update", "change a queue's trace tag template", QUEUE_REF,
         "--trace-tag-template TEMPLATE: the trace tag of the executions it dispatches",
         flag("--clear-trace-tag-template: remove the trace tag template"))
def cmd_queue_update(ctx, args):
    if args.trace_tag_template is not None and args.clear_trace_tag_template:
        raise UsageError("give --trace-tag-template or --clear-trace-tag-template, not both")
    if args.trace_tag_template is None and not args.clear_trace_tag_template:
        raise UsageError("At least one field must be provided to update")
    show_queue(ctx, ctx.session().fetch("PUT", queue_path(args.ref), {"trace_tag_template": args.trace_tag_template}),
               "updated")


ENQUEUE_FIELDS = ("payload", "item_key", "priority", "metadata", "trace_tag")


@command("queue enqueue", "add an item to a queue",
         QUEUE_REF, "--request-json JSON: the item: {payload, item_key, priority, metadata, "
                    "trace_tag}",
         "--request-file PATH: the item as a YAML or JSON file; - for stdin")
def cmd_queue_enqueue(ctx, args):
    if (args.request_json is None) == (args.request_file is None):
        raise UsageError("give exactly one of --request-json and --request-file")
    shape = ("Enqueue request must be valid JSON with payload and optional item_key, priority, metadata, and "
             "trace_tag fields: ")
    if args.request_json is not None:
        try:
            request = json_loads(args.request_json)
        except ValueError:
            raise UsageError(shape + "it is not valid JSON")
    else:
        request = read_document(ctx, args.request_file, "enqueue request")
    if not isinstance(request, dict):
        raise UsageError(shape + "it is not an object")
    if "payload" not in request:
        raise UsageError(shape + "payload is missing")
    unknown = sorted(set(request) - set(ENQUEUE_FIELDS))
    if unknown:
        raise UsageError(shape + "unknown field %s" % quoted(unknown[0]))
    body = dict(request, metadata=request.get("metadata") if request.get("metadata") is not None else {})
    item = without_lease_token(ctx.session().fetch("POST", queue_path(args.ref, "items"), body))
    show_queue_item(ctx, item)


def show_queue_item(ctx, item):
    if ctx.ui.emit_unless_table(item):
        ctx.ui.pairs([
            ("ID", item.get("id")), ("Queue", item.get("queue_ref", item.get("queue"))),
            *labelled(item, "Item key=item_key?|Status=status|Priority=priority|Attempts=attempt_count|"
                            "Enqueue source=enqueue_source?|Trace tag=trace_tag?|"
                            "Requested by identity=requested_by_identity?|"
                            "Requested by execution=requested_by_execution?|"
                            "Requested by enforcement=requested_by_enforcement?|"
                            "Leased execution=leased_execution?|Lease token=lease_token?|"
                            "Lease expires=lease_expires_at@?"),
            ("Payload", compact_json(item.get("payload"))), ("Metadata", compact_json(item.get("metadata"))),
            ("Last error", compact_json(item.get("last_error"))),
            ("Acknowledgement", compact_json(item.get("ack_summary")))] + timestamps(item))


command("queue items", "a queue's items: queue items REF list|show|preview|update|reprioritize|delete",
         "queue_ref REF: the queue's ref")(needs_a_command)


@command("queue items list", "list a queue's items",
         "--item-key KEY: only the item with this key",
         "--enqueue-source SOURCE: only items enqueued this way (api, execution, ...)",
         arg("--status: only items in this status (repeatable)", action="append", choices=QUEUE_ITEM_STATUSES),
         *QUEUE_PAGE)
def cmd_queue_items_list(ctx, args):
    body = ctx.session().call("GET", queue_path(args.queue_ref, "items"), query={
        "item_key": args.item_key, "enqueue_source": args.enqueue_source, "statuses": args.status,
        "page": args.page, "per_page": args.per_page})
    items = list(map(without_lease_token, list_items(body)))
    pagination = pagination_of(body)
    if ctx.ui.emit_unless_table({"items": items, "pagination": pagination}):
        queue_items_table(ctx, items, "No queue items found.")
    note_partial(ctx, pagination, len(items), "items")


@command("queue items show", "show one item", arg("item_id ITEM_ID: item id", type=ID_NUMBER))
def cmd_queue_items_show(ctx, args):
    """The server routes only PUT and DELETE for one item: it is found in the queue's list."""
    def wanted(item):
        return item.get("id") == args.item_id

    items, _ = fetch_list(ctx.session(), queue_path(args.queue_ref, "items"), size_param="per_page",
                          every_page=True, until=wanted)
    item = next((item for item in items if wanted(item)), None)
    if item is None:
        raise ApiError("Work queue item %d not found in queue %s" % (args.item_id, quoted(args.queue_ref, 64)), 404)
    show_queue_item(ctx, without_lease_token(item))


@command("queue items preview", "the pending items a selector matches",
         *(SELECTOR + (arg("--limit N: show at most N, 1 to 100 (default 100)", type=Number(1, 100), default=100),)))
def cmd_queue_items_preview(ctx, args):
    selector = {"path": args.selector, "vars": json_object_arg(args.vars_json, "--vars-json")}
    result = ctx.session().fetch("POST", queue_path(args.queue_ref, "items", "query", "preview"),
                                 {"selector": selector, "limit": args.limit})
    items = list(map(without_lease_token, list_items(result))) if isinstance(result.get("items"), list) else []
    result = dict(result, items=items)

    if ctx.ui.emit_unless_table(result):
        ctx.ui.section("Queue Item Selector Preview")
        ctx.ui.pairs(labelled(result, "Matched=matched_count|Previewed=preview_count"))
        queue_items_table(ctx, items, "No matching pending queue items.")


QUEUE_OPERATIONS = {"patch_payload": "update", "reprioritize": "reprioritize", "cancel": "delete/cancel"}


def apply_to_items(ctx, args, operation, **fields):
    selector = {"path": args.selector, "vars": json_object_arg(args.vars_json, "--vars-json")}
    result = ctx.session().fetch("POST", queue_path(args.queue_ref, "items", "query", "apply"), dict(
        selector=selector, operation=operation, preview_limit=args.preview_limit, **fields))
    items = list(map(without_lease_token, list_items(result))) if isinstance(result.get("items"), list) else []
    result = dict(result, items=items)
    label = QUEUE_OPERATIONS.get(result.get("operation"), result.get("operation"))

    if ctx.ui.emit_unless_table(result):
        ctx.ui.success("Applied %s to %s pending queue item(s)" % (label, result.get("affected_count")))
        ctx.ui.pairs([("Operation", label),
                      *labelled(result,
                                "Matched=matched_count|Affected=affected_count|Skipped=skipped_count|"
                                "Previewed=preview_count")])
        queue_items_table(ctx, items, "No matching pending queue items.")


@command("queue items update", "merge a JSON patch into the payload of the pending items a selector matches",
         *(SELECTOR + (arg("--patch-json JSON: a JSON Merge Patch object", required=True),
                       PREVIEW_LIMIT)))
def cmd_queue_items_update(ctx, args):
    apply_to_items(ctx, args, "patch_payload", payload_patch=json_object_arg(args.patch_json, "--patch-json"))


@command("queue items reprioritize", "set the priority of the pending items a selector matches",
         *(SELECTOR + (arg("--priority N: the new priority of each matched item", type=Number(-2 ** 31, 2 ** 31 - 1),
                           required=True),
                       PREVIEW_LIMIT)))
def cmd_queue_items_reprioritize(ctx, args):
    apply_to_items(ctx, args, "reprioritize", priority=args.priority)


@command("queue items delete", "cancel the pending items a selector matches (also: cancel)",
         *(SELECTOR + (PREVIEW_LIMIT,)))
@command("queue items cancel", "cancel the pending items a selector matches (as delete)",
         *(SELECTOR + (PREVIEW_LIMIT,)))
def cmd_queue_items_delete(ctx, args):
    apply_to_items(ctx, args, "cancel")


# === Commands: cache =========================================================
# Owner-scoped caches: namespaces of entries, published as immutable generations. Every
# command names its owner (--owner-type, and the matching --owner-*-ref); GET and DELETE
# send it as a query, POST and PUT in the body. Answers may come with or without the
# {"data": ...} envelope. A refresh is begin, upload each NDJSON chunk, seal, promote;
# `refresh apply` does all four from one file.

group("cache", "owner-scoped caches: namespaces, entries, generations and refreshes")

CACHE_OWNER_TYPES = ("system", "identity", "pack", "action", "sensor")


def with_options(argument, **options):
    """The same argument with some of its options changed."""
    flags, spec = argument
    return flags, dict(spec, **options)


CACHE_OWNER = (
    arg("--owner-type: whose cache: system, identity (yours), "
        "pack, action or sensor", choices=CACHE_OWNER_TYPES, required=True),
    arg("--owner-pack-ref PACK: the pack, with --owner-type pack"),
    arg("--owner-action-ref ACTION: the action, with --owner-type action"),
    arg("--owner-sensor-ref SENSOR: the sensor, with --owner-type sensor"))
NAMESPACE = arg("namespace NAMESPACE: the namespace's name")
GENERATION_ID = arg("generation_id GENERATION: a generation id", type=WHOLE_NUMBER)
NAMESPACE_POLICY = tuple(
    arg("--%s N: %s" % (name.replace("_", "-"), text), dest=name, type=WHOLE_NUMBER)
    for name, text in (("freshness_target_seconds", "how fresh the active generation should be, in seconds"),
                       ("max_records_per_generation", "the most records one generation may hold"),
                       ("max_generation_bytes", "the most bytes one generation may hold"),
                       ("max_retained_bytes", "the most bytes kept across generations"),
                       ("max_retained_generations", "how many generations are kept"),
                       ("max_staging_generations", "how many generations may be staged at once")))
REFRESH_CONCURRENCY = arg("--refresh-concurrency: a begin while another refresh is unpublished: reuse answers with "
                          "that one's generation, conflict refuses (409), parallel stages another",
                          choices=("reuse", "conflict", "parallel"))
EXPECTED_ACTIVE = (arg("--expected-active GENERATION: the active generation seen before this refresh began",
                       type=WHOLE_NUMBER),
                   flag("--expect-empty: this is the namespace's first publication"))
METADATA_PAGE = (arg("--limit N: at most N, 1 to 500", type=Number(1, 500)),
                 arg("--cursor CURSOR: the cursor an earlier page ended with"))
NDJSON_LINE_LIMIT = 1024 * 1024     # bytes in one line of an upload file
CHUNK_BYTE_LIMIT = 4 * 1024 * 1024  # bytes of records in one uploaded chunk
LOOKUP_LIMIT = 1000                 # external ids in one get-many


def cache_owner(args):
    """{"owner_type", "owner_ref"?} from the flags: system and identity take no ref, the
    others exactly their own."""
    given = {kind: getattr(args, "owner_%s_ref" % kind) for kind in ("pack", "action", "sensor")}
    given = {kind: ref for kind, ref in given.items() if ref is not None}
    kind = args.owner_type
    if kind in ("system", "identity") and given or kind not in ("system", "identity") and list(given) != [kind]:
        needed = {"system": "no owner reference", "identity": "no owner reference (the current identity is used)"}
        raise UsageError("--owner-type %s requires exactly %s" % (kind, needed.get(kind, "--owner-%s-ref" % kind)))
    return dict({"owner_type": kind}, **({"owner_ref": given[kind]} if given else {}))


def cache_path(args, *rest):
    return "/".join(["/cache/namespaces", path_segment(args.namespace)] + list(map(path_segment, rest)))


def cache_request(ctx, method, path, body=None, query=None):
    """A cache API call: the answer with or without its data envelope; an error line that
    says 'Cache API error'; an empty body (a DELETE) is None."""
    resp = ctx.session().request(method, path, body, query)
    if not resp.ok:
        raise api_error(resp, "Cache API error", refresh_in_progress(resp))
    answer = resp.json()
    return answer["data"] if isinstance(answer, dict) and isinstance(answer.get("data"), (dict, list)) else answer


def owner_flags(owner):
    """The flags that select an owner, as a command line repeats them."""
    flags = " --owner-type " + owner["owner_type"]
    if owner.get("owner_ref") is not None:
        flags += " --owner-%s-ref %s" % (owner["owner_type"], shell_quote(owner["owner_ref"]))
    return flags


def refresh_in_progress(resp):
    """' (generation G, begun by execution E)': which refresh a 409 cache_refresh_in_progress names."""
    try:
        details = json_loads(resp.body.decode("utf-8")).get("details")
    except (ValueError, UnicodeDecodeError, RecursionError, AttributeError):
        return ""
    if resp.status != 409 or not isinstance(details, dict) or not is_id(details.get("generation_id")):
        return ""
    execution = details.get("created_by_execution")
    return " (generation %d%s)" % (details["generation_id"],
                                   ", begun by execution %d" % execution if is_id(execution) else "")


def is_id(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def cache_object(answer):
    if not isinstance(answer, dict):
        raise ApiError("the server's answer is not an object: %s" % snippet(json.dumps(answer).encode("utf-8"), 100))
    return answer


def cache_list(answer, key):
    """(items, next_cursor) of a cache list: {key|items: [...], next_cursor} or an array."""
    if isinstance(answer, dict):
        items = next((answer[k] for k in (key, "items") if isinstance(answer.get(k), list)), None)
        if items is not None:
            return list_items(items), answer.get("next_cursor")
    return list_items(answer), None


def expected_active(args):
    if (args.expected_active is None) == (not args.expect_empty):
        raise UsageError("Specify exactly one of --expected-active or --expect-empty")
    return args.expected_active


def namespace_owner(namespace):
    ref = namespace.get("owner_ref")
    if ref is None:
        ref = {"identity": namespace.get("owner_identity"), "pack": namespace.get("owner_pack_ref"),
               "action": namespace.get("owner_action_ref"), "sensor": namespace.get("owner_sensor_ref")}.get(
            namespace.get("owner_type"), namespace.get("owner"))
    return "%s: %s" % (namespace.get("owner_type"), ref) if ref is not None else namespace.get("owner_type")


def show_namespace(ctx, namespace, done=None):
    if ctx.ui.emit_unless_table(namespace):
        if done:
            ctx.ui.success("Cache namespace '%s' %s" % (namespace.get("namespace"), done))
        ctx.ui.pairs([
            *labelled(namespace, "Namespace=namespace|ID=id"), ("Owner", namespace_owner(namespace)),
            ("Active Generation", or_dash(namespace.get("active_generation", namespace.get("active_generation_id")))),
            *labelled(namespace,
                      "Records=record_count?|Bytes=size_bytes?|Freshness Target=freshness_target_seconds?|"
                      "Stale=stale?|Refresh Health=refresh_health?|"
                      "Max Records / Generation=max_records_per_generation?|"
                      "Max Generation Bytes=max_generation_bytes?|Max Retained Bytes=max_retained_bytes?|"
                      "Max Retained Generations=max_retained_generations?|"
                      "Max Staging Generations=max_staging_generations?|Refresh Concurrency=refresh_concurrency?"),
            *labelled(namespace, "Created=created@?|Updated=updated@?")])


def show_generation(ctx, generation, done=None):
    if ctx.ui.emit_unless_table(generation):
        if done:
            ctx.ui.success(done)
        ctx.ui.pairs([
            *labelled(generation,
                      "Generation=generation_id|Namespace=namespace_id|State=status|"
                      "Client Refresh ID=client_refresh_id|Expected Chunks=expected_chunk_count|"
                      "Expected Active=expected_active_generation_id?|Expected Records=expected_record_count?|"
                      "Expected Bytes=expected_size_bytes?|Records=record_count|Bytes=size_bytes|"
                      "Source Revision=source_revision?|Created By=created_by?|"
                      "Created By Execution=created_by_execution?")] + [
            *labelled(generation, "Sealed=sealed@?|Activated=activated@?|Readable Until=readable_until@?|"
                                  "Failure=failure_reason?")])


def value_kind(value):
    if isinstance(value, dict):
        return "object (%d fields)" % len(value)
    if isinstance(value, list):
        return "array (%d items)" % len(value)
    return "null" if value is None else "boolean" if isinstance(value, bool) else \
        "number" if isinstance(value, (int, float)) else "string"


def entries_table(ctx, entries, full=False):
    ctx.ui.table(["External ID", "Source Updated", "Bytes", "Value"] + (["Full Value"] if full else []),
                 [[*cells(e, "external_id source_updated_at@? size_bytes"), value_kind(e.get("value"))]
                  + ([compact_json(e.get("value"))] if full else []) for e in entries],
                 empty="No cache entries found")


command("cache namespace", "cache namespaces: list, create, show, update, delete")(needs_a_command)


@command("cache namespace list", "list one owner's namespaces",
         *(CACHE_OWNER + (arg("--namespace TEXT: names containing this (any case)", dest="name_filter"),
                          arg("--freshness: only namespaces in this state",
                              choices=("fresh", "stale", "unpopulated")),) + METADATA_PAGE),
         examples=("attune cache namespace list --owner-type pack --owner-pack-ref core",))
def cmd_cache_namespace_list(ctx, args):
    query = dict(cache_owner(args), namespace=args.name_filter, freshness=args.freshness, limit=args.limit,
                 cursor=args.cursor)
    namespaces, cursor = cache_list(cache_request(ctx, "GET", "/cache/namespaces", query=query), "namespaces")

    if ctx.ui.emit_unless_table({"namespaces": namespaces, "next_cursor": cursor}):
        ctx.ui.table(["Namespace", "Owner", "Active Gen", "Records", "Bytes", "Stale"],
                     [[n.get("namespace"), namespace_owner(n),
                       or_dash(n.get("active_generation", n.get("active_generation_id"))),
                       *cells(n, "record_count? size_bytes? stale?")] for n in namespaces],
                     empty="No cache namespaces found")
        if cursor:
            ctx.ui.info("Next cursor: %s" % cursor)


def namespace_policy(args):
    return {name: getattr(args, name) for name in NAMESPACE_POLICY_FIELDS if getattr(args, name) is not None}


NAMESPACE_POLICY_FIELDS = [options["dest"] for _, options in NAMESPACE_POLICY]


@command("cache namespace create", "create a namespace (its owner and name cannot change later)",
         NAMESPACE, *(CACHE_OWNER + NAMESPACE_POLICY + (REFRESH_CONCURRENCY,)))
def cmd_cache_namespace_create(ctx, args):
    body = dict(cache_owner(args), namespace=args.namespace, **namespace_policy(args))
    if args.refresh_concurrency is not None:
        body["refresh_concurrency"] = args.refresh_concurrency
    show_namespace(ctx, cache_object(cache_request(ctx, "POST", "/cache/namespaces", body)), "created")


@command("cache namespace show", "show a namespace (no entries are read)", NAMESPACE, *CACHE_OWNER)
def cmd_cache_namespace_show(ctx, args):
    show_namespace(ctx, cache_object(cache_request(ctx, "GET", cache_path(args), query=cache_owner(args))))


@command("cache namespace update", "change a namespace's policy", NAMESPACE,
         *(CACHE_OWNER + NAMESPACE_POLICY + (REFRESH_CONCURRENCY,)))
def cmd_cache_namespace_update(ctx, args):
    policy = namespace_policy(args)
    if args.refresh_concurrency is not None:
        policy["refresh_concurrency"] = args.refresh_concurrency
    if not policy:
        raise UsageError("Provide at least one mutable policy field to update")
    show_namespace(ctx, cache_object(cache_request(ctx, "PUT", cache_path(args), dict(cache_owner(args), **policy))),
                   "updated")


@command("cache namespace delete", "delete a namespace; its generations become unreadable",
         NAMESPACE, *(CACHE_OWNER + (YES,)))
def cmd_cache_namespace_delete(ctx, args):
    owner = cache_owner(args)
    if confirm(ctx, args, "delete cache namespace '%s'" % args.namespace, "Operation cancelled"):
        cache_request(ctx, "DELETE", cache_path(args), query=owner)
        message = "Cache namespace '%s' deleted" % args.namespace
        if ctx.ui.emit_unless_table({"message": message}):
            ctx.ui.success(message)


command("cache entry", "read published entries: get, get-many, scan")(needs_a_command)


GENERATION_FLAG = arg("--generation ID: read this retained generation, not the active one", type=WHOLE_NUMBER)


@command("cache entry get", "one entry of the active (or another) generation",
         NAMESPACE, "external_id EXTERNAL_ID: the entry's external id", *(CACHE_OWNER + (GENERATION_FLAG,)))
def cmd_cache_entry_get(ctx, args):
    body = dict(cache_owner(args), external_id=args.external_id, generation_id=args.generation, require_fresh=False)
    found = cache_object(cache_request(ctx, "POST", cache_path(args, "entries", "lookup"), body))
    entry = found.get("item")

    if ctx.ui.emit_unless_table(found):
        if not isinstance(entry, dict):
            return ctx.ui.info("No cache entry found in generation %s" % found.get("generation_id"))
        ctx.ui.info("Generation %s" % found.get("generation_id"))
        ctx.ui.pairs([("External ID", entry.get("external_id")),
                      *labelled(entry, "Source Updated=source_updated_at@?|Bytes=size_bytes"),
                      ("Value", to_json(entry.get("value")))])


def external_ids(ctx, args):
    ids = list(args.external_id or [])
    if args.external_id_file is not None:
        for line in ndjson_lines(ctx, args.external_id_file, "external ID list"):
            value = line.strip()
            if value:
                ids.append(value)
            if len(ids) > LOOKUP_LIMIT:
                break
    if not ids:
        raise UsageError("Provide at least one --external-id or --external-id-file")
    if len(ids) > LOOKUP_LIMIT:
        raise UsageError("entry get-many accepts at most %d external IDs" % LOOKUP_LIMIT)
    if not all(ids):
        raise UsageError("External IDs must be non-empty")
    return ids


@command("cache entry get-many", "up to 1000 entries at once (the ids go in the body, not the URL)",
         NAMESPACE, *(CACHE_OWNER + (
             arg("--external-id ID: an external id (repeatable)", action="append"),
             arg("--external-id-file PATH: external ids, one per line; - for stdin"),
             GENERATION_FLAG)))
def cmd_cache_entry_get_many(ctx, args):
    owner = cache_owner(args)
    body = dict(owner, external_ids=external_ids(ctx, args), generation_id=args.generation, require_fresh=False)
    found = cache_object(cache_request(ctx, "POST", cache_path(args, "entries", "lookup-many"), body))
    items = list_items(found.get("items") if isinstance(found.get("items"), list) else [])
    missing = found.get("missing_external_ids")
    if isinstance(missing, list) and missing:
        ctx.ui.warn("%d requested external ID(s) were not found" % len(missing))
    if ctx.ui.emit_unless_table(found):
        entries_table(ctx, items)


@command("cache entry scan", "a page of a generation's entries (--all with --output ndjson: every page)",
         NAMESPACE, *(CACHE_OWNER + (
             GENERATION_FLAG, arg("--cursor CURSOR: the cursor an earlier page ended with"),
             arg("--page-size N: entries per page, 1 to 1000", type=Number(1, 1000), default=100),
             flag("--include-values: show each entry's value in the table"),
             flag("--all: every page, as NDJSON on stdout (needs --output ndjson)"))))
def cmd_cache_entry_scan(ctx, args):
    ndjson = ctx.ui.ndjson
    if ndjson != args.all:
        raise UsageError("--output ndjson requires '--all' for cache entry scans" if ndjson
                         else "'cache entry scan --all' requires '--output ndjson'")
    owner, generation, cursor = cache_owner(args), args.generation, args.cursor
    while True:
        query = dict(owner, generation=generation, cursor=cursor, limit=args.page_size)
        page = cache_object(cache_request(ctx, "GET", cache_path(args, "entries"), query=query))
        items = list_items(page.get("items") if isinstance(page.get("items"), list) else [])
        if not args.all:
            break
        if generation is not None and page.get("generation_id") != generation:
            raise ApiError("Cache scan response changed pinned generation from %s to %s"
                           % (generation, page.get("generation_id")))
        generation = page.get("generation_id")  # every page of one scan comes from one generation
        for entry in items:
            line = json.dumps(SECRETS.mask_data(entry), separators=(",", ":"))
            ctx.ui.stdout.write(line.translate(UNICODE_CONTROL_ESCAPES) + "\n")
        ctx.ui.stdout.flush()
        ctx.ui.stderr.write(json.dumps({"generation": generation, "cursor_expires_at": page.get("cursor_expires_at"),
                                        "next_cursor": page.get("next_cursor"), "record_count": page.get("record_count"),
                                        "stale": page.get("stale")}).translate(UNICODE_CONTROL_ESCAPES) + "\n")
        if page.get("next_cursor") is not None and page.get("next_cursor") == cursor:
            raise ServerError("the server answered cursor %s with the same cursor; stopped" % quoted(str(cursor)))
        cursor = page.get("next_cursor")
        if not cursor:
            return 0

    if ctx.ui.emit_unless_table(page):
        entries_table(ctx, items, args.include_values)
        ctx.ui.pairs([("Pinned Generation", page.get("generation_id")),
                      *labelled(page, "Cursor Expires=cursor_expires_at@?|Next Cursor=next_cursor?|"
                                      "Record Count=record_count?|Stale=stale")])


command("cache generation", "a namespace's generations: list, show")(needs_a_command)


@command("cache generation list", "list a namespace's generations", NAMESPACE, *(CACHE_OWNER + METADATA_PAGE))
def cmd_cache_generation_list(ctx, args):
    query = dict(cache_owner(args), limit=args.limit, cursor=args.cursor)
    generations, cursor = cache_list(cache_request(ctx, "GET", cache_path(args, "generations"), query=query),
                                     "generations")

    if ctx.ui.emit_unless_table({"generations": generations, "next_cursor": cursor}):
        ctx.ui.table(*table_of("ID=generation_id|State=status|Records=record_count|Bytes=size_bytes|"
                               "Source Revision=source_revision?|Execution=created_by_execution?|Created=created@",
                               generations), empty="No cache generations found")
        if cursor:
            ctx.ui.info("Next cursor: %s" % cursor)


@command("cache generation show", "show a generation and its validation state",
         NAMESPACE, GENERATION_ID, *CACHE_OWNER)
def cmd_cache_generation_show(ctx, args):
    show_generation(ctx, cache_object(cache_request(ctx, "GET", cache_path(args, "generations", args.generation_id),
                                                    query=cache_owner(args))))


command("cache refresh", "publish a generation: begin, upload, seal, promote, abort, or all at once with apply")(needs_a_command)


REFRESH_ID = arg("--client-refresh-id ID: your id for this refresh, so a retried begin is one "
                 "(default: cli-<ms>-<pid>-<n>)")
CHUNK_COUNT = arg("--expected-chunk-count N: how many chunks will be uploaded", type=Number(0, 2 ** 31 - 1))
REFRESH_SEQUENCE = []  # process state, a list used as a counter: refresh ids this process made


def new_refresh_id():
    REFRESH_SEQUENCE.append(None)
    return "cli-%d-%d-%d" % (int(time.time() * 1000), os.getpid(), len(REFRESH_SEQUENCE) - 1)


def begin_refresh(ctx, args, owner, chunks, records=None, size=None):
    body = dict(owner, client_refresh_id=args.client_refresh_id or new_refresh_id(),
                expected_active_generation_id=expected_active(args), expected_chunk_count=chunks)
    for key, value in (("expected_record_count", records), ("expected_size_bytes", size),
                       ("source_revision", args.source_revision)):
        if value is not None:
            body[key] = value
    generation = cache_object(cache_request(ctx, "POST", cache_path(args, "generations"), body))
    reused = None
    if generation.get("client_refresh_id") != body["client_refresh_id"]:
        # the namespace reuses an unpublished refresh: that one is another writer's, never this one's to continue
        gid, execution = generation.get("generation_id"), generation.get("created_by_execution")
        reused = ("reused generation %s of refresh %s%s (the namespace's refresh concurrency is reuse): it is "
                  "another producer's, still unpublished; see it with attune cache generation show %s %s%s"
                  % (gid if is_id(gid) else "?", quoted(str(generation.get("client_refresh_id"))),
                     ", begun by execution %d" % execution if is_id(execution) else "", shell_quote(args.namespace),
                     gid if is_id(gid) else "GENERATION", owner_flags(owner)))
    return generation, reused


@command("cache refresh begin", "begin a staging generation (a retried begin with the same refresh id is one)",
         NAMESPACE, *(CACHE_OWNER + (
             REFRESH_ID, with_options(CHUNK_COUNT, required=True),
             arg("--expected-count N: how many records", type=WHOLE_NUMBER),
             arg("--expected-bytes N: how many encoded bytes", type=WHOLE_NUMBER),
             arg("--source-revision TEXT: the upstream revision these records come from"))
             + EXPECTED_ACTIVE))
def cmd_cache_refresh_begin(ctx, args):
    generation, reused = begin_refresh(ctx, args, cache_owner(args), args.expected_chunk_count, args.expected_count,
                                       args.expected_bytes)
    if reused:  # the server's answer, as the Rust CLI prints it: that generation, and exit 0
        ctx.ui.warn(reused)
    show_generation(ctx, generation, None if reused else "staging generation created")


def ndjson_lines(ctx, path, what):
    """The lines of a file (or stdin for '-'), each at most NDJSON_LINE_LIMIT bytes; a FIFO,
    device or directory is refused as by read_regular_file()."""
    if path == "-":
        stream = getattr(ctx.ui.stdin, "buffer", ctx.ui.stdin)
    else:
        try:
            fd = open_regular_file(path)[0]
        except OSError as e:
            raise UsageError("Failed to read %s %s: %s" % (what, quoted(path), e.strerror or e))
        stream = os.fdopen(fd, "rb")
    try:
        number = 0
        while True:
            line = stream.readline(NDJSON_LINE_LIMIT + 1)
            if not line:
                return
            number += 1
            if len(line) > NDJSON_LINE_LIMIT:
                raise UsageError("NDJSON input line %d exceeds %d bytes" % (number, NDJSON_LINE_LIMIT))
            try:
                yield line.decode("utf-8") if isinstance(line, bytes) else line
            except UnicodeDecodeError:
                raise UsageError("%s line %d is not UTF-8 text" % (what[:1].upper() + what[1:], number))
    finally:
        if path != "-":
            stream.close()


def record_chunks(ctx, path, chunk_records):
    """The upload file as chunks of at most chunk_records records and CHUNK_BYTE_LIMIT bytes;
    each record {external_id, value, source_updated_at?, source_checksum?}."""
    chunk, size = [], 0
    for number, line in enumerate(ndjson_lines(ctx, path, "upload input"), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            record = json_loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "external_id" not in record or "value" not in record:
            raise UsageError("Upload line %d: each upload record must be a JSON object with external_id and value"
                             % number)
        if not isinstance(record["external_id"], str) or not record["external_id"]:
            raise UsageError("Upload line %d: upload records require a non-empty external_id" % number)
        if size + len(line.encode("utf-8")) > CHUNK_BYTE_LIMIT:
            if not chunk:
                raise UsageError("Upload chunk exceeds the %d byte bound; lower --chunk-records" % CHUNK_BYTE_LIMIT)
            yield chunk
            chunk, size = [], 0
        chunk.append({key: record[key] for key in ("external_id", "value", "source_updated_at", "source_checksum")
                      if key in record})
        size += len(line.encode("utf-8"))
        if len(chunk) == chunk_records:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def upload_chunk(ctx, args, owner, generation_id, index, entries):
    return cache_request(ctx, "PUT", cache_path(args, "generations", generation_id, "chunks", index),
                         dict(owner, entries=entries))


@command("cache refresh upload", "upload one chunk (an NDJSON file of at most 1000 records)",
         NAMESPACE, GENERATION_ID, *(CACHE_OWNER + (
             arg("--chunk-index N: from 0", type=Number(0, 2 ** 31 - 1), required=True),
             arg("--file PATH: the records, one JSON object per line; - for stdin", required=True))))
def cmd_cache_refresh_upload(ctx, args):
    owner = cache_owner(args)
    chunks = record_chunks(ctx, args.file, 1000)
    entries = next(chunks, None)
    if entries is None:
        raise UsageError("Upload input contains no records")
    if next(chunks, None) is not None:
        raise UsageError("Upload input exceeds one bounded chunk; split it into at most 1000 records per upload")
    answer = upload_chunk(ctx, args, owner, args.generation_id, args.chunk_index, entries)

    if ctx.ui.emit_unless_table(answer):
        ctx.ui.success("Cache chunk uploaded")
        ctx.ui.pairs([("Response", to_json(answer))])


def seal_refresh(ctx, args, owner, generation_id, chunks, records=None, size=None):
    body = dict(owner, expected_chunk_count=chunks)
    for key, value in (("expected_record_count", records), ("expected_size_bytes", size)):
        if value is not None:
            body[key] = value
    return cache_object(cache_request(ctx, "POST", cache_path(args, "generations", generation_id, "seal"), body))


@command("cache refresh seal", "check a fully uploaded generation and make it ready",
         NAMESPACE, GENERATION_ID, *(CACHE_OWNER + (
             with_options(CHUNK_COUNT, required=True),
             arg("--expected-count N: fail unless the generation holds this many entries", type=WHOLE_NUMBER),
             arg("--expected-bytes N: fail unless the generation holds this many bytes", type=WHOLE_NUMBER))))
def cmd_cache_refresh_seal(ctx, args):
    generation = seal_refresh(ctx, args, cache_owner(args), args.generation_id, args.expected_chunk_count,
                              args.expected_count, args.expected_bytes)
    show_generation(ctx, generation, "generation sealed")


def promote_refresh(ctx, args, owner, generation_id):
    """One optimistic request: a conflict is the answer, never retried or forced."""
    return cache_object(cache_request(ctx, "POST", cache_path(args, "generations", generation_id, "promote"),
                                      dict(owner, expected_active_generation_id=expected_active(args))))


@command("cache refresh promote", "publish a ready generation (if the active one is still the one expected)",
         NAMESPACE, GENERATION_ID, *(CACHE_OWNER + EXPECTED_ACTIVE))
def cmd_cache_refresh_promote(ctx, args):
    owner = cache_owner(args)
    expected_active(args)
    show_generation(ctx, promote_refresh(ctx, args, owner, args.generation_id), "generation promoted")


@command("cache refresh abort", "abandon a staging generation", NAMESPACE, GENERATION_ID, *(CACHE_OWNER + (YES,)))
def cmd_cache_refresh_abort(ctx, args):
    owner = cache_owner(args)
    if confirm(ctx, args, "abort cache generation %d" % args.generation_id, "Operation cancelled"):
        cache_request(ctx, "POST", cache_path(args, "generations", args.generation_id, "abandon"), owner)
        message = "Cache generation '%d' deleted" % args.generation_id
        if ctx.ui.emit_unless_table({"message": message}):
            ctx.ui.success(message)


@command("cache refresh apply", "begin, upload every chunk of an NDJSON file, seal and promote",
         NAMESPACE, *(CACHE_OWNER + (
             arg("--input PATH: the records, one JSON object per line; - for stdin", required=True),
             REFRESH_ID,
             arg("--chunk-records N: records per upload, 1 to 10000 (default 1000)", type=Number(1, 10000),
                 default=1000),
             with_options(CHUNK_COUNT, help="how many chunks (needed with --input -: stdin is read once)"),
             arg("--source-revision TEXT: the upstream revision these records come from"))
             + EXPECTED_ACTIVE))
def cmd_cache_refresh_apply(ctx, args):
    owner = cache_owner(args)
    expected_active(args)
    records = None
    if args.input == "-":
        if args.expected_chunk_count is None:
            raise UsageError("--expected-chunk-count is required with --input - because stdin cannot be replayed")
        chunks = args.expected_chunk_count
    else:  # a first pass counts, so the server can check what arrives
        counted = list(map(len, record_chunks(ctx, args.input, args.chunk_records)))
        chunks, records = len(counted), sum(counted)
        if args.expected_chunk_count is not None and args.expected_chunk_count != chunks:
            raise UsageError("--expected-chunk-count (%d) does not match input (%d)" % (args.expected_chunk_count, chunks))
    generation, reused = begin_refresh(ctx, args, owner, chunks, records)
    if reused:  # another producer's refresh: nothing of it is this apply's to write, seal, promote or abort
        raise AttuneError(reused + "; this apply uploaded, sealed and promoted nothing")
    generation_id = generation.get("generation_id")
    uploaded = 0
    for index, entries in enumerate(record_chunks(ctx, args.input, args.chunk_records)):
        upload_chunk(ctx, args, owner, generation_id, index, entries)
        uploaded += 1
    if uploaded != chunks:
        raise AttuneError("Input changed while refresh was applying: expected %d chunks, uploaded %d"
                          % (chunks, uploaded))
    sealed = seal_refresh(ctx, args, owner, generation_id, chunks, records)
    show_generation(ctx, promote_refresh(ctx, args, owner, sealed.get("generation_id", generation_id)),
                    "refresh applied and promoted")


# === Commands: audit =========================================================

group("audit", "read the server's audit log (needs audit_log:read)")


def audit_actor(event):
    return event.get("actor_login") or or_dash(event.get("actor_identity"))


def audit_resource(event):
    kind, ref = event.get("resource_type"), event.get("resource_ref")
    return "%s:%s" % (kind, ref) if kind and ref else kind or "-"


def audit_http(event):
    method, status = event.get("http_method"), event.get("http_status")
    return "%s %s" % (method, status) if method and status is not None else method or "-"


@command("audit list", "list audit events, newest first",
         arg("--category: only this category", choices=("api", "auth", "rbac", "secret", "admin", "execution", "pack")),
         "--event-type: only this event type (auth.login, ...)",
         arg("--outcome: only this outcome", choices=("success", "failure", "denied")),
         "--actor-login: only events of this login",
         arg("--actor-identity N: only events of this identity id", type=ID_NUMBER),
         "--resource-type: only events on this resource type (pack, action, ...)",
         arg("--resource-id N: only events on this resource id", type=WHOLE_NUMBER),
         "--resource-ref: only events on this resource ref",
         "--http-method: only requests of this method (GET, POST, ...)",
         arg("--http-status N: only requests answered with this status", type=Number(100, 599)),
         "--http-path: only requests to this path",
         "--request-id UUID: only events of this request",
         "--after ISO: created at or after this time (ISO 8601)",
         "--before ISO: created before this time (ISO 8601)",
         PAGE, PER_PAGE,
         examples=("attune audit list --category auth --outcome failure",))
def cmd_audit_list(ctx, args):
    body = ctx.session().call("GET", "/audit-events", query={
        "page": args.page, "per_page": args.per_page, "category": args.category, "event_type": args.event_type,
        "outcome": args.outcome, "actor_login": args.actor_login, "actor_identity": args.actor_identity,
        "resource_type": args.resource_type, "resource_id": args.resource_id, "resource_ref": args.resource_ref,
        "http_method": args.http_method, "http_status": args.http_status, "http_path": args.http_path,
        "request_id": args.request_id, "created_after": args.after, "created_before": args.before})
    events = list_items(body)
    emit_list(ctx, events, pagination_of(body), "audit events",
              ["ID", "Created", "Category", "Event Type", "Outcome", "Actor", "Resource", "HTTP"],
              lambda e: [*cells(e, "id created@ category event_type outcome"), audit_actor(e), audit_resource(e),
                         audit_http(e)])


@command("audit show", "show one audit event", arg("id ID: audit event id", type=ID_NUMBER))
def cmd_audit_show(ctx, args):
    event = ctx.session().fetch("GET", "/audit-events/%d" % args.id)

    if ctx.ui.emit_unless_table(event):
        ctx.ui.pairs([(label, format_timestamp(event.get(key)) if key == "created" else or_dash(event.get(key)))
                      for label, key in (
            ("ID", "id"), ("Created", "created"), ("Category", "category"), ("Event Type", "event_type"),
            ("Outcome", "outcome"), ("Actor Identity", "actor_identity"), ("Actor Login", "actor_login"),
            ("Token Type", "actor_token_type"), ("Actor IP", "actor_ip"), ("User Agent", "user_agent"),
            ("Resource Type", "resource_type"), ("Resource ID", "resource_id"), ("Resource Ref", "resource_ref"),
            ("Pack Ref", "pack_ref"), ("HTTP Method", "http_method"), ("HTTP Path", "http_path"),
            ("HTTP Status", "http_status"), ("Request ID", "request_id"), ("Parent Event ID", "parent_event_id"),
            ("Error", "error"))], "Audit Event #%d" % args.id)
        show_json_section(ctx, "Details", event.get("details"))


@command("audit chain", "every audit event of one request", "request_id REQUEST_ID: the request id (a UUID)")
def cmd_audit_chain(ctx, args):
    events = list_items(ctx.session().call("GET", "/audit-events/by-request/" + path_segment(args.request_id)))

    if ctx.ui.emit_unless_table(events):
        if not events:
            return ctx.ui.info("No audit events found for that request id")
        ctx.ui.section("Audit chain for request %s (%d events)" % (args.request_id, len(events)))
        ctx.ui.table(["ID", "Created", "Category", "Event Type", "Outcome", "Actor", "Path"],
                     [[*cells(e, "id created@ category event_type outcome"), audit_actor(e), cell(e, "http_path?")]
                      for e in events])


# === Commands: policies ======================================================
# Execution policies: how many may run at once, how fast they may start, quotas; for
# everything (global), a pack or an action.

group("policy", "list, show, create, update, enable, disable and delete execution policies")


POLICY_FEATURES = (
    arg("--concurrency-limit N: at most N running at once", type=WHOLE_NUMBER),
    arg("--on-concurrency: what happens past the limit (default enqueue)", choices=("enqueue", "cancel")),
    arg("--group-by PATH: count concurrency per parameter value (repeatable)", action="append"),
    arg("--rate-limit-max N: at most N starts per window", type=ID_NUMBER),
    arg("--rate-limit-window WINDOW: the window: 60s, 10m, 1h or seconds", type=Seconds(1)),
    arg("--quota-running-executions N: at most this many executions running at once", type=ID_NUMBER),
    arg("--quota-executions-total N: at most this many executions in all", type=ID_NUMBER),
    arg("--tag: a tag (repeatable; on update, replaces the tags)", action="append"))


def policy_scope_text(policy):
    scope = policy.get("scope") if isinstance(policy.get("scope"), dict) else {}
    kind = scope.get("type")
    if kind == "pack":
        return "pack:%s" % scope.get("pack_ref")
    if kind == "action":
        return "action:%s" % scope.get("action_ref")
    return kind or "global"


def policy_features(policy):
    parts = []
    concurrency = policy.get("concurrency")
    if isinstance(concurrency, dict):
        parts.append("concurrency %s/%s" % (concurrency.get("limit"), concurrency.get("method") or "enqueue"))
    rate = policy.get("rate_limit")
    if isinstance(rate, dict):
        parts.append("rate %s/%ss" % (rate.get("max_executions"), rate.get("window_seconds")))
    quotas = policy.get("quotas")
    if isinstance(quotas, list) and quotas:
        parts.append("%d quotas" % len(quotas))
    return ", ".join(parts) or "none"


def show_policy(ctx, policy, message=None):
    if ctx.ui.emit_unless_table(policy):
        if message:
            ctx.ui.success(message)
        ctx.ui.pairs([*labelled(policy, "Ref=ref|Name=name|Description=description?|Enabled=enabled"),
                      ("Scope", policy_scope_text(policy)), ("Priority", policy.get("priority")),
                      ("Features", policy_features(policy)), ("Tags", cell_text(policy.get("tags")) or "-")])
        concurrency, rate, quotas = policy.get("concurrency"), policy.get("rate_limit"), policy.get("quotas")
        if isinstance(concurrency, dict):
            ctx.ui.section("Concurrency")
            group_by = (concurrency.get("parameters") or {}).get("group_by") \
                if isinstance(concurrency.get("parameters"), dict) else None
            ctx.ui.pairs([*labelled(concurrency, "Limit=limit|Behavior=method"),
                          ("Group By", cell_text(group_by) or "-")])
        if isinstance(rate, dict):
            ctx.ui.section("Rate Limit")
            ctx.ui.pairs(labelled(rate, "Max Executions=max_executions|Window Seconds=window_seconds"))
        if isinstance(quotas, list) and quotas:
            ctx.ui.section("Quotas")
            ctx.ui.table(["Type", "Limit"], [[*cells(q, "quota_type limit")] for q in quotas
                                             if isinstance(q, dict)])


def policy_feature_fields(args):
    """The feature keys of a create or update body, from the flags given."""
    body = {}
    if args.concurrency_limit is not None:
        if args.concurrency_limit <= 0:
            raise UsageError("--concurrency-limit must be greater than zero")
        body["concurrency"] = {"limit": args.concurrency_limit, "method": args.on_concurrency or "enqueue",
                               "parameters": {"group_by": args.group_by} if args.group_by else {}}
    elif args.on_concurrency or args.group_by:
        raise UsageError("--on-concurrency and --group-by need --concurrency-limit")
    if (args.rate_limit_max is None) != (args.rate_limit_window is None):
        raise UsageError("--rate-limit-max and --rate-limit-window must be provided together")
    if args.rate_limit_max is not None:
        body["rate_limit"] = {"max_executions": args.rate_limit_max, "window_seconds": args.rate_limit_window}
    quotas = [{"quota_type": kind, "limit": limit} for kind, limit in (
        ("running_executions", args.quota_running_executions), ("executions_total", args.quota_executions_total))
        if limit is not None]
    if quotas:
        body["quotas"] = quotas
    if args.tag:
        body["tags"] = args.tag
    return body


@command("policy list", "list execution policies",
         arg("--scope: only policies of this scope", choices=("global", "pack", "action")),
         "--pack: only policies of this pack ref",
         "--action: only policies of this action ref",
         arg("--enabled BOOL: only enabled (true) or disabled (false) policies", type=parse_bool),
         "--tag: only policies with this tag", ALL,
         examples=("attune policy list --scope pack --pack core",))
def cmd_policy_list(ctx, args):
    query = {"scope": args.scope, "pack_ref": args.pack, "action_ref": args.action, "tag": args.tag,
             "enabled": None if args.enabled is None else str(args.enabled).lower()}
    walk = ListWalk(ctx.session(), "/policies", query, every_page=args.all)
    emit_list(ctx, walk, walk, "policies", ["Ref", "Name", "Scope", "Features", "Priority", "Enabled"],
              lambda p: [*cells(p, "ref name"), policy_scope_text(p), policy_features(p),
                         *cells(p, "priority enabled")])


@command("policy show", "show one policy", ref("policy"))
def cmd_policy_show(ctx, args):
    show_policy(ctx, ctx.session().fetch("GET", "/policies/" + path_segment(args.ref)))


@command("policy create", "create an execution policy",
         *((arg("--policy-ref REF: unique policy ref", required=True),
            arg("--name: display name", required=True),
            arg("--scope: global, pack or action", required=True, choices=("global", "pack", "action")),
            arg("--description: description"),
            flag("--disabled: create it disabled"),
            arg("--priority: the policy's priority (default 0)", type=Number(-MAX_ID, MAX_ID), default=0),
            arg("--pack: the pack ref (scope pack or action)"),
            arg("--action: the action ref (scope action)"))
           + POLICY_FEATURES))
def cmd_policy_create(ctx, args):
    scope = {"type": args.scope}
    if args.scope == "pack":
        if not args.pack:
            raise UsageError("--pack is required for pack scope")
        scope["pack_ref"] = args.pack
    if args.scope == "action":
        if not args.action:
            raise UsageError("--action is required for action scope")
        scope["action_ref"] = args.action
    features = policy_feature_fields(args)
    if not set(features) - {"tags"}:
        raise UsageError("At least one policy feature must be configured")
    body = {"ref": args.policy_ref, "name": args.name, "enabled": not args.disabled, "priority": args.priority,
            "scope": scope}
    if args.description is not None:
        body["description"] = args.description
    body.update(features)
    policy = ctx.session().fetch("POST", "/policies", body)
    show_policy(ctx, policy, "Policy %s created" % policy.get("ref", args.policy_ref))


@command("policy update", "change a policy (only the fields given)",
         *((ref("policy"), arg("--name: new name"),
            arg("--description: new description (an empty one clears it)"),
            arg("--enabled BOOL: true or false", type=parse_bool),
            arg("--priority: new priority", type=Number(-MAX_ID, MAX_ID)),
            flag("--clear-concurrency: remove the concurrency limit"),
            flag("--clear-rate-limit: remove the rate limit"),
            flag("--clear-quotas: remove both quotas")) + POLICY_FEATURES))
def cmd_policy_update(ctx, args):
    body = policy_feature_fields(args)
    for flag, key, cleared in ((args.clear_concurrency, "concurrency", None),
                               (args.clear_rate_limit, "rate_limit", None), (args.clear_quotas, "quotas", [])):
        if flag:
            if key in body:
                raise UsageError("--clear-%s and a new %s contradict each other" % (key.replace("_", "-"), key))
            body[key] = cleared
    if args.description is not None:
        body["description"] = args.description or None  # an empty one clears it
    body = update_body([("name", args.name), ("enabled", args.enabled), ("priority", args.priority)], body)
    policy = ctx.session().fetch("PUT", "/policies/" + path_segment(args.ref), body)
    show_policy(ctx, policy, "Policy %s updated" % args.ref)


@command("policy disable", "disable a policy", ref("policy"), enable=False)
@command("policy enable", "enable a policy", ref("policy"), enable=True)
def cmd_policy_toggle(ctx, args):
    policy = ctx.session().fetch("PUT", "/policies/" + path_segment(args.ref), {"enabled": args.enable})
    if ctx.ui.emit_unless_table(policy):
        ctx.ui.success("Policy %s %s" % (args.ref, "enabled" if args.enable else "disabled"))


@command("policy delete", "delete a policy", ref("policy"), YES)
def cmd_policy_delete(ctx, args):
    if not confirm(ctx, args, "delete policy %s" % quoted(args.ref)):
        return
    ctx.session().request("DELETE", "/policies/" + path_segment(args.ref)).check()
    if ctx.ui.emit_unless_table({"deleted": args.ref}):
        ctx.ui.success("Policy %s deleted" % args.ref)


# === Commands: rules =========================================================

group("rule", "list, show, create, update, enable, disable and delete rules")

RULE_OPTIONS = (
    arg("-d --description: description"),
    arg("--conditions --criteria JSON: match conditions (JSON)", dest="conditions"),
    arg("--action-params JSON: action parameters (JSON object)"),
    arg("--trigger-params JSON: trigger parameters (JSON object)"),
    arg("--trace-tag-template TEMPLATE: the trace tag its executions get"),
    arg("--enabled BOOL: true (alone: true) or false", type=parse_bool, nargs="?", const=True))


def rule_pairs(rule):
    return [*labelled(rule,
                      "Ref=ref|Pack=pack_ref|Label=label|Description=description?|Trigger=trigger_ref|"
                      "Action=action_ref|Enabled=enabled|Trace Tag Template=trace_tag_template?")]


def rule_fields(args):
    """The optional fields shared by rule create and update, as the server names them."""
    body = {}
    if args.description is not None:
        body["description"] = args.description
    for flag in ("conditions", "action_params", "trigger_params"):
        value = getattr(args, flag)
        if value is not None:
            body[flag] = parse_json_arg(value, "--" + flag.replace("_", "-"))
    if args.enabled is not None:
        body["enabled"] = args.enabled
    if args.trace_tag_template is not None:
        body["trace_tag_template"] = args.trace_tag_template
    return body


@command("rule list", "list rules", "--pack: only this pack's rules",
         arg("-e --enabled BOOL: only enabled (true) or disabled", type=parse_bool), ALL,
         examples=("attune rule list --pack core",))
def cmd_rule_list(ctx, args):
    query = {"pack_ref": args.pack, "enabled": None if args.enabled is None else str(args.enabled).lower()}
    walk = ListWalk(ctx.session(), "/rules", query, every_page=args.all)
    emit_list(ctx, walk, walk, "rules",
              "Ref=ref|Pack=pack_ref|Label=label|Trigger=trigger_ref|Action=action_ref|Enabled=enabled")


@command("rule show", "show one rule", ref("rule", "rules"))
def cmd_rule_show(ctx, args):
    rule = ctx.session().fetch("GET", "/rules/" + path_segment(args.ref))

    if ctx.ui.emit_unless_table(rule):
        ctx.ui.pairs(rule_pairs(rule) + timestamps(rule), "Rule: %s" % rule.get("ref"))
        show_json_section(ctx, "Conditions", rule.get("conditions"))
        show_json_section(ctx, "Action Parameters", rule.get("action_params"))
        show_json_section(ctx, "Trigger Parameters", rule.get("trigger_params"))


@command("rule create", "create a rule linking a trigger to an action",
         "--ref: rule ref (pack.name)",
         "-n --name: rule name, or pack.name (the Rust CLI's way to give the ref)",
         "-p --pack: pack ref (default: the ref's first part); after `rule create`, -p is the pack",
         "--label: label (default: the name)",
         arg("-t --trigger: trigger ref", required=True),
         arg("-a --action: action ref", required=True), *RULE_OPTIONS)
def cmd_rule_create(ctx, args):
    """The server's body {ref, pack_ref, label, trigger_ref, action_ref, ...}, from either
    this program's flags (--ref, --pack, --label) or the Rust CLI's (-n NAME, -p PACK)."""
    if (args.ref is None) == (args.name is None):
        raise UsageError("give the rule's ref with --ref PACK.NAME or -n/--name NAME (one of them)")
    name = args.ref or args.name
    pack = args.pack or (name.split(".", 1)[0] if "." in name else None)
    if not pack:
        raise UsageError("--pack is required when the name has no pack part")
    ref = name if "." in name else "%s.%s" % (pack, name)
    body = {"ref": ref, "pack_ref": pack, "label": args.label or ref.split(".", 1)[1], "trigger_ref": args.trigger,
            "action_ref": args.action}
    body.update(rule_fields(args))
    rule = ctx.session().fetch("POST", "/rules", body)

    if ctx.ui.emit_unless_table(rule):
        ctx.ui.success("Rule '%s' created successfully" % rule.get("ref"))
        ctx.ui.info("ID: %s" % rule.get("id"))
        ctx.ui.info("Enabled: %s" % str(rule.get("enabled")).lower())


@command("rule update", "change a rule", ref("rule", "rules"), "--label: new label",
         flag("--clear-trace-tag-template: remove the trace tag template"), *RULE_OPTIONS)
def cmd_rule_update(ctx, args):
    body = rule_fields(args)
    if args.clear_trace_tag_template:
        if "trace_tag_template" in body:
            raise UsageError("--trace-tag-template and --clear-trace-tag-template contradict each other")
        body["trace_tag_template"] = None
    body = update_body([("label", args.label)], body)
    rule = ctx.session().fetch("PUT", "/rules/" + path_segment(args.ref), body)

    if ctx.ui.emit_unless_table(rule):
        ctx.ui.success("Rule '%s' updated successfully" % rule.get("ref"))
        ctx.ui.pairs(rule_pairs(rule) + labelled(rule, "Updated=updated@"))


@command("rule disable", "disable a rule", ref("rule", "rules"), enable=False)
@command("rule enable", "enable a rule", ref("rule", "rules"), enable=True)
def cmd_rule_toggle(ctx, args):
    # the server's routes; the Rust CLI's PATCH /rules/{ref} has no route
    verb = "enabled" if args.enable else "disabled"
    rule = ctx.session().fetch("POST", "/rules/%s/%s" % (path_segment(args.ref), verb[:-1]))
    if ctx.ui.emit_unless_table(rule):
        ctx.ui.success("Rule '%s' %s" % (rule.get("ref") or args.ref, verb))


@command("rule delete", "delete a rule", ref("rule", "rules"), YES)
def cmd_rule_delete(ctx, args):
    delete_resource(ctx, args, "delete rule '%s'" % args.ref, "/rules/" + path_segment(args.ref),
                    "Rule '%s' deleted successfully" % args.ref, "Rule deleted successfully",
                    "Deletion cancelled")


# === Commands: triggers and sensors ==========================================

group("trigger", "list, show, enable, disable and delete triggers")
group("sensor", "list, show, enable and disable sensors")


def list_pack_scoped(ctx, args, kind, columns, row):
    """trigger/sensor list: /packs/{p}/<kind> for one pack (the server ignores ?pack=)."""
    path = "/packs/%s/%s" % (path_segment(args.pack), kind) if args.pack else "/" + kind
    walk = ListWalk(ctx.session(), path, every_page=args.all)
    emit_list(ctx, walk, walk, kind, columns, row)


def toggle_resource(ctx, args):
    """trigger|sensor enable|disable (args.kind, args.enable): POST /<kind>s/{ref}/enable|disable."""
    kind, ref, verb = args.kind, args.ref, "enabled" if args.enable else "disabled"
    item = ctx.session().fetch("POST", "/%ss/%s/%s" % (kind, path_segment(ref), verb[:-1]), {})

    if ctx.ui.emit_unless_table(item):
        ctx.ui.success("%s '%s' %s successfully" % (kind.title(), item.get("ref") or ref, verb))
        ctx.ui.pairs(labelled(item, "Ref=ref|Enabled=enabled|Updated=updated@"))


@command("trigger list", "list triggers", "--pack: only this pack's triggers", ALL,
         examples=("attune trigger list --pack core",))
def cmd_trigger_list(ctx, args):
    list_pack_scoped(ctx, args, "triggers", ["Ref", "Pack", "Label", "Enabled", "Visibility", "Description"],
                     lambda t: [t.get("ref"), t.get("pack_ref") or "", *cells(t, "label enabled"),
                                t.get("reference_visibility") or "public", cell(t, "description~50")])


@command("trigger show", "show a trigger", ref("trigger", "triggers"))
def cmd_trigger_show(ctx, args):
    trigger = ctx.session().fetch("GET", "/triggers/" + path_segment(args.ref))
    if isinstance(trigger.get("webhook_key"), str):
        SECRETS.add(trigger["webhook_key"])  # masked in every output form

    if ctx.ui.emit_unless_table(trigger):
        allowed = trigger.get("reference_allowed_pack_refs") or []
        ctx.ui.pairs([*labelled(trigger,
                                "Ref=ref|Pack=pack_ref?|Label=label|Description=description?|Enabled=enabled"),
                      ("Webhook Enabled", bool(trigger.get("webhook_enabled"))),
                      ("Subscription Visibility", trigger.get("reference_visibility") or "public"),
                      ("Allowed Caller Packs", cell_text(allowed) or "-")]
                     + timestamps(trigger), "Trigger: %s" % trigger.get("ref"))
        if trigger.get("webhook_key"):
            ctx.ui.section("Webhook")
            ctx.ui.info("Key: *** (shown once, by trigger webhook enable or regenerate)")
        show_json_section(ctx, "Parameter Schema", trigger.get("param_schema"))
        show_json_section(ctx, "Output Schema", trigger.get("out_schema"))


@command("trigger update", "change a trigger (only the fields given)", ref("trigger", "triggers"),
         "--label: new label",
         "--description: new description",
         arg("--enabled BOOL: true or false", type=parse_bool),
         arg("--reference-visibility: which packs may use it in rules", choices=("public", "private", "restricted")),
         "--reference-allowed-pack-refs A,B: with restricted: the packs allowed")
def cmd_trigger_update(ctx, args):
    body = update_body([("label", args.label), ("enabled", args.enabled),
                        ("reference_visibility", args.reference_visibility),
                        ("description", patch_op(args.description)),
                        ("reference_allowed_pack_refs", split_list(args.reference_allowed_pack_refs) or None)])
    trigger = ctx.session().fetch("PUT", "/triggers/" + path_segment(args.ref), body)

    if ctx.ui.emit_unless_table(trigger):
        ctx.ui.success("Trigger '%s' updated successfully" % trigger.get("ref"))
        ctx.ui.pairs([*labelled(trigger,
                                "Ref=ref|Pack=pack_ref?|Label=label|Description=description?|Enabled=enabled"),
                      ("Subscription Visibility", trigger.get("reference_visibility") or "public"),
                      *labelled(trigger, "Updated=updated@")])


command("trigger enable", "enable a trigger", ref("trigger", "triggers"), kind="trigger", enable=True)(toggle_resource)
command("trigger disable", "disable a trigger", ref("trigger", "triggers"), kind="trigger", enable=False)(toggle_resource)


command("trigger webhook", "a trigger's webhook: enable, disable, regenerate its key")(needs_a_command)


@command("trigger webhook enable", "let the trigger's webhook receive events (prints its key once)",
         ref("trigger", "triggers"), verb="enable", examples=("attune trigger webhook enable core.webhook",))
@command("trigger webhook disable", "stop the trigger's webhook (its key stops working)",
         ref("trigger", "triggers"), verb="disable", examples=("attune trigger webhook disable core.webhook",))
@command("trigger webhook regenerate", "give the webhook a new key (the old one stops working; printed once)",
         ref("trigger", "triggers"), verb="regenerate", examples=("attune trigger webhook regenerate core.webhook",))
def cmd_trigger_webhook(ctx, args):
    session = ctx.session()
    old = None  # enable answers with the key a webhook already enabled has: not new, so masked
    if args.verb == "enable":
        old = session.fetch("GET", "/triggers/" + path_segment(args.ref)).get("webhook_key")
        if isinstance(old, str):
            SECRETS.add(old)
    trigger = session.fetch("POST", "/triggers/%s/webhooks/%s" % (path_segment(args.ref), args.verb), {})
    key = trigger.get("webhook_key") if args.verb != "disable" and isinstance(trigger.get("webhook_key"), str) else None
    done = {"enable": "enabled", "disable": "disabled", "regenerate": "given a new key"}[args.verb]
    if key is not None and key == old:
        key, done = None, "was enabled already; its key is unchanged (regenerate gives a new one)"

    if ctx.ui.emit_unless_table(trigger):
        ctx.ui.success("Webhook of trigger %s %s" % (quoted(str(trigger.get("ref") or args.ref)), done))
        if key:
            ctx.ui.warn("Copy the key now: attune.py shows it only here (trigger show masks it)")
            ctx.ui.pairs([("Key", key), ("URL", "%s/api/v1/webhooks/%s" % (session.api_url, key))])


@command("trigger delete", "delete a trigger", ref("trigger", "triggers"), YES)
def cmd_trigger_delete(ctx, args):
    delete_resource(ctx, args, "delete trigger '%s'" % args.ref, "/triggers/" + path_segment(args.ref),
                    "Trigger '%s' deleted successfully" % args.ref, "Trigger deleted successfully")


def sensor_trigger(sensor):
    return sensor.get("trigger_ref") or cell_text(sensor.get("trigger_types"))


@command("sensor list", "list sensors", "--pack: only this pack's sensors", ALL,
         examples=("attune sensor list",))
def cmd_sensor_list(ctx, args):
    list_pack_scoped(ctx, args, "sensors", ["Ref", "Pack", "Label", "Trigger", "Enabled", "Description"],
                     lambda s: [s.get("ref"), s.get("pack_ref") or "", s.get("label"), sensor_trigger(s),
                                *cells(s, "enabled description~50")])


@command("sensor show", "show a sensor", ref("sensor", "sensors"))
def cmd_sensor_show(ctx, args):
    sensor = ctx.session().fetch("GET", "/sensors/" + path_segment(args.ref))
    if ctx.ui.emit_unless_table(sensor):
        ctx.ui.pairs(
            [*labelled(sensor, "Ref=ref|Pack=pack_ref?|Label=label|Description=description?"),
             ("Trigger", or_dash(sensor_trigger(sensor))),
             ("Entry Point", sensor.get("entrypoint") or sensor.get("entry_point") or "N/A"),
             *labelled(sensor, "Runtime=runtime_ref?|Enabled=enabled")]
            + timestamps(sensor), "Sensor: %s" % sensor.get("ref"))


command("sensor enable", "enable a sensor", ref("sensor", "sensors"), kind="sensor", enable=True)(toggle_resource)
command("sensor disable", "disable a sensor", ref("sensor", "sensors"), kind="sensor", enable=False)(toggle_resource)


SENSOR_LOG_POLL = 2        # seconds between looks at a followed sensor log
SENSOR_LOG_WINDOW = 100    # lines a follow compares between looks, unless --tail says
SENSOR_LOG_FAILURES = 5    # looks in a row that may fail before a follow gives up


def new_lines(seen, lines):
    """The lines of a log's latest tail that follow what the last look saw: after the longest
    end of seen that the tail starts with. No overlap: every line is new (some may be lost)."""
    for start in range(len(seen)):
        if seen[start] == lines[0] and seen[start:] == lines[:len(seen) - start]:
            return lines[len(seen) - start:]
    return None


def copy_text(resp, write):
    """The body of an open answer, as text, to write() chunk by chunk."""
    import codecs
    decode = codecs.getincrementaldecoder("utf-8")("replace").decode
    try:
        for chunk in iter(lambda: resp.stream.read(1 << 16), b""):
            write(decode(chunk))
        write(decode(b"", True))
    finally:
        resp.stream.close()


@command("sensor logs", "print a sensor's log, or its last lines; --follow keeps printing new ones",
         ref("sensor", "sensors"), arg("--stream: stdout (the default) or stderr", choices=("stdout", "stderr"),
                                       default="stdout"),
         arg("--tail N: only the last N lines", type=Number(1, 10000)),
         flag("-f --follow: look again every %d s and print what is new, until interrupted" % SENSOR_LOG_POLL),
         examples=("attune sensor logs core.timer_sensor --tail 50",
                   "attune sensor logs core.timer_sensor --stream stderr --follow"))
def cmd_sensor_logs(ctx, args):
    session = ctx.session()
    path = "/sensors/%s/logs/%s" % (path_segment(args.ref), args.stream)

    def write(text):
        write_text(ctx.ui.stdout, text, raw=True)  # the sensor's own output, as it wrote it
        ctx.ui.stdout.flush()

    if not args.follow:
        resp = session.request("GET", path, query={"tail": args.tail}, stream="*/*")
        resp.check()
        return copy_text(resp, write)
    window, seen, failures = args.tail or SENSOR_LOG_WINDOW, None, 0
    while True:  # the server has no offset to resume from: the tail is read again, and compared
        try:
            resp = session.request("GET", path, query={"tail": window})
            resp.check()
            failures = 0
        except (NetworkError, ServerError) as e:
            failures += 1
            if failures > SENSOR_LOG_FAILURES:
                raise
            ctx.ui.log("sensor log not read (%s); trying again" % e)
        else:
            lines = resp.body.decode("utf-8", "replace").splitlines(True)
            fresh = lines if seen is None or not lines else new_lines(seen, lines)
            if fresh is None:
                ctx.ui.note("more than %d lines came between two looks: some may be missing above" % window)
                fresh = lines
            write("".join(fresh))
            seen = lines or seen
        time.sleep(SENSOR_LOG_POLL)


# === Commands: events and enforcements =======================================
# Why a rule did or did not fire: the events a trigger's sensor emitted, the enforcements a
# rule made of them, and the executions those started. Each show names the next step's ids.

group("event", "what triggers emitted: list and show, with the enforcements they caused")
group("enforcement", "what rules made of events: list and show, with the executions they started")

EVENT_ID = arg("id ID: event id (a whole number)", type=ID_NUMBER, complete="events")
ENFORCEMENT_ID = arg("id ID: enforcement id (a whole number)", type=ID_NUMBER, complete="enforcements")
ENFORCEMENT_TABLE = ("ID=id|Rule=rule_ref|Trigger=trigger_ref|Event=event?|Status=status|Condition=condition|"
                     "Created=created@")


def page_query(args, **filters):
    return dict(filters, page=args.page, per_page=args.per_page)


@command("event list", "list events, newest first", arg("--trigger REF: only this trigger's events",
                                                        complete="triggers"),
         arg("--rule REF: only events of this rule", complete="rules"),
         arg("--source ID: only this sensor's", type=ID_NUMBER),
         PAGE, PER_PAGE, ALL, examples=("attune event list --trigger core.webhook",))
def cmd_event_list(ctx, args):
    walk = ListWalk(ctx.session(), "/events", page_query(args, trigger_ref=args.trigger, rule_ref=args.rule,
                                                         source=args.source), "per_page", every_page=args.all)
    emit_list(ctx, walk, walk, "events", ["ID", "Trigger", "Source", "Rule", "Payload", "Created"],
              lambda e: [*cells(e, "id trigger_ref source_ref? rule_ref?"), bool(e.get("has_payload")),
                         cell(e, "created@")])


@command("event show", "show an event, its payload and the enforcements it caused", EVENT_ID,
         examples=("attune event show 512  # then: attune enforcement show ID",))
def cmd_event_show(ctx, args):
    session = ctx.session()
    event = session.fetch("GET", "/events/%d" % args.id)
    caused, more = fetch_list(session, "/enforcements", {"event": args.id, "per_page": 100}, "per_page")
    if ctx.ui.emit_unless_table(dict(event, enforcements=caused)):
        ctx.ui.pairs(labelled(event, "ID=id|Trigger=trigger_ref|Source=source_ref?|Rule=rule_ref?|Created=created@"),
                     "Event: %s" % event.get("id"))
        show_json_section(ctx, "Payload", event.get("payload"))
        ctx.ui.section("Enforcements")
        ctx.ui.table(*table_of(ENFORCEMENT_TABLE, caused), empty="No enforcements: no rule matched this event")
    note_partial(ctx, more, len(caused), "enforcements")


@command("enforcement list", "list enforcements, newest first",
         arg("--event ID: only those of this event", type=ID_NUMBER, complete="events"),
         arg("--rule REF: only this rule's", complete="rules"),
         arg("--trigger REF: only this trigger's", complete="triggers"),
         arg("--status: created, processed or disabled", choices=("created", "processed", "disabled")),
         PAGE, PER_PAGE, ALL, examples=("attune enforcement list --rule monitoring.on_disk_full",))
def cmd_enforcement_list(ctx, args):
    walk = ListWalk(ctx.session(), "/enforcements", page_query(args, event=args.event, rule_ref=args.rule,
                                                               trigger_ref=args.trigger, status=args.status),
                    "per_page", every_page=args.all)
    emit_list(ctx, walk, walk, "enforcements", ENFORCEMENT_TABLE)


@command("enforcement show", "show an enforcement and the executions it started", ENFORCEMENT_ID,
         examples=("attune enforcement show 77  # then: attune execution show ID",))
def cmd_enforcement_show(ctx, args):
    session = ctx.session()
    enforcement = session.fetch("GET", "/enforcements/%d" % args.id)
    started, more = fetch_list(session, "/executions", {"enforcement": args.id, "per_page": 100}, "per_page")
    if ctx.ui.emit_unless_table(dict(enforcement, executions=started)):
        ctx.ui.pairs(labelled(enforcement, "ID=id|Rule=rule_ref|Trigger=trigger_ref|Event=event?|Status=status|"
                                           "Condition=condition|Created=created@|Resolved=resolved_at@?"),
                     "Enforcement: %s" % enforcement.get("id"))
        show_json_section(ctx, "Conditions", enforcement.get("conditions"))
        ctx.ui.section("Executions")
        ctx.ui.table(*table_of("ID=id|Action=action_ref|Status=status|Created=created@", started),
                     empty="No executions")
    note_partial(ctx, more, len(started), "executions")


# === Commands: keys ==========================================================

group("key", "list, show, create, update and delete keys (secrets)")

KEY_VALUE_ARGS = (
    arg("--value: the value; parsed as JSON when it parses (visible in the process list)"),
    flag("--value-stdin: read the value from stdin"))


KEY_OWNER_TYPES = ("system", "identity", "pack", "action", "sensor")


def key_owner(key):
    """'pack: core', 'identity: 7', or just 'system' when there is no owner."""
    kind = str(key.get("owner_type") or "")
    owner = {"pack": key.get("owner_pack_ref"), "action": key.get("owner_action_ref"),
             "sensor": key.get("owner_sensor_ref")}.get(kind.lower()) or key.get("owner")
    return "%s: %s" % (kind, owner) if owner not in (None, "", "-") else kind


def canonical_hash(value):
    import hashlib
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def key_value(ctx, args):
    """The value of --value or --value-stdin, parsed as JSON when it parses; None if neither."""
    if args.value is not None and args.value_stdin:
        raise UsageError("give the value either with --value or on stdin (--value-stdin), not both")
    if args.value_stdin:
        text = read_input(ctx.ui.stdin)
        text = text[:-1] if text.endswith("\n") else text
    elif args.value is not None:
        text = as_given(args.value)
        if getattr(args, "encrypt", False) or getattr(args, "encrypted", False):
            ctx.ui.warn("--value exposes the secret in the process list; prefer --value-stdin")
    else:
        return None
    if not text:  # `cat missing | attune key update K --value-stdin` must not store ""
        raise UsageError("the value is empty (%s); nothing was sent" % (
            "nothing on standard input" if args.value_stdin else "--value ''"))
    return json_or_string(text)


def key_pairs(key, last=("Created", "created")):
    return [*labelled(key, "Reference=ref|Name=name"), ("Owner", key_owner(key)),
            ("Encrypted", key.get("encrypted")), (last[0], format_timestamp(key.get(last[1])))]


@command("key list", "list keys (never their values)", arg("--owner-type: only keys of this owner type",
                                                           choices=KEY_OWNER_TYPES),
         "--owner: owner identifier",
         PAGE, PER_PAGE, ALL,
         examples=("attune key list",
                   "attune key list --owner-type pack --owner core"))
def cmd_key_list(ctx, args):
    query = {"page": args.page, "per_page": args.per_page, "owner_type": args.owner_type, "owner": args.owner}
    walk = ListWalk(ctx.session(), "/keys", query, "per_page", args.all)
    emit_list(ctx, walk, walk, "keys", ["Ref", "Name", "Owner", "Encrypted", "Created"],
              lambda k: [*cells(k, "ref name"), key_owner(k), *cells(k, "encrypted created@")])


@command("key show", "show one key; its value only with --decrypt", ref("key"),
         flag("-d --decrypt: ask the server to decrypt and show the value"),
         examples=("attune key show db_password -d  # decrypted, on a terminal",))
def cmd_key_show(ctx, args):
    key = ctx.session().fetch("GET", "/keys/" + path_segment(args.ref),
                              query={"decrypt": "true"} if args.decrypt else None)
    value = key.get("value")
    shown = dict(key)
    if not args.decrypt:  # never show a value the user did not ask to reveal
        shown["value"] = "[REDACTED]" if value is None else canonical_hash(value)

    if ctx.ui.emit_unless_table(shown):
        pairs = [*labelled(key, "Reference=ref|Name=name"), ("Owner", key_owner(key))]
        for label, field in (("Owner Pack", "owner_pack_ref"), ("Owner Action", "owner_action_ref"),
                             ("Owner Sensor", "owner_sensor_ref")):
            if key.get(field):
                pairs.append((label, key[field]))
        pairs.append(("Encrypted", key.get("encrypted")))
        if args.decrypt:
            pairs.append(("Value", value if isinstance(value, str) else to_json(value)))
        elif value is None:
            pairs.append(("Value", "[REDACTED]"))
        else:
            pairs.append(("Value (SHA-256 of canonical JSON)", shown["value"]))
        if not args.decrypt:
            pairs.append(("", "(use --decrypt / -d to reveal the actual value)"))
        pairs += timestamps(key)
        ctx.ui.pairs(pairs, "Key: %s" % key.get("ref"))


@command("key create", "create a key: --ref REF, or --local-ref NAME and its owner (newer servers)",
         "--ref: unique key ref",
         "--local-ref NAME: the key's own name; the server builds the ref from the owner",
         arg("--name: human-readable name", required=True), *KEY_VALUE_ARGS,
         flag("-e --encrypt: store the value encrypted"),
         arg("--owner-type: system (default), identity, pack, action or sensor", default="system"),
         "--owner: owner identifier (with --ref)",
         "--owner-identity-login LOGIN: owner identity's login (--owner-type identity)",
         "--owner-pack-ref PACK: owner pack's ref (--owner-type pack)",
         "--owner-action-ref ACTION: owner action's ref (--owner-type action)",
         "--owner-sensor-ref SENSOR: owner sensor's ref (--owner-type sensor)",
         examples=("attune key create --ref db_password --name 'DB password' --value-stdin -e < secret.txt",))
def cmd_key_create(ctx, args):
    if args.owner_type not in KEY_OWNER_TYPES:
        raise UsageError("Invalid owner type '%s'. Must be one of: %s" % (args.owner_type, ", ".join(KEY_OWNER_TYPES)))
    if (args.ref is None) == (args.local_ref is None):
        raise UsageError("give the key's --ref, or its --local-ref and owner (one of them)")
    owner_refs = [("owner_identity_login", args.owner_identity_login), ("owner_pack_ref", args.owner_pack_ref),
                  ("owner_action_ref", args.owner_action_ref), ("owner_sensor_ref", args.owner_sensor_ref)]
    value = key_value(ctx, args)
    if value is None:
        raise UsageError("a value is needed: --value V or --value-stdin")
    if args.ref is not None:
        if any(v is not None for _, v in owner_refs):
            raise UsageError("--owner-identity-login, --owner-pack-ref, ... go with --local-ref; with --ref use --owner")
        body = {"ref": args.ref, "owner_type": args.owner_type}
        if args.owner is not None:
            body["owner"] = args.owner
    else:
        if args.owner is not None or not args.local_ref or "." in args.local_ref or len(args.local_ref) > 63:
            raise UsageError("--local-ref is 1 to 63 characters without dots, and its owner is given with "
                             "--owner-identity-login, --owner-pack-ref, --owner-action-ref or --owner-sensor-ref")
        wanted = {"identity": "owner_identity_login", "pack": "owner_pack_ref", "action": "owner_action_ref",
                  "sensor": "owner_sensor_ref"}.get(args.owner_type)
        given = [k for k, v in owner_refs if v is not None]
        if given != ([wanted] if wanted else []):
            raise UsageError("--owner-type %s needs %s" % (args.owner_type, "--" + wanted.replace("_", "-")
                                                            if wanted else "no owner ref"))
        body = {"local_ref": args.local_ref, "owner_type": args.owner_type}
        body.update((k, v) for k, v in owner_refs if v is not None)
    body.update(name=args.name, value=value, encrypted=args.encrypt)
    key = ctx.session().fetch("POST", "/keys", body)
    key.pop("value", None)  # not echoed back, even in JSON

    if ctx.ui.emit_unless_table(key):
        ctx.ui.success("Key '%s' created successfully" % key.get("ref"))
        ctx.ui.pairs(key_pairs(key))


@command("key update", "change a key's name, value or encryption", ref("key"), "--name: new name",
         *KEY_VALUE_ARGS, arg("--encrypted BOOL: true or false", type=parse_bool),
         examples=("attune key update db_password --value-stdin < new-secret.txt",))
def cmd_key_update(ctx, args):
    body = update_body([("name", args.name), ("value", key_value(ctx, args)), ("encrypted", args.encrypted)],
                       hint=" (--name, --value, or --encrypted)")
    key = ctx.session().fetch("PUT", "/keys/" + path_segment(args.ref), body)
    key.pop("value", None)

    if ctx.ui.emit_unless_table(key):
        ctx.ui.success("Key '%s' updated successfully" % key.get("ref"))
        ctx.ui.pairs(key_pairs(key, ("Updated", "updated")))


@command("key delete", "delete a key", ref("key"), YES,
         examples=("attune key delete db_password --yes",))
def cmd_key_delete(ctx, args):
    message = "Key '%s' deleted successfully" % args.ref
    delete_resource(ctx, args, "delete key '%s'" % args.ref, "/keys/" + path_segment(args.ref),
                    message, message, "Deletion cancelled")


# === Commands: workflows =====================================================

group("workflow", "upload, list, show and delete workflows")

WORKFLOW_OPTIONAL_FIELDS = ("description", "enabled", "tags", "reference_visibility",
                            "reference_allowed_pack_refs")  # sent when the action YAML has them


def split_action_ref(ref):
    """pack and name of an action ref 'pack.name' (a pack ref holds no dot)."""
    pack, _, name = ref.rpartition(".") if isinstance(ref, str) else ("", "", "")
    if not pack or not name or "." in pack:
        raise UsageError("Invalid action ref %s: expected format 'pack_ref.name'" % quoted(str(ref)))
    return pack, name


def workflow_file_path(action_file, workflow_file):
    """The workflow YAML that workflow_file names: relative to the actions/ directory the
    action YAML sits in, and inside its workflows/ directory, also after symlinks."""
    actions = os.path.dirname(os.path.realpath(action_file))
    if os.path.basename(actions) != "actions":
        raise UsageError("Action YAML must live directly inside a pack actions/ directory")
    parts = workflow_file.replace("\\", "/").split("/") if isinstance(workflow_file, str) else []
    if not parts or parts[0] != "workflows" or os.path.isabs(workflow_file) or ".." in parts or len(parts) < 2:
        raise UsageError("Workflow file must be relative to actions/ and located under actions/workflows/: %s"
                         % quoted(str(workflow_file)))
    path = os.path.join(actions, *parts)
    workflows = os.path.realpath(os.path.join(actions, "workflows"))
    if os.path.exists(path) and not (workflows == os.path.join(actions, "workflows")
                                     and os.path.realpath(path).startswith(workflows + os.sep)):
        raise UsageError("Workflow file resolves outside the actions/workflows directory")
    if not os.path.isfile(path):
        raise UsageError("Workflow file not found: %s (resolved from workflow_file %s relative to %s)"
                         % (quoted(path), quoted(workflow_file), quoted(actions)))
    return path


@command("workflow upload", "upload a workflow action (its action YAML and workflow YAML) to its pack",
         "action_file ACTION_YAML: the action YAML, directly in a pack's actions/ directory; its workflow_file field "
         "names the "
         "workflow YAML, relative to actions/ and under actions/workflows/ (workflow_file: "
         "workflows/deploy.yaml); the action's parameters and output go into the workflow",
         flag("-f --force: update the workflow if it exists"))
def cmd_workflow_upload(ctx, args):
    if not os.path.exists(args.action_file):
        raise UsageError("Action YAML file not found: %s" % quoted(args.action_file))
    if not os.path.isfile(args.action_file):
        raise UsageError("Path is not a file: %s" % quoted(args.action_file))
    action = read_document(ctx, args.action_file, "action YAML")
    if not isinstance(action, dict):
        raise UsageError("Invalid action YAML: %s is not a mapping" % quoted(args.action_file))
    pack, name = split_action_ref(action.get("ref"))
    if action.get("workflow_file") is None:
        raise UsageError("Action YAML does not contain a 'workflow_file' field. This command uploads workflow "
                         "actions; regular actions are uploaded as part of a pack.")
    path = workflow_file_path(args.action_file, action["workflow_file"])
    definition = read_document(ctx, path, "workflow YAML")
    definition = dict(definition) if isinstance(definition, dict) else {}
    for key, field in (("parameters", "parameters"), ("output", "output")):
        if action.get(field) is not None:
            definition.setdefault(key, action[field])
    version = definition.get("version")
    body = {"name": name, "label": action.get("label") or name, "version": version if isinstance(version, str)
            else "1.0.0", "pack_ref": pack, "definition": definition}
    body.update((field, action[field]) for field in WORKFLOW_OPTIONAL_FIELDS if action.get(field) is not None)
    for field, key in (("param_schema", "parameters"), ("out_schema", "output")):
        if action.get(key) is not None:
            body[field] = action[key]
    ref = "%s.%s" % (pack, name)
    ctx.ui.info("Uploading workflow action '%s' to pack '%s'" % (ref, pack))
    ctx.ui.info("  Action YAML:   %s" % args.action_file)
    ctx.ui.info("  Workflow YAML: %s" % path)
    session = ctx.session()
    resp = session.request("POST", "/packs/%s/workflow-files" % path_segment(pack), body)
    if resp.status == 409:
        if not args.force:
            raise AttuneError("Workflow %s already exists. Use --force to update it." % quoted(ref))
        ctx.ui.info("Workflow already exists, updating...")
        resp = session.request("PUT", "/workflows/%s/file" % path_segment(ref), body)
    resp.check()
    workflow = unwrap(resp)

    if ctx.ui.emit_unless_table(workflow):
        ctx.ui.out()
        ctx.ui.success("Workflow '%s' uploaded successfully" % workflow.get("ref"))
        ctx.ui.pairs([*labelled(workflow, "Reference=ref|Pack=pack_ref|Label=label|Version=version"),
                      ("Tags", cell_text(workflow.get("tags")) or "none")])


@command("workflow list", "list workflows", "--pack: only this pack's workflows",
         "--tags A,B: only workflows with these tags",
         "--search: text in the label or description", ALL,
         examples=("attune workflow list --pack core",))
def cmd_workflow_list(ctx, args):
    query = {"pack_ref": args.pack, "tags": args.tags, "search": args.search}
    workflows, pagination = fetch_list(ctx.session(), "/workflows", query, every_page=args.all)

    if ctx.ui.emit_unless_table(workflows):
        ctx.ui.table(["Reference", "Pack", "Label", "Version", "Tags"],
                     [[*cells(w, "ref pack_ref label~30 version"),
                       clip(cell_text(w.get("tags")), 25) or "-"] for w in workflows],
                     empty="No workflows found")
        if workflows:
            ctx.ui.info("%d workflow(s) found" % len(workflows))
    note_partial(ctx, pagination, len(workflows), "workflows")


def task_transitions(task):
    targets = sum(len(t.get("do") or ()) for t in task.get("next") or () if isinstance(t, dict))
    return "%d target(s)" % targets if targets else "terminal"


@command("workflow show", "show a workflow and its tasks", ref("workflow", "workflows"))
def cmd_workflow_show(ctx, args):
    workflow = ctx.session().fetch("GET", "/workflows/" + path_segment(args.ref))

    if ctx.ui.emit_unless_table(workflow):
        ctx.ui.pairs([*labelled(workflow, "Reference=ref|Pack=pack_ref|Label=label"),
                      ("Description", workflow.get("description") or "-"),
                      ("Version", workflow.get("version")), ("Tags", cell_text(workflow.get("tags")) or "none")]
                     + timestamps(workflow), "Workflow: %s" % workflow.get("ref"))
        for title, field in (("Parameters", "param_schema"), ("Output Schema", "out_schema")):
            if isinstance(workflow.get(field), dict) and workflow[field]:
                ctx.ui.section(title)
                ctx.ui.out(to_yaml(workflow[field]))
        definition = workflow.get("definition")
        tasks = definition.get("tasks") if isinstance(definition, dict) else None
        if isinstance(tasks, list):
            ctx.ui.section("Tasks")
            ctx.ui.table(["#", "Name", "Action", "Transitions"],
                         [[i, t.get("name") or "?", clip(str(t.get("action") or "-"), 35), task_transitions(t)]
                          for i, t in enumerate((t for t in tasks if isinstance(t, dict)), start=1)])


@command("workflow delete", "delete a workflow", ref("workflow", "workflows"), YES)
def cmd_workflow_delete(ctx, args):
    delete_resource(ctx, args, "delete workflow '%s'" % args.ref, "/workflows/" + path_segment(args.ref),
                    "Workflow '%s' deleted successfully" % args.ref, "Workflow '%s' deleted" % args.ref)


# === Commands: workers =======================================================
# The processes that run actions and sensors: their health as the server works it out
# (heartbeat age, status, cordon), their load, and cordon/uncordon to drain one.

group("worker", "workers: list, show, cordon and uncordon, history")

WORKER_ID = arg("id ID: worker id (a whole number)", type=ID_NUMBER, complete="workers")
WORKER_HEALTH = ("active", "busy", "cordoned", "offline", "error", "inactive")


def heartbeat_text(worker):
    age = worker.get("heartbeat_age_seconds")
    if not isinstance(age, int):
        return "never"
    return "%s ago%s" % (format_duration(age), " (stale)" if worker.get("heartbeat_stale") else "")


def load_text(worker):
    load = worker.get("load") if isinstance(worker.get("load"), dict) else {}
    active, most = load.get("total_active"), load.get("max_concurrent_executions")
    text = "%s/%s" % (or_dash(active), most) if most else str(or_dash(active))
    return text + (" (%s%%)" % load["utilization_percent"] if isinstance(load.get("utilization_percent"), int) else "")


def show_worker(ctx, worker, message=None):
    if ctx.ui.emit_unless_table(worker):
        if message:
            ctx.ui.success(message)
        runtimes = [r for r in worker.get("supported_runtimes") or [] if isinstance(r, dict)]
        ctx.ui.pairs([*labelled(worker,
                                "ID=id|Name=name|Type=worker_type|Role=worker_role|Host=host?|Port=port?|"
                                "Status=status?|Health=health_state"), ("Heartbeat", heartbeat_text(worker)),
                      ("Load", load_text(worker)), ("Cordoned", bool(worker.get("cordoned"))),
                      *labelled(worker, "Cordon Reason=cordon_reason?"),
                      ("Runtimes", ", ".join("%s %s" % (r.get("name"), " ".join(map(str, r.get("versions") or [])))
                                             for r in runtimes).strip() or "-")]
                     + timestamps(worker), "Worker: %s" % worker.get("name"))


@command("worker list", "list workers with their health, heartbeat and load",
         "-q --query WORDS: words to match in name, host, status, type and role",
         "--role: only workers of this role (action, sensor, ...)",
         "--status: only workers with this status (active, busy, inactive, error)",
         arg("--health: only workers in this health state", choices=WORKER_HEALTH),
         arg("--cordoned BOOL: only cordoned (true) or not (false)", type=parse_bool),
         PAGE, PER_PAGE, ALL, examples=("attune worker list --health offline",))
def cmd_worker_list(ctx, args):
    query = {"q": args.query, "role": args.role, "status": args.status, "health_state": args.health,
             "cordoned": None if args.cordoned is None else str(args.cordoned).lower(),
             "page": args.page, "page_size": args.per_page}
    walk = ListWalk(ctx.session(), "/workers", query, every_page=args.all)
    emit_list(ctx, walk, walk, "workers", ["ID", "Name", "Role", "Health", "Heartbeat", "Load", "Cordoned"],
              lambda w: [*cells(w, "id name worker_role health_state"), heartbeat_text(w),
                         load_text(w), bool(w.get("cordoned"))])


@command("worker show", "show a worker: health, heartbeat, load, runtimes", WORKER_ID,
         examples=("attune worker show 3",))
def cmd_worker_show(ctx, args):
    show_worker(ctx, ctx.session().send("GET", "/workers/%d" % args.id))  # unwrapped, as the server answers


@command("worker cordon", "stop giving a worker new work (it finishes what it runs)", WORKER_ID,
         "--reason: why, shown with the worker", YES,
         examples=("attune worker cordon 3 --reason 'kernel update' --yes",))
def cmd_worker_cordon(ctx, args):
    if not confirm(ctx, args, "cordon worker %d" % args.id, "Cordon cancelled"):
        return
    body = {"reason": args.reason} if args.reason else {}  # the server wants a JSON body, even an empty one
    show_worker(ctx, ctx.session().send("POST", "/workers/%d/cordon" % args.id, body),
                "Worker %d cordoned" % args.id)


@command("worker uncordon", "give a cordoned worker work again", WORKER_ID,
         examples=("attune worker uncordon 3",))
def cmd_worker_uncordon(ctx, args):
    show_worker(ctx, ctx.session().send("POST", "/workers/%d/uncordon" % args.id, {}), "Worker %d uncordoned" % args.id)


@command("worker history", "what changed in a worker, and when (newest first)", WORKER_ID, *HISTORY_ARGS,
         examples=("attune worker history 3 --field status",))
def cmd_worker_history(ctx, args):
    emit_history(ctx, "/workers/%d/history" % args.id, args)


# === Commands: api and health ================================================

def api_body(ctx, args):
    """The raw bytes of --data (JSON text, @FILE or - for stdin), or None."""
    if args.data is None:
        return None
    if args.data == "-":
        text = read_input(ctx.ui.stdin)
    elif args.data.startswith("@"):
        try:
            text = read_regular_file(args.data[1:], DATA_FILE_LIMIT)[0].decode("utf-8")
        except (OSError, UnicodeError) as e:
            raise UsageError("cannot read %s: %s" % (args.data[1:], getattr(e, "strerror", None) or "not UTF-8"))
    else:
        text = as_given(args.data)
    return text.encode("utf-8")


@command("api", "call any API endpoint with the same auth, refresh and retry",
         "method METHOD: GET, POST, PUT, PATCH, DELETE, ...",
         "path PATH: /packs (gets /api/v1 in front), /auth/..., /health",
         arg("-F --field KEY=VALUE: query parameter (GET, DELETE) or body field, parsed as JSON when it parses",
             action="append"),
         "--data JSON|@FILE|-: request body: JSON text, @file, or - for stdin",
         flag("--paginate: GET every page and print all items"),
         examples=("attune api GET /packs --paginate -j",
                   "attune api POST /keys --data @key.json"))
def cmd_api(ctx, args):
    problem = odd_character(args.path)
    if problem:
        raise UsageError("PATH holds %s; percent-encode it (%%20, %%c3%%a9)" % problem)
    method = args.method.upper()
    in_query = method in ("GET", "HEAD", "DELETE")  # query values stay the text typed
    fields = parse_param_pairs(args.field, str if in_query else json_or_string)
    raw = api_body(ctx, args)
    query = None
    if fields and in_query:
        query = fields
    elif fields:
        merged = parse_json_arg(raw.decode("utf-8"), "--data") if raw is not None else {}
        if not isinstance(merged, dict):
            raise UsageError("--field needs --data to be a JSON object")
        merged.update(fields)
        raw = json.dumps(merged).encode("utf-8")
    session = ctx.session()
    if args.paginate:
        if method != "GET":
            raise UsageError("--paginate works with GET")
        items, _ = fetch_list(session, args.path, query, page_size_param(args.path), every_page=True,
                              objects=False)
        if ctx.ui.emit_unless_table(items):
            ctx.ui.write_document(to_json, items)
        return
    resp = session.request(method, args.path, query=query, raw_body=raw)
    try:
        body = resp.json()
    except ApiError:
        body = resp.body.decode("utf-8", "replace")
    if not resp.ok:
        write_text(ctx.ui.stderr, (body if isinstance(body, str) else to_json(body)).rstrip("\n") + "\n")
        raise type(api_error(resp))("HTTP %d %s" % (resp.status, resp.reason))
    if isinstance(body, str):  # exact into a pipe, escaped on a terminal
        write_text(ctx.ui.stdout, body, raw=not ctx.ui.stdout.isatty())
    elif body is not None:
        if ctx.ui.emit_unless_table(body):
            ctx.ui.write_document(to_json, body)


@command("health", "check that the server answers GET /health",
         arg("--wait SECONDS: keep trying until the server is healthy or this long has passed (exit 5); "
             "the same as --wait-for-server", type=Seconds(0, integer=False)),
         examples=("attune health --wait-for-server 2m  # until the server answers",))
def cmd_health(ctx, args):
    session = ctx.session(use_env=False)  # no token needed: don't read a token file that may not exist
    if args.wait is not None:  # the wait is the command: no request outlasts it either
        ctx.deadline.until(time.monotonic() + args.wait)
        ctx.http.wait_for(args.wait)
        resp = wait_for_health(ctx.http, session)
    else:
        resp = session.request("GET", "/health", auth=False)
        resp.check()
    try:
        health = resp.json()
    except ApiError:
        health = None
    health = health if isinstance(health, dict) else {"status": "ok"}
    if ctx.ui.emit_unless_table(health):
        ctx.ui.success("Server at %s is healthy (status: %s)"
                       % (session.api_url, health.get("status")))


INFO_TIMEOUT = 10  # seconds: info is a quick look, not a wait


@command("info", "this program's version and the server's build",
         flag("--local: only this program; no request"),
         examples=("attune info",))
def cmd_info(ctx, args):
    local = {"binary": "attune.py", "version": __version__, "git_sha": "unknown"}
    local_pairs = [("Local binary", local["binary"]), ("Local version", local["version"]),
                   ("Local Git SHA", local["git_sha"])]
    if args.local:
        return ctx.ui.emit(local, lambda: ctx.ui.pairs(local_pairs))
    session = ctx.session(use_env=False)
    scheme, _, rest = session.api_url.partition("://")  # checked: no user:password@ in it
    server = {"status": "connected", "profile": session.profile,
              "api_url": "%s://%s" % (scheme.lower(), rest.split("/", 1)[0])}
    failure = None
    try:
        resp = session.request("GET", "/info", auth=False, timeout=INFO_TIMEOUT)
        data = envelope_data(resp.check().json())
        if not isinstance(data, dict):
            raise ApiError("the server's /info answer is not understood")
        server.update(version=data.get("version"), git_sha=data.get("git_sha"))
    except AttuneError as e:
        failure = e
        server = {"status": "unavailable", "profile": session.profile, "api_url": server["api_url"],
                  "error": str(e)}

    if ctx.ui.emit_unless_table({"local": local, "server": server}):
        ctx.ui.pairs(local_pairs)
        ctx.ui.out()
        rows = [("Server profile", server["profile"]), ("Server API", server["api_url"])]
        if failure is None:
            rows += [("Server version", server["version"]), ("Server Git SHA", server["git_sha"])]
        else:
            rows.append(("Server error", server["error"]))
        ctx.ui.pairs(rows)
    if failure is not None:
        error = AttuneError("Could not fetch server build information")
        error.exit_code = failure.exit_code  # 5 when unreachable, 1 or 6 for the server's errors
        raise error


# === Commands: self-install ==================================================
# The installed form: the module where Python caches bytecode (compiled now, for this
# interpreter, so it starts fast even under PYTHONDONTWRITEBYTECODE=1), behind a
# launcher that runs this interpreter isolated and without site (-I -S): nothing from
# PYTHONPATH, user site-packages or sitecustomize runs inside a credential tool.

LAUNCHER_MARK = "# attune launcher, written by attune.py self-install"


def install_paths(args):
    """(launcher, module directory) where the files are written (under --destdir), and the
    module directory the launcher names (under --prefix)."""
    if not os.path.isabs(args.prefix):
        raise UsageError("--prefix must be an absolute path, not %r" % args.prefix)
    root = os.path.abspath(args.destdir) + args.prefix if args.destdir else args.prefix
    return os.path.join(root, "bin", "attune"), os.path.join(root, "lib", "attune"), \
        os.path.join(args.prefix, "lib", "attune")


def launcher_text(python, libdir):
    return "\n".join(["#!%s -IS" % python, LAUNCHER_MARK, "import sys",
                      "sys.path.insert(0, %r)" % libdir, "from attune import main, exit_process",
                      "exit_process(main())", ""])


INSTALL_ARGS = (arg("--prefix DIR: install under DIR: DIR/bin/attune and DIR/lib/attune/ (default /usr/local)",
                    default="/usr/local"),
                arg("--destdir DIR: stage the files under DIR (for packaging), as make DESTDIR"))


@command("self-install", "install this file as the command attune: compiled, isolated, fast to start",
         *INSTALL_ARGS,
         examples=("sudo python3 attune.py self-install",
                   "python3 attune.py self-install --prefix ~/.local"))
def cmd_self_install(ctx, args):
    import py_compile
    if WINDOWS:
        raise UsageError("self-install writes a POSIX launcher; on Windows run: py attune.py")
    launcher, libdir, runtime_libdir = install_paths(args)
    python = os.path.abspath(sys.executable)
    module = os.path.join(libdir, "attune.py")

    def put(path, data, mode):
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        write_atomic(path, data)
        os.chmod(path, mode)

    try:
        first, rest = split_program(program_source())
        put(module, first.encode("utf-8"), 0o644)
        put(os.path.join(libdir, REST_FILE), rest.encode("utf-8"), 0o644)
        put(os.path.join(libdir, COMPLETION_FILE), completion_table_text(completion_table()).encode("utf-8"), 0o644)
        for path in (module, os.path.join(libdir, REST_FILE)):
            py_compile.compile(path, doraise=True)  # into __pycache__, for this interpreter
        put(launcher, launcher_text(python, runtime_libdir).encode("utf-8"), 0o755)
    except (OSError, py_compile.PyCompileError) as e:
        raise ConfigError("cannot install into %s: %s" % (args.prefix, getattr(e, "strerror", None) or e))
    if ctx.ui.emit_unless_table({"launcher": launcher, "module": module, "python": python}):
        ctx.ui.success("Installed %s (runs %s -IS, module in %s)" % (launcher, python, libdir))


@command("self-uninstall", "remove what self-install installed", *INSTALL_ARGS,
         examples=("attune self-uninstall",))
def cmd_self_uninstall(ctx, args):
    launcher, libdir, _ = install_paths(args)
    removed = []
    try:
        with open(launcher, encoding="utf-8", errors="replace") as f:
            ours = LAUNCHER_MARK in f.read(4096)
    except OSError:
        ours = False
    cache = os.path.join(libdir, "__pycache__")
    names = [os.path.join(cache, n) for n in (os.listdir(cache) if os.path.isdir(cache) else [])
             if n.startswith(("attune.", "attune_rest."))]
    for path in ([launcher] if ours else []) + [os.path.join(libdir, name) for name in (
            "attune.py", REST_FILE, COMPLETION_FILE)] + names:
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ConfigError("cannot remove %s: %s" % (path, e.strerror or e))
    for directory in (cache, libdir):
        try:
            os.rmdir(directory)
        except OSError:
            pass  # not empty, or not there: left as it is
    if ctx.ui.emit_unless_table({"removed": removed}):
        ctx.ui.success("Removed %s" % (", ".join(removed) or "nothing"))


# === Commands: help ==========================================================

# what `attune help TOPIC` prints for each topic that is not a command (a function of the width)
HELP_TOPICS = {
    "global": lambda width: ["global options: every command takes them, before or after its name", ""]
    + help_rows(global_option_rows(), width),
    "environment": lambda width: ["environment:"] + environment_lines(),
    "exit-codes": lambda width: ["exit codes:"] + exit_code_lines()}


@command("help", "help on a command (help pack list) or a topic: " + ", ".join(HELP_TOPICS),
         arg("topic TOPIC: a command (pack list) or " + ", ".join(HELP_TOPICS), nargs="*", complete="commands"),
         examples=("attune help global  # the options every command takes",
                   "attune help run  # the same as attune run --help"))
def cmd_help(ctx, args):
    width = help_width()
    if not args.topic:
        write_text(ctx.ui.stdout, top_help(width))
    elif len(args.topic) == 1 and args.topic[0] in HELP_TOPICS:
        write_text(ctx.ui.stdout, "\n".join(HELP_TOPICS[args.topic[0]](width)) + "\n")
    else:  # a command's own --help, or the one-line error that names the closest command
        parse_args(args.topic + ["--help"])
    return 0


# === Commands: completion ====================================================
# The scripts it prints and installs are written in Shell completion (before Main).

@command("completion", "print a shell completion script, or install one (completion install SHELL)",
         arg("shell: bash, zsh, fish or powershell: print its script; install: write it where the shell reads it",
             choices=("bash", "zsh", "fish", "powershell", "install")),
         arg("install_shell SHELL: with install: the shell (bash, zsh or fish)", nargs="?",
             choices=("bash", "zsh", "fish")),
         examples=("attune completion install bash",
                   "source <(attune completion bash)"))
def cmd_completion(ctx, args):
    if args.shell == "install":
        if args.install_shell is None:
            raise UsageError("completion install needs the shell: bash, zsh or fish")
        return install_completion(ctx, args.install_shell)
    if args.install_shell is not None:
        raise UsageError("completion %s takes no further argument" % args.shell)
    ctx.ui.stdout.write(completion_script(args.shell))


# What loads the completions of a user's directory for bash: the bash-completion package, as
# Debian, Fedora, Arch, Alpine and Homebrew install it.
BASH_COMPLETION_FILES = ("/usr/share/bash-completion/bash_completion", "/etc/bash_completion",
                         "/usr/local/share/bash-completion/bash_completion",
                         "/opt/homebrew/etc/profile.d/bash_completion.sh", "/usr/local/etc/profile.d/bash_completion.sh")


def read_rc(path):
    """A shell's start-up file as text ('' when there is none or it cannot be read)."""
    try:
        return read_regular_file(path, 1 << 20)[0].decode("utf-8", "replace")
    except (OSError, ValueError):
        return ""


def install_completion(ctx, shell):
    """Write the script atomically where the shell finds a user's completions."""
    target = completion_target(shell, ctx.env)
    script = completion_script(shell).encode("utf-8")
    if os.path.islink(target):  # replacing it would drop what it points to from the user's setup
        raise ConfigError("%s is a symbolic link; attune.py does not replace it: remove it first, or write the "
                          "script where you want it: attune completion %s > FILE" % (quoted(target), shell))
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_atomic(target, script, shared=True)
    except OSError as e:
        raise AttuneError("cannot write %s: %s" % (quoted(target), e.strerror or e))
    lines = []
    if shell == "zsh":  # unless ~/.zshrc names the directory already
        home = os.path.dirname(os.path.dirname(os.path.dirname(target)))  # target: ~/.zsh/completions/_attune
        if ".zsh/completions" not in read_rc(os.path.join(ctx.env.get("ZDOTDIR") or home, ".zshrc")):
            lines = ["fpath=(~/.zsh/completions $fpath)", "autoload -Uz compinit && compinit"]
    if shell == "bash" and not any(map(os.path.exists, BASH_COMPLETION_FILES)):
        lines = [". %s" % shell_quote(target)]  # nothing here reads that directory: the shell itself must
    rc = {"bash": "~/.bashrc", "zsh": "~/.zshrc"}.get(shell)

    if ctx.ui.emit_unless_table({"shell": shell, "path": target, "add_to": rc if lines else None, "lines": lines}):
        ctx.ui.out("Installed %s completion to %s" % (shell.title(), target))
        if shell == "bash" and lines:
            ctx.ui.warn("bash-completion is not installed here, and it is what reads that directory")
        if lines:
            ctx.ui.out("Add this to %s, then restart %s:" % (rc, shell.title()))
            for line in lines:
                ctx.ui.out(line)


REST_LOADED = True  # the last definition of the rest: every command is declared


if __name__ == "__main__":
    exit_process(main())
