#!/usr/bin/env python3
"""Tests for attune.py, and the fake Attune server they run against.

    python3 -m unittest test_attune          run the suite (make test)
    python3 test_attune.py test-all          run it on every Python found (make test-all)
    python3 test_attune.py serve [--port N] [--access-ttl S] [--refresh-mode M]
                                             the embedded sandbox (user admin, password admin)
    python3 test_attune.py demo              scripted walk-through against the sandbox (make demo)

Stdlib unittest only. Most tests call attune.main(argv) in process against a
FakeAttune on 127.0.0.1:0; the ProcessTests run attune.py as real processes
(concurrency, signals, encodings). No test uses the real home directory or any
network beyond loopback. Every run is scanned for leaked tokens and passwords.
"""

import base64
import contextlib
import errno
import hashlib
import hmac
import http.server
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock
from urllib.parse import parse_qs, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
ATTUNE_PY = os.path.join(HERE, "attune.py")
sys.path.insert(0, HERE)
import attune  # noqa: E402

POSIX = os.name == "posix"
PASSWORD = "s3cret-Admin-pw"  # the fake server's admin password in tests (the sandbox uses admin)
IS_ROOT = POSIX and os.geteuid() == 0

# === Fake Attune server ======================================================
# Faithful to ../shared/attune-api.md where the client can tell: root /auth and
# /health routes, /api/v1 resources, {"data": ...} envelopes, paginated
# {"items", "pagination"} lists, both error shapes, HS256 JWTs with sub, login,
# iat, exp and token_type, expires_in, and 60 s of leeway on exp.

JWT_SECRET = b"attune.py fake server secret"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(claims, secret=JWT_SECRET):
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret, (header + "." + payload).encode(), hashlib.sha256).digest()
    return header + "." + payload + "." + b64url(signature)


def verify_jwt(token, now, leeway=60, secret=JWT_SECRET):
    """(claims, None) for a valid token, (None, reason) otherwise."""
    try:
        header, payload, signature = token.split(".")
        expected = hmac.new(secret, (header + "." + payload).encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(b64url(expected), signature):
            return None, "bad signature"
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, TypeError):
        return None, "malformed"
    if claims.get("exp", 0) + leeway < now:
        return None, "expired"
    return claims, None


class Seen:
    """One request as the fake server received it."""

    def __init__(self, method, target, headers, body):
        parts = urlsplit(target)
        self.method, self.target, self.path = method, target, parts.path
        self.query = parse_qs(parts.query)
        self.headers, self.body = headers, body

    def json(self):
        return json.loads(self.body.decode("utf-8")) if self.body else None

    @property
    def token(self):
        auth = self.headers.get("Authorization") or ""
        return auth[7:] if auth.startswith("Bearer ") else None

    def __repr__(self):
        return "<%s %s>" % (self.method, self.target)


def envelope(data, message=None):
    body = {"data": data}
    if message:
        body["message"] = message
    return body


def api_error(status, message, code):
    return status, {"error": message, "code": code}


class FakeAttune:
    """A small Attune API on 127.0.0.1, threaded, with a request log, counters
    and fault injection.

    refresh_mode 'reusable' is what the real server does (an old refresh token
    stays valid); 'single-use' answers 401 to a refresh token used before, as a
    strict OAuth server would."""

    def __init__(self, access_ttl=3600, refresh_ttl=7 * 86400, refresh_mode="reusable",
                 clock_offset=0, tls=False, admin_password="s3cret-Admin-pw"):
        self.access_ttl, self.refresh_ttl = access_ttl, refresh_ttl
        self.refresh_mode, self.clock_offset, self.tls = refresh_mode, clock_offset, tls
        self.lock = threading.RLock()
        self.requests, self.faults, self.issued = [], [], []
        self.revoked, self.used_refresh = set(), set()
        self.nonce = 0
        self.users = {"admin": {"id": 1, "password": admin_password, "display_name": "Administrator"},
                      "zoe": {"id": 3, "password": "zoe-pass", "display_name": "Zoë Ørsted"}}
        self.ldap_users = {"ldapuser": {"id": 2, "password": "ldap-pass", "display_name": "LDAP User"}}
        self.integration_tokens = {"attune_it_testtoken": "admin"}
        self.settings = {
            "authentication_enabled": True, "local_password_enabled": True,
            "local_password_visible_by_default": True, "oidc_enabled": False,
            "oidc_visible_by_default": False, "ldap_enabled": False, "ldap_visible_by_default": False,
            "self_registration_enabled": False}
        self.packs = {}
        for i, (ref, label, description) in enumerate([
                ("core", "Core", "Core actions, triggers and sensors"),
                ("linux", "Linux", "Actions for Linux hosts"),
                ("examples", "Examples", "Example workflows and rules")], start=1):
            self.packs[ref] = self.new_pack(i, ref, label, description)
        self.httpd = None
        self._tmp = None

    # -- control -------------------------------------------------------------
    def start(self, port=0):
        self.httpd = ThreadingServer(("127.0.0.1", port), FakeHandler)
        self.httpd.fake = self
        if self.tls:
            import ssl
            self._tmp = tempfile.mkdtemp(prefix="attune-fake-tls-")
            cert, key = os.path.join(self._tmp, "leaf.pem"), os.path.join(self._tmp, "leaf.key")
            with open(cert, "w") as f:
                f.write(TEST_LEAF_PEM)
            with open(key, "w") as f:
                f.write(TEST_LEAF_KEY)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self):
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def port(self):
        return self.httpd.server_address[1]

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self.port)

    def now(self):
        return time.time() + self.clock_offset

    def fail(self, path, method=None, status=None, body=None, headers=None, delay=0.0,
             drop=False, truncate=False, times=1):
        """Answer the next `times` matching requests (None: all) with a fault instead."""
        with self.lock:
            self.faults.append(dict(path=path, method=method, status=status, body=body,
                                    headers=headers or {}, delay=delay, drop=drop,
                                    truncate=truncate, times=times))

    def take_fault(self, req):
        with self.lock:
            for fault in self.faults:
                if fault["path"] == req.path and fault["method"] in (None, req.method):
                    if fault["times"] is not None:
                        fault["times"] -= 1
                        if fault["times"] <= 0:
                            self.faults.remove(fault)
                    return fault
        return None

    def count(self, method=None, path=None):
        with self.lock:
            return sum(1 for r in self.requests
                       if method in (None, r.method) and path in (None, r.path))

    def log(self):
        with self.lock:
            return ["%s %s" % (r.method, r.path) for r in self.requests]

    def secrets(self):
        """Every token and password this server handed out or knows: none may leak."""
        with self.lock:
            found = set(self.issued) | set(self.integration_tokens)
        for users in (self.users, self.ldap_users):
            found |= {u["password"] for u in users.values()}
        return found

    # -- tokens --------------------------------------------------------------
    def mint(self, login, token_type="access", ttl=None, iat=None):
        with self.lock:
            user = self.users.get(login) or self.ldap_users.get(login) or {"id": 99}
            iat = int(self.now()) if iat is None else int(iat)
            if ttl is None:
                ttl = self.access_ttl if token_type == "access" else self.refresh_ttl
            claims = {"sub": str(user["id"]), "login": login, "iat": iat, "exp": iat + ttl,
                      "token_type": token_type}
            if self.refresh_mode == "single-use":  # a strict server never repeats a token
                self.nonce += 1
                claims["nonce"] = self.nonce
            token = make_jwt(claims)
            self.issued.append(token)
            return token

    def token_body(self, login, with_user=True):
        data = {"access_token": self.mint(login, "access"), "refresh_token": self.mint(login, "refresh"),
                "token_type": "Bearer", "expires_in": self.access_ttl}
        if with_user:
            user = self.users.get(login) or self.ldap_users[login]
            data["user"] = {"id": user["id"], "login": login, "display_name": user["display_name"]}
        return 200, envelope(data)

    def bearer_claims(self, req):
        """(claims, None) or (None, message) for the request's access token."""
        if req.token is None:
            return None, "Missing authentication token"
        claims, problem = verify_jwt(req.token, self.now())
        if problem == "expired":
            return None, "Authentication token expired"
        if problem or claims.get("token_type", "access") == "refresh" or req.token in self.revoked:
            return None, "Invalid authentication token"
        return claims, None

    # -- routes --------------------------------------------------------------
    def handle(self, req):
        for method, pattern, name in ROUTES:
            match = re.match(pattern + "$", req.path)
            if match and method == req.method:
                if req.path.startswith("/api/v1/"):
                    claims, problem = self.bearer_claims(req)
                    if problem:  # the auth extractor's nested shape
                        return 401, {"error": {"code": 401, "message": problem}}
                    req.claims = claims
                return getattr(self, name)(req, **match.groupdict())
        if any(re.match(p + "$", req.path) for _, p, _ in ROUTES):
            return api_error(405, "Method not allowed", "METHOD_NOT_ALLOWED")
        return api_error(404, "Not found", "NOT_FOUND")

    def health(self, req):
        return 200, {"status": "ok"}

    def auth_settings(self, req):
        return 200, envelope(dict(self.settings))

    def password_login(self, req, users):
        body = req.json() or {}
        login, password = body.get("login"), body.get("password")
        if not isinstance(login, str) or not login or not isinstance(password, str) or not password:
            return api_error(422, "Validation failed: login and password are required", "VALIDATION_ERROR")
        user = users.get(login)
        if not user or not hmac.compare_digest(user["password"], password):
            return api_error(401, "Invalid login or password", "UNAUTHORIZED")
        return self.token_body(login)

    def auth_login(self, req):
        return self.password_login(req, self.users)

    def auth_ldap_login(self, req):
        if not self.settings.get("ldap_enabled"):
            return api_error(501, "LDAP authentication is not configured", "NOT_IMPLEMENTED")
        return self.password_login(req, self.ldap_users)

    def auth_token_login(self, req):
        token = (req.json() or {}).get("token")
        login = self.integration_tokens.get(token)
        if not login:
            return api_error(401, "Invalid token", "UNAUTHORIZED")
        return self.token_body(login)

    def auth_refresh(self, req):
        body = req.json() if req.body else None
        if not isinstance(body, dict) or "refresh_token" not in body:
            return api_error(401, "Missing refresh token", "UNAUTHORIZED")
        token = body["refresh_token"]
        if not token:
            return api_error(422, "Invalid refresh token request: refresh_token is empty",
                             "VALIDATION_ERROR")
        claims, problem = verify_jwt(token, self.now())
        if problem:
            return api_error(401, "Invalid or expired refresh token", "UNAUTHORIZED")
        if claims.get("token_type") != "refresh":
            return api_error(401, "Invalid token type", "UNAUTHORIZED")
        with self.lock:
            if self.refresh_mode == "single-use":
                if token in self.used_refresh:
                    return api_error(401, "Invalid or expired refresh token", "UNAUTHORIZED")
                self.used_refresh.add(token)
        return self.token_body(claims["login"], with_user=False)

    def auth_me(self, req):
        claims, problem = self.bearer_claims(req)
        if problem:  # /auth/me answers with the flat shape
            return api_error(401, "Unauthorized", "UNAUTHORIZED")
        login = claims["login"]
        user = self.users.get(login) or self.ldap_users.get(login) or {"id": 0, "display_name": None}
        return 200, envelope({
            "id": user["id"], "login": login, "display_name": user["display_name"],
            "auth_provider": "ldap" if login in self.ldap_users else "local",
            "is_local": login not in self.ldap_users, "can_change_password": True,
            "effective_permissions": [{"resource": "packs", "actions": ["read", "create"]}],
            "assigned_permission_set_refs": ["core.admin"]})

    def new_pack(self, pack_id, ref, label, description=None, version="1.0.0", tags=()):
        stamp = "2026-11-01T12:00:00Z"
        return {"id": pack_id, "ref": ref, "label": label, "description": description,
                "version": version, "tags": list(tags), "is_standard": ref == "core",
                "created": stamp, "updated": stamp}

    def paginate(self, req, items, size_param="page_size"):
        page = max(1, int(req.query.get("page", ["1"])[0]))
        size = min(100, max(1, int(req.query.get(size_param, ["50"])[0])))
        total = len(items)
        pages = max(1, (total + size - 1) // size)
        chunk = items[(page - 1) * size:page * size]
        return 200, {"items": chunk, "pagination": {
            "page": page, "page_size": size, "total_items": total, "total_pages": pages,
            "has_previous": page > 1, "has_next": page < pages}}

    def packs_list(self, req):
        with self.lock:
            return self.paginate(req, sorted(self.packs.values(), key=lambda p: p["id"]))

    def packs_show(self, req, ref):
        with self.lock:
            pack = self.packs.get(ref)
            if not pack:
                return api_error(404, "Pack '%s' not found" % ref, "NOT_FOUND")
            detail = dict(pack, conf_schema={}, config={}, meta={}, dependencies=[], runtime_deps=[],
                          action_count=0, trigger_count=0, rule_count=0, sensor_count=0)
            return 200, envelope(detail)

    def packs_create(self, req):
        body = req.json() or {}
        missing = [k for k in ("ref", "label", "version") if not body.get(k)]
        if missing:
            return api_error(422, "Validation failed: %s required" % ", ".join(missing),
                             "VALIDATION_ERROR")
        with self.lock:
            if body["ref"] in self.packs:
                return api_error(409, "Pack with ref '%s' already exists" % body["ref"], "CONFLICT")
            pack = self.new_pack(len(self.packs) + 1, body["ref"], body["label"],
                                 body.get("description"), body["version"], body.get("tags") or ())
            self.packs[pack["ref"]] = pack
            return 201, envelope(pack)

    def packs_delete(self, req, ref):
        with self.lock:
            if self.packs.pop(ref, None) is None:
                return api_error(404, "Pack '%s' not found" % ref, "NOT_FOUND")
        return 200, {"success": True, "message": "Pack '%s' deleted successfully" % ref}


ROUTES = [
    ("GET", r"/health", "health"),
    ("GET", r"/auth/settings", "auth_settings"),
    ("POST", r"/auth/login", "auth_login"),
    ("POST", r"/auth/ldap/login", "auth_ldap_login"),
    ("POST", r"/auth/token-login", "auth_token_login"),
    ("POST", r"/auth/refresh", "auth_refresh"),
    ("GET", r"/auth/me", "auth_me"),
    ("GET", r"/api/v1/packs", "packs_list"),
    ("POST", r"/api/v1/packs", "packs_create"),
    ("GET", r"/api/v1/packs/(?P<ref>[^/]+)", "packs_show"),
    ("DELETE", r"/api/v1/packs/(?P<ref>[^/]+)", "packs_delete"),
]


class ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True  # http.server.ThreadingHTTPServer is 3.7+
    allow_reuse_address = True


class FakeHandler(http.server.BaseHTTPRequestHandler):
    server_version = "FakeAttune/1.0"

    def log_message(self, *args):
        pass

    def do_any(self):
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        req = Seen(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
        with fake.lock:
            fake.requests.append(req)
        fault = fake.take_fault(req)
        if fault:
            time.sleep(fault["delay"])
            if fault["drop"]:
                self.close_connection = True
                return
            if fault["status"] is not None:
                return self.reply(fault["status"], fault["body"], fault["headers"], fault["truncate"])
        status, body = fake.handle(req)
        self.reply(status, body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_any

    def reply(self, status, body, headers=None, truncate=False):
        if body is None:
            data = b""
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode("utf-8")
        else:
            data = json.dumps(body).encode("utf-8")
        try:
            self.send_response(status)
            headers = dict(headers or {})
            if data and not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data) + (1000 if truncate else 0)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if truncate:
            self.close_connection = True


# Test PKI for the TLS tests: a CA and a leaf for 127.0.0.1/localhost, valid 2020-2120.
TEST_CA_PEM = """-----BEGIN CERTIFICATE-----
MIIC+DCCAeCgAwIBAgICEAAwDQYJKoZIhvcNAQELBQAwHDEaMBgGA1UEAwwRYXR0
dW5lLnB5IHRlc3QgQ0EwIBcNMjAwMTAxMDAwMDAwWhgPMjEyMDAxMDEwMDAwMDBa
MBwxGjAYBgNVBAMMEWF0dHVuZS5weSB0ZXN0IENBMIIBIjANBgkqhkiG9w0BAQEF
AAOCAQ8AMIIBCgKCAQEAwCaQI8Rw3u6bzk37fy2cUbBIYNcIFu68ius5DBXbunUG
kVqE0NA8GU3s4IWr3S2V0NT6FfPq1OT6Q/tjNGNik3YJQv9DHrcUE9f9JAQilfpd
uwJT2aZC3xnkQTItcxsrkEw9PSxIP85K3/tlwbonle2GpbaYx6IRTEJsk9nElYBN
+Yx9+eyIUsAOykLJA0JicowpetzPsdqx3NVocQBZgDO0KKq/iWhg/+Pf6U9O7Lm+
vxI4DKP8d773/1bBWAUAJNOwiQ/WbSDy8gFC/OLpQ8LNiN88jaVV0TB/cKu6P++M
wP0kZq2aRB4SxWPV7zIdzbtvRGzUZR5Tg5s203xmTQIDAQABo0IwQDAPBgNVHRMB
Af8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAdBgNVHQ4EFgQUmQW8/TgJfkXp47sW
uZ9dTdZmzYkwDQYJKoZIhvcNAQELBQADggEBAIM9fSjTSYCmJN2gIXQf4b2Es8v8
z8uFaPRLcBpgKlWp35jJCnX1IEBssCPszI5R7+0hCSpUAf+PkB/fHXBsiyNqY4DV
pVCtgjH1DhD4GEOAGWZtWjA1DiiENf/26PS38teidYlfD5Wdf7q6WUgAxVFAtZY+
U4Dlmbv/b/3vKxt8BVfhxwIkdwkzodJV7cCQeQacLsSZN8FdwArMmVq7wiili1JB
XVcDA4cFNqwPj2fRkwsWefH2YJBs1h7pRpn4U+jiBILRrhxwl/KnPzEw9YQSW8h7
ehrayOT7DtFmEcAt/nvCs6QozOgiMVSl7Hgib0o+Ui2bSnZi8EwJzv77oXI=
-----END CERTIFICATE-----
"""
TEST_LEAF_PEM = """-----BEGIN CERTIFICATE-----
MIIDQTCCAimgAwIBAgICEAEwDQYJKoZIhvcNAQELBQAwHDEaMBgGA1UEAwwRYXR0
dW5lLnB5IHRlc3QgQ0EwIBcNMjAwMTAxMDAwMDAwWhgPMjEyMDAxMDEwMDAwMDBa
MBQxEjAQBgNVBAMMCTEyNy4wLjAuMTCCASIwDQYJKoZIhvcNAQEBBQADggEPADCC
AQoCggEBAKxs5X50s4APJ5jpCjPtlMtyPtrMYg2Jut7cJRYnq/hO6z8tOcQTrEaD
6ddWBXeBv7DmqId6xmxpxJepMx/lgnTR0ZeowOIqXuUMihvMVmJWRq4ylR/jtU6B
6q08gxt36I1DvFCfy96PDRCVBuuxj6FWcsFuo1oXL/0HTXzMxV/UF47Kt3Lj+IqK
IdquLP86tQTQKICM6Yr6TzkxpstVEda3LcVtdNgaTbtk5VY3zmJumltRdbbYKeoT
r84Dhmld3hlKPxOxdbWoNAjqc/Qp0zSFZUbcith7gtcqm5QXYW9qlcOQ2BXKa5b+
myRmRWkVLo9bddokybtJxfJdk5BGCZ0CAwEAAaOBkjCBjzAMBgNVHRMBAf8EAjAA
MA4GA1UdDwEB/wQEAwIFoDATBgNVHSUEDDAKBggrBgEFBQcDATAaBgNVHREEEzAR
hwR/AAABgglsb2NhbGhvc3QwHQYDVR0OBBYEFJRcPPHDKS33mchhekVYR08+XkFM
MB8GA1UdIwQYMBaAFJkFvP04CX5F6eO7FrmfXU3WZs2JMA0GCSqGSIb3DQEBCwUA
A4IBAQC0U05TsxKeV4yZzNQ/HV8c+ndTkNnPEnwyGFt9bOAogcablZ/2Y3RvUP58
deVRYnWo2sCBesJK+P14jncTqUZoDpZJOKuNnJjrdM2PN7PI77c2h/eGpzbWAxGN
LMuVt3LZOYizf4xidHSaRvYgmTsUuXAE8H18l13zkUVY9T5u3sTszsSshbnsyVnv
bgSbluSl8G5umaEdb2xSd4KMgDx0eJT6fzF2KTefBOBYGft45x4iG+DUjLkvSWjT
Ti+K4q4SpvFt0LgtiJQQk+iWizKcKUZZUe4/0Q1J+du5xlEjU0ltweFp42kDfIEK
K9d5MGGe5nEwOFws7txRONQNUulq
-----END CERTIFICATE-----
"""
TEST_LEAF_KEY = """-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCsbOV+dLOADyeY
6Qoz7ZTLcj7azGINibre3CUWJ6v4Tus/LTnEE6xGg+nXVgV3gb+w5qiHesZsacSX
qTMf5YJ00dGXqMDiKl7lDIobzFZiVkauMpUf47VOgeqtPIMbd+iNQ7xQn8vejw0Q
lQbrsY+hVnLBbqNaFy/9B018zMVf1BeOyrdy4/iKiiHariz/OrUE0CiAjOmK+k85
MabLVRHWty3FbXTYGk27ZOVWN85ibppbUXW22CnqE6/OA4ZpXd4ZSj8TsXW1qDQI
6nP0KdM0hWVG3IrYe4LXKpuUF2FvapXDkNgVymuW/pskZkVpFS6PW3XaJMm7ScXy
XZOQRgmdAgMBAAECggEAGrIo3WmD1IBu1jcX5s6nz9CqQvsLoA1NMFhvqjH4khM5
9gfyXoAt7KRbjgUEsf+V5nWX7eidlHHTHSjLwGpVm/D+cpePTD+uKJLGm/jeU7my
63aWbcpg1b0PUMTChya2C+UgYMU/mH+X0L5ExN+IHZKCZZ4pJCIx7Qr2ktYrevix
y3OLT9cV3/5DQd2K7ae87sClWJ0tOMWb5cFZ+qh0ucMqJ5jedksfjC+0UzITwftc
tdfnhveFTT2za5RS00NTkRm8hVqhRs34WHfcm4Zv9dKlW9Vm8/W3L33Sh4sMrEz9
5Yc5OkeT2KhH3Vws6oLOmEEtoNv+hbJyCci3b51yewKBgQDt5KaaDgrstOPodylr
769D8Bog4uxMKfBZqGF/FhyRZE4deFqqUkDlR6y44cADn6XOxNctfsIAZxOKfunz
a1k89Q+ltdj+gm8isTySqqP9yoJv8ZRELxC7XnCwN0USdx3D9jsDRKOxpoystSpR
/bTTPmoMOYcczDBSC200yN8oVwKBgQC5jJsE7JgC+zENRYrhuDZuyQZOw9DiDiBT
PgDiX2ZcAGR3MF/LXSstQXXD1sXrs2VAXsSXMNlDjOhFM1H6LLoNDvyDt6RiZD3t
1nGtHHQJ7VMPz+MbUib6wg5D83x1oSt9k7MV/B4u1Zw3LiudvUlyE20u7PuP1dU1
lE9Zhun1KwKBgQCqC+1C5ZLNjKf0vWjwbI39pB0pMMvzzW6ux/uZGjclfmuQCT3V
zaHxwoAmT8gvTuj4mh+tt5P5MbT4JKwagbtyJUIgE5KeqqHCTKqdtDgw65a9ahOv
gW0WYfVvILLQ9jBiqRmZxnC0Rfb8ZStxHEcrUMwBHQYFgbdwjhZrysIpVQKBgQCC
z4C+cPoeJ+8F90AZL+CYK/rZbq2FoQXjCbRf43frZo9tg9oVKiL1bc/TeEfiin/Y
aLdaC6MwP1fE6ZBiukOUTztwtPgcMaWDVoqfy453LSxA2oO20C0Q3dxmxXK6Dxz1
FDrORgcVZ50RPeib9UWhOdbgnUwgtFTyyBNE/5tTLwKBgHY5cvA27DRZ84b7jGTV
zV9UbZk8Uef2s0M8J0LIf61n9gdhRPRN4Pbzi5GrknMKMR2nQZfJJlA5H43eq46O
J+wilgPptstpXC9JRHWVWKvGXttalDfz9+oV+nL87nGUcd2BSn5zkSHhdUk71n5Z
MU7GjYNLqOvejHTCpFzMvno4
-----END PRIVATE KEY-----
"""


# === Test helpers ============================================================

class Result:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return "Result(code=%r, out=%r, err=%r)" % (self.code, self.out[-2000:], self.err[-2000:])


class FakeMsvcrt:
    """Behaves like msvcrt.locking for the Windows lock path: a non-blocking lock of
    nbytes at the fd's current position, refused while another fd holds it."""
    LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK = 0, 1, 2, 3, 4

    def __init__(self):
        self.held = {}
        self.calls = []

    def locking(self, fd, mode, nbytes):
        st = os.fstat(fd)
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        key = (st.st_dev, st.st_ino, offset, nbytes)
        self.calls.append((mode, offset, nbytes))
        if mode == self.LK_UNLCK:
            if self.held.get(key) != fd:
                raise PermissionError(errno.EACCES, "Permission denied")
            del self.held[key]
        elif mode == self.LK_NBLCK:
            if key in self.held:
                raise PermissionError(errno.EACCES, "Permission denied")
            self.held[key] = fd
        else:
            raise ValueError("mode %r not used by attune.py" % mode)


class AttuneTestCase(unittest.TestCase):
    """A temporary home, a credential file path inside it, and a fake server."""
    server_options = {}

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="attune-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.server = FakeAttune(**self.server_options).start()
        self.addCleanup(self.server.stop)
        self.config = os.path.join(self.tmp, "home", ".config", "attune", "credentials.json")
        self.env = {"HOME": os.path.join(self.tmp, "home"), "ATTUNE_CONFIG": self.config}

    # -- running attune ------------------------------------------------------
    def run_cli(self, *argv, env=None, stdin="", clock=None, secrets_ok=False):
        """attune.main(argv) in process; stdout and stderr captured and scanned for secrets."""
        environ = self.environ(env)
        out, err = io.StringIO(), io.StringIO()
        old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = attune.main(list(argv), environ=environ, clock=clock)
                except SystemExit as e:  # argparse
                    code = e.code
        finally:
            sys.stdin = old_stdin
        result = Result(code, out.getvalue(), err.getvalue())
        self.assert_no_leak(result, secrets_ok)
        return result

    def environ(self, extra=None):
        environ = dict(self.env)
        for key, value in (extra or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        return environ

    def process_env(self, extra=None):
        environ = self.environ(extra)
        environ.setdefault("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
        environ.setdefault("PYTHONIOENCODING", "utf-8")
        return environ

    def spawn(self, *argv, env=None, stdin=subprocess.DEVNULL, **kwargs):
        return subprocess.Popen([sys.executable, ATTUNE_PY] + list(argv), env=self.process_env(env),
                                stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, **kwargs)

    def run_process(self, *argv, env=None, input=None, timeout=60, secrets_ok=False):
        p = self.spawn(*argv, env=env, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL)
        out, err = p.communicate(input, timeout=timeout)
        result = Result(p.returncode, out, err)
        self.assert_no_leak(result, secrets_ok)
        return result

    def assert_no_leak(self, result, stdout_ok=False):
        for secret in self.server.secrets() | getattr(self, "extra_secrets", set()):
            if not stdout_ok:
                self.assertNotIn(secret, result.out, "a secret leaked to stdout")
            self.assertNotIn(secret, result.err, "a secret leaked to stderr")

    def ok(self, *argv, **kwargs):
        result = self.run_cli(*argv, **kwargs)
        self.assertEqual(result.code, 0, result)
        return result

    def fails(self, code, *argv, **kwargs):
        result = self.run_cli(*argv, **kwargs)
        self.assertEqual(result.code, code, result)
        self.assertNotIn("Traceback", result.err)
        if code:
            self.assertTrue(result.err.startswith("attune: ") or "usage:" in result.err, result)
        return result

    # -- the credential file -------------------------------------------------
    def read_doc(self):
        with open(self.config, encoding="utf-8") as f:
            return json.load(f)

    def write_doc(self, doc, mode=0o600):
        os.makedirs(os.path.dirname(self.config), mode=0o700, exist_ok=True)
        with open(self.config, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        os.chmod(self.config, mode)

    def profile(self, name="default"):
        return self.read_doc()["profiles"][name]

    def seed(self, profile="default", access_left=3000, access_ttl=3600, refresh_left=6 * 86400,
             refresh_ttl=7 * 86400, store_expiry=True, current=True, user="admin", **fields):
        """Store a logged-in profile whose tokens come from the fake server."""
        now = int(time.time())
        access = self.server.mint(user, "access", ttl=access_ttl, iat=now + access_left - access_ttl)
        refresh = self.server.mint(user, "refresh", ttl=refresh_ttl, iat=now + refresh_left - refresh_ttl)
        entry = {"api_url": self.server.url, "auth_token": access, "refresh_token": refresh,
                 "username": user, "auth_method": "password", "invalidated_at": None}
        if store_expiry:
            entry["auth_token_expires_at"] = now + access_left
            entry["refresh_token_expires_at"] = now + refresh_left
        entry.update(fields)
        doc = self.read_doc() if os.path.exists(self.config) else {"version": 1, "profiles": {}}
        doc["profiles"][profile] = entry
        if current:
            doc["current_profile"] = profile
        self.write_doc(doc)
        return entry

    def snapshot(self):
        with open(self.config, "rb") as f:
            return f.read(), os.stat(self.config).st_mtime_ns


# === Tests: small pieces =====================================================

class JwtTests(unittest.TestCase):
    def test_claims_of_a_real_token(self):
        token = make_jwt({"sub": "1", "login": "admin", "iat": 1000, "exp": 4600})
        self.assertEqual(attune.jwt_claims(token)["login"], "admin")
        self.assertEqual(attune.jwt_expiry(token), 4600)
        self.assertEqual(attune.jwt_lifetime(token), 3600)

    def test_padding_is_restored(self):
        for n in range(1, 8):  # payload lengths that need 0, 1 and 2 padding characters
            token = make_jwt({"exp": 10 ** n, "x": "a" * n})
            self.assertEqual(attune.jwt_expiry(token), 10 ** n)

    def test_malformed_tokens_have_unknown_expiry(self):
        def token(payload):
            return "eyJhbGciOiJIUzI1NiJ9." + payload + ".sig"

        cases = {
            "two parts": "abc.def",
            "four parts": "a.b.c.d",
            "not base64": token("!!!***"),
            "not json": token(b64url(b"not json at all")),
            "not utf-8": token(b64url(b"\xff\xfe\xfd")),
            "array payload": token(b64url(b"[1, 2]")),
            "no exp": token(b64url(b'{"iat": 1}')),
            "exp as string": token(b64url(b'{"exp": "1700000000", "iat": 1}')),
            "exp as bool": token(b64url(b'{"exp": true}')),
            "exp NaN": token(b64url(b'{"exp": NaN}')),
            "deeply nested": token(b64url(b"[" * 100000 + b"]" * 100000)),
            "100 KB": token(b64url(json.dumps({"exp": "x", "pad": "y" * 100000}).encode())),
            "empty": "",
            "not a string": None,
        }
        for name, value in cases.items():
            with self.subTest(name):
                self.assertIsNone(attune.jwt_expiry(value))
                self.assertIsNone(attune.jwt_lifetime(value))

    def test_margin_is_ten_percent_clamped(self):
        self.assertEqual(attune.refresh_margin(3600), 300)
        self.assertEqual(attune.refresh_margin(1200), 120)
        self.assertEqual(attune.refresh_margin(100), 30)
        self.assertEqual(attune.refresh_margin(86400), 300)
        self.assertEqual(attune.refresh_margin(None), 30)

    def test_durations(self):
        self.assertEqual(attune.format_duration(0), "0s")
        self.assertEqual(attune.format_duration(45), "45s")
        self.assertEqual(attune.format_duration(60), "1m")
        self.assertEqual(attune.format_duration(3552), "59m 12s")
        self.assertEqual(attune.format_duration(3600), "1h")
        self.assertEqual(attune.format_duration(3725), "1h 2m")
        self.assertEqual(attune.format_duration(7 * 86400 - 3600), "6d 23h")
        self.assertEqual(attune.format_duration(-90), "-1m 30s")


class YamlTests(unittest.TestCase):
    def test_block_style(self):
        data = [{"id": 1, "ref": "core", "tags": ["a", "b"], "meta": {"x": None, "z": True},
                 "empty": [], "none": {}}]
        self.assertEqual(attune.to_yaml(data), "\n".join([
            "- id: 1", "  ref: core", "  tags:", "  - a", "  - b", "  meta:", "    x: null",
            "    z: true", "  empty: []", "  none: {}"]))

    def test_nested_lists(self):
        self.assertEqual(attune.to_yaml([[1, 2], []]), "- - 1\n  - 2\n- []")
        self.assertEqual(attune.to_yaml({"a": [{"b": 1, "c": [2]}]}), "a:\n- b: 1\n  c:\n  - 2")

    def test_strings_are_quoted_when_yaml_would_misread_them(self):
        quoted = ["", " lead", "trail ", "yes", "No", "on", "null", "~", "true", "123", "1.5", "0x1f",
                  "-1", "+1", ".5", ".inf", "1e3", "2026-11-24", "12:30", "- item", "a: b", "key:",
                  "# comment", "x #y", "*anchor", "&a", "!tag", "|", ">", "'q'", '"q"', "%x", "@x",
                  "`x`", "{a}", "[a]", "line\nbreak", "tab\there", "bell\x07", "?", "y", "N"]
        for text in quoted:
            with self.subTest(text=text):
                rendered = attune.to_yaml({"k": text})
                self.assertEqual(rendered, "k: " + json.dumps(text, ensure_ascii=False))
        for text in ["plain", "core.http", "Hello world", "a-b", "a:b", "C:/x", "ünïcode", "x#y"]:
            with self.subTest(text=text):
                self.assertEqual(attune.to_yaml({"k": text}), "k: " + text)

    def test_keys_and_scalars(self):
        self.assertEqual(attune.to_yaml({"yes": 1, "a b": 2.5, "m": None, "f": False}),
                         '"yes": 1\na b: 2.5\nm: null\nf: false')
        self.assertEqual(attune.to_yaml("x"), "x")
        self.assertEqual(attune.to_yaml([]), "[]")

    def test_ascii_only_escapes_non_ascii(self):
        self.assertEqual(attune.to_yaml({"name": "Zoë"}, ascii_only=True), 'name: "Zo\\u00eb"')


class TableTests(unittest.TestCase):
    def test_aligned_columns_with_header_and_rule(self):
        text = attune.render_table(["Ref", "Version"], [["core", "1.0.0"], ["linux", None]])
        self.assertEqual(text.split("\n"), ["Ref    Version", "─────  ───────", "core   1.0.0", "linux"])

    def test_fits_the_width_by_cutting_the_widest_column(self):
        rows = [["core", "x" * 100], ["linux", "short"]]
        text = attune.render_table(["Ref", "Description"], rows, width=40)
        for line in text.split("\n"):
            self.assertLessEqual(len(line), 40)
        self.assertIn("…", text)
        self.assertIn("short", text)

    def test_cells(self):
        self.assertEqual(attune.cell_text(True), "✓")
        self.assertEqual(attune.cell_text(False), "✗")
        self.assertEqual(attune.cell_text(["a", "b"]), "a, b")
        self.assertEqual(attune.cell_text("two\nlines"), "two lines")
        self.assertEqual(attune.cell_text({"a": 1}), '{"a": 1}')

    def test_pairs(self):
        self.assertEqual(attune.render_pairs([("ID", 1), ("Display Name", "x\ny")]),
                         "ID:            1\nDisplay Name:  x\n               y")


class ProxyTests(unittest.TestCase):
    def test_no_proxy_forms(self):
        match = attune.no_proxy_matches
        self.assertTrue(match("10.1.2.3", 80, "10.0.0.0/8"))
        self.assertFalse(match("11.1.2.3", 80, "10.0.0.0/8"))
        self.assertTrue(match("fd00::1", 80, "fd00::/8"))
        self.assertTrue(match("api.example.com", 443, "example.com"))
        self.assertTrue(match("api.example.com", 443, ".example.com"))
        self.assertTrue(match("api.example.com", 443, "*.example.com"))
        self.assertFalse(match("badexample.com", 443, "example.com"))
        self.assertTrue(match("example.com", 8443, "example.com:8443"))
        self.assertFalse(match("example.com", 443, "example.com:8443"))
        self.assertTrue(match("anything", 80, "*"))
        self.assertTrue(match("b.org", 80, "a.org, b.org"))
        self.assertFalse(match("host", 80, "not-a-cidr/99"))

    def test_proxy_choice(self):
        env = {"https_proxy": "http://lower:3128", "HTTPS_PROXY": "http://upper:3128",
               "HTTP_PROXY": "http://plain:3128", "NO_PROXY": "internal.example,10.0.0.0/8"}
        self.assertEqual(attune.proxy_for("https://api.example.com/x", env), "http://lower:3128")
        self.assertEqual(attune.proxy_for("http://api.example.com/x", env), "http://plain:3128")
        self.assertIsNone(attune.proxy_for("https://internal.example/x", env))
        self.assertIsNone(attune.proxy_for("https://10.2.3.4/x", env))
        for url in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:80"):
            self.assertIsNone(attune.proxy_for(url, env), url)
        self.assertEqual(attune.proxy_for("http://x.org", {"ALL_PROXY": "http://all:1"}), "http://all:1")


class MessageTests(unittest.TestCase):
    def response(self, status, body, reason="Reason"):
        return attune.Response(status, reason, {}, body if isinstance(body, bytes) else body.encode())

    def test_both_error_shapes(self):
        flat = self.response(409, '{"error": "Pack with ref \'x\' already exists", "code": "CONFLICT"}',
                             "Conflict")
        self.assertEqual(str(attune.api_error(flat)),
                         "API error (409 Conflict): Pack with ref 'x' already exists")
        nested = self.response(401, '{"error": {"code": 401, "message": "Authentication token expired"}}')
        self.assertEqual(attune.error_message(nested), "Authentication token expired")
        self.assertIsInstance(attune.api_error(nested), attune.AuthRequired)

    def test_html_is_status_line_and_first_200_characters(self):
        html = "<html><body>" + "Bad gateway " * 50 + "</body></html>"
        error = attune.api_error(self.response(502, html, "Bad Gateway"))
        self.assertIsInstance(error, attune.ServerError)
        text = str(error)
        self.assertTrue(text.startswith("API error (502 Bad Gateway): <html><body>Bad gateway"), text)
        self.assertLessEqual(len(text), len("API error (502 Bad Gateway): ") + 203)

    def test_exit_codes_by_status(self):
        for status, code in ((400, 1), (401, 4), (403, 1), (404, 1), (422, 1), (429, 1), (500, 6),
                             (503, 6)):
            self.assertEqual(attune.api_error(self.response(status, "{}")).exit_code, code, status)

    def test_redaction(self):
        body = {"login": "a", "password": "p", "data": [{"access_token": "t", "refresh_token": "r",
                                                          "expires_in": 5, "token_type": "Bearer"}]}
        self.assertEqual(attune.redact(body), {
            "login": "a", "password": "***",
            "data": [{"access_token": "***", "refresh_token": "***", "expires_in": 5,
                      "token_type": "***"}]})


class PathTests(unittest.TestCase):
    def path(self, env, config=None):
        return attune.credential_path(mock.Mock(config=config), env)

    def test_precedence(self):
        env = {"ATTUNE_CONFIG": "/e/c.json", "XDG_CONFIG_HOME": "/xdg", "HOME": "/home/u"}
        self.assertEqual(self.path(env, "/f/c.json"), ("/f/c.json", "flag"))
        self.assertEqual(self.path(env), ("/e/c.json", "env"))
        del env["ATTUNE_CONFIG"]
        self.assertEqual(self.path(env), ("/xdg/attune/credentials.json", "env"))
        env["XDG_CONFIG_HOME"] = "relative/ignored"
        self.assertEqual(self.path(env), ("/home/u/.config/attune/credentials.json", "default"))

    def test_windows_uses_appdata(self):
        with mock.patch.object(attune, "WINDOWS", True):
            self.assertEqual(self.path({"APPDATA": "C:/Users/u/AppData/Roaming", "HOME": "/h"}),
                             (os.path.join("C:/Users/u/AppData/Roaming", "attune", "credentials.json"),
                              "default"))


# === Tests: the credential file ==============================================

class CredentialFileTests(AttuneTestCase):
    def login(self, *extra):
        return self.ok("auth", "login", "-u", "admin", "--password-stdin", "--url", self.server.url,
                       *extra, stdin=PASSWORD + "\n")

    def test_login_creates_private_directory_file_and_lock(self):
        self.login()
        directory = os.path.dirname(self.config)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(directory)).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.config).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.config + ".lock").st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(directory)), ["credentials.json", "credentials.json.lock"])

    def test_existing_directory_is_never_chmodded(self):
        directory = os.path.dirname(self.config)
        os.makedirs(directory)
        os.chmod(directory, 0o755)
        self.login()
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o755)

    def test_unknown_keys_survive_every_rewrite(self):
        self.seed(access_left=-100, team_note="keep me")
        doc = self.read_doc()
        doc["future_setting"] = {"nested": [1, 2]}
        doc["profiles"]["other"] = {"api_url": "http://other.invalid", "color": "blue"}
        self.write_doc(doc)
        self.ok("auth", "whoami")                      # refresh
        self.ok("config", "set", "description", "x")   # config write
        self.login()                                   # login
        self.ok("auth", "logout")                      # logout
        doc = self.read_doc()
        self.assertEqual(doc["future_setting"], {"nested": [1, 2]})
        self.assertEqual(doc["profiles"]["other"], {"api_url": "http://other.invalid", "color": "blue"})
        self.assertEqual(doc["profiles"]["default"]["team_note"], "keep me")
        self.assertEqual(doc["version"], 1)

    def test_read_only_commands_never_create_the_file(self):
        token = self.server.mint("admin")
        env = {"ATTUNE_API_URL": self.server.url}
        for argv in (["auth", "status", "--offline"], ["config", "list"], ["config", "profiles"],
                     ["config", "get", "api_url"], ["config", "path"], ["config", "current"],
                     ["auth", "whoami"], ["auth", "token"]):
            self.run_cli(*argv, env=dict(env, ATTUNE_API_TOKEN=token), secrets_ok=True)
        self.assertFalse(os.path.exists(os.path.dirname(self.config)))

    def test_read_only_commands_never_rewrite_the_file(self):
        self.seed()
        before = self.snapshot()
        time.sleep(0.01)
        for argv in (["auth", "status"], ["auth", "status", "--all", "--offline"], ["config", "list"],
                     ["config", "profiles"], ["config", "show-profile", "default"], ["auth", "whoami"],
                     ["auth", "token"], ["config", "get", "format"]):
            self.run_cli(*argv, secrets_ok=True)
        self.assertEqual(self.snapshot(), before)
        self.assertFalse(os.path.exists(self.config + ".lock"))

    def test_newer_version_is_read_but_never_rewritten(self):
        self.seed()
        doc = self.read_doc()
        doc["version"] = 99
        self.write_doc(doc)
        before = self.snapshot()
        self.ok("auth", "whoami")
        result = self.fails(3, "config", "set", "description", "x")
        self.assertIn("newer attune.py (version 99)", result.err)
        self.assertIn(self.config, result.err)
        self.fails(3, "auth", "login", "-u", "admin", "--password-stdin", stdin=PASSWORD + "\n")
        self.assertEqual(self.snapshot(), before)

    def test_newer_version_refuses_before_refreshing(self):
        self.seed(access_left=-100)
        doc = self.read_doc()
        doc["version"] = 2
        self.write_doc(doc)
        self.fails(3, "auth", "whoami")
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)

    def test_corrupt_files_exit_3_naming_the_file(self):
        cases = {"empty": b"", "truncated": b'{"version": 1, "profiles": {', "array": b"[]",
                 "profiles wrong type": b'{"profiles": []}', "invalid utf-8": b'{"a": "\xff"}',
                 "version not int": b'{"version": "1"}', "garbage": os.urandom(4096)}
        os.makedirs(os.path.dirname(self.config))
        for name, data in cases.items():
            with self.subTest(name):
                with open(self.config, "wb") as f:
                    f.write(data)
                os.chmod(self.config, 0o600)
                result = self.fails(3, "auth", "status", "--offline")
                self.assertIn(self.config, result.err)
                self.assertIn("mv ", result.err)
                with open(self.config, "rb") as f:
                    self.assertEqual(f.read(), data)

    def test_a_parse_failure_is_retried_once(self):
        self.seed()
        good = open(self.config, "rb").read()
        with open(self.config, "wb") as f:
            f.write(good[:20])

        def repair():
            time.sleep(0.03)
            tmp = self.config + ".new"
            with open(tmp, "wb") as f:
                f.write(good)
            os.replace(tmp, self.config)

        fixer = threading.Thread(target=repair)
        fixer.start()
        self.ok("auth", "status", "--offline")
        fixer.join()

    def test_group_readable_file_warns_once_with_the_chmod_command(self):
        self.seed()
        os.chmod(self.config, 0o644)
        result = self.ok("auth", "status")
        self.assertEqual(result.err.count("chmod 600 %s" % self.config), 1, result.err)
        self.assertEqual(stat.S_IMODE(os.stat(self.config).st_mode), 0o644)

    @unittest.skipUnless(IS_ROOT, "needs root to give the file away")
    def test_file_owned_by_another_user_warns(self):
        self.seed()
        os.chown(self.config, 65534, 65534)
        result = self.ok("auth", "status", "--offline")
        self.assertIn("owned by uid 65534", result.err)

    def test_profile_without_api_url_is_a_configuration_error(self):
        self.write_doc({"version": 1, "current_profile": "x", "profiles": {"x": {"description": "no url"}}})
        result = self.fails(3, "auth", "status", "--offline")
        self.assertIn("has no api_url", result.err)

    def test_broken_profile_does_not_break_the_others(self):
        self.seed()
        doc = self.read_doc()
        doc["profiles"]["broken"] = "not an object"
        self.write_doc(doc)
        self.ok("auth", "whoami")
        self.fails(3, "-p", "broken", "auth", "whoami")

    def test_symlinked_file_target_is_updated_and_link_survives(self):
        target = os.path.join(self.tmp, "real", "creds.json")
        os.makedirs(os.path.dirname(target))
        os.makedirs(os.path.dirname(self.config))
        os.symlink(target, self.config)
        self.login()
        self.assertTrue(os.path.islink(self.config))
        with open(target) as f:
            self.assertIn("auth_token", json.load(f)["profiles"]["default"])

    def test_config_flag_creates_missing_directories(self):
        path = os.path.join(self.tmp, "new", "dir", "c.json")
        self.ok("--config", path, "config", "add-profile", "p", "--api-url", "http://x.invalid")
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        with open(path) as f:
            self.assertEqual(json.load(f)["profiles"]["p"]["api_url"], "http://x.invalid")


# === Tests: the lock =========================================================

LOCK_HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, ("%d attune auth login\n" % os.getpid()).encode())
if len(sys.argv) > 3:  # store tokens while holding the lock, like a refreshing process
    with open(sys.argv[3], "w") as f:
        f.write(sys.argv[4])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


@unittest.skipUnless(POSIX, "fcntl lock tests")
class LockTests(AttuneTestCase):
    def hold_lock(self, seconds, doc=None):
        """A real process holding the credential lock for `seconds`."""
        os.makedirs(os.path.dirname(self.config), exist_ok=True)
        argv = [sys.executable, "-c", LOCK_HOLDER, self.config + ".lock", str(seconds)]
        if doc is not None:
            argv += [self.config, json.dumps(doc)]
        holder = subprocess.Popen(argv, stdout=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        return holder

    def test_lock_file_is_kept_and_names_its_last_holder(self):
        self.ok("config", "add-profile", "p", "--api-url", "http://x.invalid")
        with open(self.config + ".lock") as f:
            self.assertEqual(f.read(), "%d attune config add-profile\n" % os.getpid())
        self.ok("config", "remove-profile", "p")
        self.assertTrue(os.path.exists(self.config + ".lock"))

    def test_waits_for_the_holder_and_says_who_it_is(self):
        holder = self.hold_lock(1.4)
        started = time.monotonic()
        result = self.ok("config", "add-profile", "p", "--api-url", "http://x.invalid")
        self.assertGreaterEqual(time.monotonic() - started, 1.0)
        self.assertIn("waiting for pid %d (attune auth login)" % holder.pid, result.err)
        self.assertEqual(self.profile("p")["api_url"], "http://x.invalid")

    def test_deadline_passes_then_goes_on_unlocked_with_a_warning(self):
        self.hold_lock(30)
        result = self.ok("config", "add-profile", "p", "--api-url", "http://x.invalid",
                         env={"ATTUNE_LOCK_TIMEOUT": "0.3"})
        self.assertIn("gave up waiting", result.err)
        self.assertEqual(self.profile("p")["api_url"], "http://x.invalid")

    def test_at_the_deadline_a_token_stored_by_the_holder_is_used(self):
        self.seed(access_left=-100)
        doc = self.read_doc()
        fresh = self.server.mint("admin")
        doc["profiles"]["default"]["auth_token"] = fresh
        doc["profiles"]["default"]["auth_token_expires_at"] = int(time.time()) + 3600
        self.hold_lock(30, doc)
        self.ok("auth", "whoami", env={"ATTUNE_LOCK_TIMEOUT": "0.3"})
        self.assertEqual(self.server.count("POST", "/auth/refresh"), 0)
        self.assertEqual(self.server.requests[-1].token, fresh)

    def test_flock_refused_falls_back_to_lockf(self):
        real = attune.fcntl
        calls = []

        class NoFlock:
            LOCK_EX, LOCK_NB, LOCK_UN = real.LOCK_EX, real.LOCK_NB, real.LOCK_UN

            @staticmethod
            def flock(fd, op):
                raise OSError(errno.ENOLCK, "No locks available")

            @staticmethod
            def lockf(fd, op):
                calls.append(op)
                return real.lockf(fd, op)

        with mock.patch.object(attune, "fcntl", NoFlock):
            self.ok("config", "add-profile", "p", "--api-url", "http://x.invalid")
        self.assertEqual(calls, [real.LOCK_EX | real.LOCK_NB, real.LOCK_UN])

    def test_no_lock_at_all_goes_on_with_a_verbose_warning(self):
        class NoLocks:
            LOCK_EX, LOCK_NB, LOCK_UN = 2, 4, 8

            @staticmethod
            def flock(fd, op):
                raise OSError(errno.ENOLCK, "No locks available")

            lockf = flock

        with mock.patch.object(attune, "fcntl", NoLocks):
            quiet = self.ok("config", "add-profile", "p", "--api-url", "http://x.invalid")
            loud = self.ok("-v", "config", "add-profile", "q", "--api-url", "http://y.invalid")
        self.assertNotIn("lock", quiet.err)
        self.assertIn("refuses locks", loud.err)
        self.assertEqual(sorted(self.read_doc()["profiles"]), ["p", "q"])


class WindowsLockTests(unittest.TestCase):
    """The msvcrt path, against a stand-in that behaves like msvcrt.locking."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="attune-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.fake = FakeMsvcrt()
        for name, value in (("fcntl", None), ("msvcrt", self.fake)):
            patcher = mock.patch.object(attune, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)
        self.path = os.path.join(self.tmp, "c.json.lock")
        self.warnings = []

    def lock(self, timeout=5.0):
        return attune.FileLock(self.path, timeout, "attune test", self.warnings.append, lambda m: None)

    def test_locks_one_byte_at_offset_zero_and_unlocks_before_closing(self):
        with self.lock() as held:
            self.assertTrue(held.held)
            self.assertEqual(self.fake.calls, [(FakeMsvcrt.LK_NBLCK, 0, 1)])
        self.assertEqual(self.fake.calls[-1], (FakeMsvcrt.LK_UNLCK, 0, 1))
        self.assertEqual(self.fake.held, {})

    def test_second_locker_waits_until_released(self):
        first = self.lock()
        first.acquire()
        threading.Timer(0.2, first.release).start()
        started = time.monotonic()
        with self.lock() as second:
            self.assertTrue(second.held)
        self.assertGreaterEqual(time.monotonic() - started, 0.15)

    def test_deadline_gives_up_with_a_warning(self):
        first = self.lock()
        first.acquire()
        self.addCleanup(first.release)
        with self.lock(timeout=0.2) as second:
            self.assertFalse(second.held)
        self.assertTrue(any("gave up waiting" in w for w in self.warnings), self.warnings)


# === Tests: which profile, URL and token =====================================

class PrecedenceTests(AttuneTestCase):
    def status(self, *argv, env=None):
        result = self.run_cli(*(argv + ("auth", "status", "--offline", "-j")), env=env)
        self.assertIn(result.code, (0, 4), result)
        return result.json()

    def test_profile_flag_env_file_default(self):
        self.seed("a")
        self.seed("b")
        self.seed("c", current=True)
        self.assertEqual(self.status("-p", "a", env={"ATTUNE_PROFILE": "b"})["profile"], "a")
        self.assertEqual(self.status(env={"ATTUNE_PROFILE": "b"})["profile"], "b")
        self.assertEqual(self.status()["profile"], "c")
        doc = self.read_doc()
        del doc["current_profile"]
        self.write_doc(doc)
        self.assertEqual(self.status()["profile"], "default")

    def test_unknown_profile_exits_3_listing_the_known_ones(self):
        self.seed("prod")
        self.seed("staging")
        result = self.fails(3, "-p", "nope", "auth", "status")
        self.assertIn("Profile 'nope' does not exist", result.err)
        self.assertIn("default, prod, staging", result.err)
        self.fails(3, "auth", "status", env={"ATTUNE_PROFILE": "nope"})

    def test_profile_flag_never_changes_the_current_profile(self):
        self.seed("a")
        self.seed("b", current=True)
        self.ok("-p", "a", "auth", "whoami")
        self.ok("auth", "refresh", "--profile", "a")
        self.assertEqual(self.read_doc()["current_profile"], "b")

    def test_api_url_flag_env_profile_default(self):
        self.seed()
        env = {"ATTUNE_API_URL": "http://env.invalid"}
        got = self.status("--api-url", "http://flag.invalid", env=env)
        self.assertEqual((got["api_url"], got["api_url_source"]), ("http://flag.invalid", "flag"))
        got = self.status(env=env)
        self.assertEqual((got["api_url"], got["api_url_source"]), ("http://env.invalid", "env"))
        got = self.status()
        self.assertEqual((got["api_url"], got["api_url_source"]), (self.server.url, "file"))
        os.remove(self.config)
        got = self.status()
        self.assertEqual((got["api_url"], got["api_url_source"]), ("http://localhost:8080", "default"))

    def token_json(self, *argv, env=None):
        return self.ok(*(argv + ("auth", "token", "--format", "json")), env=env, secrets_ok=True).json()

    def test_token_sources_in_order(self):
        stored = self.seed()["auth_token"]
        api, auth, from_file = (self.server.mint("admin") for _ in range(3))
        token_file = os.path.join(self.tmp, "token")
        with open(token_file, "w") as f:
            f.write(from_file + "\n")
        env = {"ATTUNE_API_TOKEN": api, "ATTUNE_AUTH_TOKEN": auth, "ATTUNE_TOKEN_FILE": token_file}
        got = self.token_json(env=env)
        self.assertEqual((got["token"], got["source"], got["source_detail"]),
                         (api, "env", "ATTUNE_API_TOKEN"))
        del env["ATTUNE_API_TOKEN"]
        got = self.token_json(env=env)
        self.assertEqual((got["token"], got["source_detail"]), (auth, "ATTUNE_AUTH_TOKEN"))
        del env["ATTUNE_AUTH_TOKEN"]
        got = self.token_json(env=env)
        self.assertEqual((got["token"], got["source"], got["source_detail"]),
                         (from_file, "token_file", token_file))
        got = self.token_json()
        self.assertEqual((got["token"], got["source"], got["source_detail"]), (stored, "file", "default"))

    def test_profile_flag_uses_stored_tokens_even_with_environment_tokens(self):
        stored = self.seed()["auth_token"]
        got = self.token_json("-p", "default", env={"ATTUNE_API_TOKEN": self.server.mint("admin")})
        self.assertEqual((got["token"], got["source"], got["profile_source"]), (stored, "file", "flag"))

    def test_token_file_is_reread_on_every_run(self):
        token_file = os.path.join(self.tmp, "token")
        env = {"ATTUNE_TOKEN_FILE": token_file, "ATTUNE_API_URL": self.server.url}
        for _ in range(2):
            token = self.server.mint("admin")
            with open(token_file, "w") as f:
                f.write(token)
            self.assertEqual(self.ok("auth", "token", env=env, secrets_ok=True).out, token + "\n")
            self.ok("auth", "whoami", env=env)
            self.assertEqual(self.server.requests[-1].token, token)

    def test_environment_tokens_are_refreshed_in_memory_and_never_written(self):
        now = int(time.time())
        expired = self.server.mint("admin", ttl=3600, iat=now - 4000)
        refresh = self.server.mint("admin", "refresh")
        self.ok("auth", "whoami", env={"ATTUNE_API_TOKEN": expired, "ATTUNE_REFRESH_TOKEN": refresh,
                                       "ATTUNE_API_URL": self.server.url})
        self.assertEqual(self.server.log(), ["POST /auth/refresh", "GET /auth/me"])
        self.assertFalse(os.path.exists(os.path.dirname(self.config)))

    def test_expired_environment_token_without_refresh_token_exits_4(self):
        expired = self.server.mint("admin", ttl=3600, iat=int(time.time()) - 4000)
        result = self.fails(4, "auth", "whoami", env={"ATTUNE_API_TOKEN": expired,
                                                      "ATTUNE_API_URL": self.server.url})
        self.assertIn("ATTUNE_API_TOKEN has expired", result.err)
        self.assertEqual(self.server.count(), 0)

    def test_output_flags_before_or_after_the_subcommand(self):
        self.seed()
        for argv in (["-j", "auth", "whoami"], ["auth", "-j", "whoami"], ["auth", "whoami", "-j"],
                     ["auth", "whoami", "--output", "json"], ["--output=json", "auth", "whoami"]):
            self.assertEqual(self.ok(*argv).json()["login"], "admin", argv)
        self.assertTrue(self.ok("auth", "whoami", "-y").out.startswith("id: 1\nlogin: admin\n"))
        result = self.fails(2, "-j", "auth", "whoami", "-y")
        self.assertIn("choose one output format", result.err)

    def test_stored_format_is_the_default_output(self):
        self.seed()
        self.ok("config", "set", "format", "json")
        self.assertEqual(self.ok("auth", "whoami").json()["login"], "admin")
        self.assertIn("Login:", self.ok("auth", "whoami", "--output", "table").out)


if __name__ == "__main__":
    unittest.main()
