"""Real registries for the tests: Debian's docker-registry (the CNCF distribution registry) on 127.0.0.1 with a
free port, its own storage and log; optionally behind TLS with a CA made here (openssl), with htpasswd (Basic)
or token auth; and a TCP proxy that can cut a connection after N bytes from the server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REGISTRY = "/usr/bin/docker-registry"


def why_no_registry():
    if not os.path.exists(REGISTRY):
        return "docker-registry is not installed (apt-get install docker-registry)"
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ca(d: Path, host="127.0.0.1"):
    """A CA and a server certificate for `host` signed by it; returns (ca.crt, server.crt, server.key)."""
    d.mkdir(parents=True, exist_ok=True)
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=d)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=unionfs test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", f"/CN={host}")
    (d / "ext.cnf").write_text(f"subjectAltName=IP:{host}\n" if host[0].isdigit() else f"subjectAltName=DNS:{host}\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    return d / "ca.crt", d / "server.crt", d / "server.key"


class Registry:
    """docker-registry serving from `home`; `log` holds every request it served (level info)."""

    def __init__(self, home: Path, tls=None, htpasswd=None, token=None, relative_urls=False):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = home / "storage"
        self.log = home / "registry.log"
        cfg = ["version: 0.1", "log:", "  level: info", "  accesslog:", "    disabled: false",
               "storage:", "  filesystem:", f"    rootdirectory: {self.storage}", "  delete:", "    enabled: true",
               # Foreign layers (with URLs) accepted, so that a test can show that we refuse them.
               "validation:", "  manifests:", "    urls:", "      allow:", "        - ^http://127\\.0\\.0\\.1",
               "http:", f"  addr: 127.0.0.1:{self.port}"]
        if relative_urls:
            cfg += ["  relativeurls: true"]     # upload Locations as /v2/...?_state=..., no host
        if tls:
            cfg += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
        if htpasswd:
            cfg += ["auth:", "  htpasswd:", "    realm: test-realm", f"    path: {htpasswd}"]
        if token:
            cfg += ["auth:", "  token:", f"    realm: {token['realm']}", f"    service: {token['service']}",
                    f"    issuer: {token['issuer']}", f"    rootcertbundle: {token['rootcertbundle']}"]
        (home / "config.yml").write_text("\n".join(cfg) + "\n")
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen([REGISTRY, "serve", str(home / "config.yml")], stdout=self.logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.05)

    def log_mark(self):
        return self.log.stat().st_size

    def requests_since(self, mark):
        """The access-log lines written since `mark` (method path status)."""
        with open(self.log, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        return [line for line in text.splitlines() if '"GET /v2' in line or '"HEAD /v2' in line
                or '"PUT /v2' in line or '"POST /v2' in line or '"PATCH /v2' in line]

    def blob_file(self, digest):
        hexd = digest.split(":")[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()


class Proxy:
    """127.0.0.1:port -> target: each connection piped both ways by a thread per direction; the
    server-to-client bytes go through `_from_server`, where a subclass cuts, stalls or slows them."""

    CHUNK = 65536

    def __init__(self, target_port):
        self.target = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            threading.Thread(target=self._pipe, args=(c, s, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, True), daemon=True).start()

    def _from_server(self, dst, data, sent):
        """Pass `data` on to the client, `sent` bytes of this connection having gone before."""
        dst.sendall(data)

    def _pipe(self, src, dst, from_server):
        sent = 0
        try:
            while data := src.recv(self.CHUNK):
                if from_server:
                    self._from_server(dst, data, sent)
                    sent += len(data)
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for so in (src, dst):
                try:
                    so.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                so.close()

    def close(self):
        self.sock.close()


class CuttingProxy(Proxy):
    """The server-to-client stream of a connection is cut after `cut_after` bytes, for the first
    `cuts` connections that get that far (cuts=None: every one); with stall=True it stops there
    instead, the connection left open."""

    def __init__(self, target_port, cut_after, cuts=1, stall=False):
        self.cut_after, self.cuts, self.stall = cut_after, cuts, stall
        self.stalled, self._closed = threading.Event(), threading.Event()
        self.done_cuts = 0
        self._lock = threading.Lock()
        super().__init__(target_port)

    def _from_server(self, dst, data, sent):
        with self._lock:
            may_cut = self.cuts is None or self.done_cuts < self.cuts
            if may_cut and sent + len(data) > self.cut_after:
                self.done_cuts += 1
                dst.sendall(data[:self.cut_after - sent])
                if self.stall:
                    self.stalled.set()
                    self._closed.wait()     # the connection left open, silent, until close()
                raise ConnectionAbortedError
        dst.sendall(data)

    def close(self):
        self._closed.set()
        super().close()


def http_ok(url, timeout=2):
    try:
        urllib.request.urlopen(url, timeout=timeout)
        return True
    except Exception:
        return False


def have(prog):
    return shutil.which(prog) is not None


def _b64url(data: bytes) -> str:
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A token issuer for distribution's `auth: token`: HTTP on 127.0.0.1, JWTs signed RS256 (openssl) with
    a key whose self-signed certificate is the registry's rootcertbundle and travels in the x5c header.
    Users in `users` get every action they ask for; anonymous requests get pull only. `requests` keeps
    (user, scopes) of each token handed out."""

    SERVICE, ISSUER = "unionfs-test-registry", "unionfs-test-issuer"

    def __init__(self, d: Path, users):
        import http.server
        import json
        d.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = d / "token.key", d / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                        "-out", str(self.cert), "-days", "2", "-subj", "/CN=unionfs test token issuer"],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True,
                             capture_output=True).stdout
        import base64
        self.x5c = base64.b64encode(der).decode()
        self.users, self.requests = users, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                import urllib.parse
                q = urllib.parse.urlparse(self.path)
                params = urllib.parse.parse_qs(q.query)
                user = None
                h = self.headers.get("Authorization", "")
                if h.startswith("Basic "):
                    u, _, p = base64.b64decode(h[6:]).decode().partition(":")
                    if server.users.get(u) != p:
                        self.send_response(401)
                        self.end_headers()
                        return
                    user = u
                scopes = [s for v in params.get("scope", []) for s in v.split(" ") if s]
                server.requests.append((user, scopes))
                access = []
                for s in scopes:
                    kind, name, actions = s.split(":", 2) if s.count(":") >= 2 else (s, "", "")
                    acts = [a for a in actions.split(",") if a and (user or a == "pull")]
                    access.append({"type": kind, "name": name, "actions": acts})
                body = json.dumps({"token": server.sign(user or "", access)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def sign(self, sub, access):
        import json
        import secrets
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.ISSUER, "sub": sub, "aud": self.SERVICE, "exp": now + 600, "nbf": now - 60,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                             check=True, capture_output=True).stdout
        return signing_input + "." + _b64url(sig)

    def registry_config(self):
        return {"realm": self.realm, "service": self.SERVICE, "issuer": self.ISSUER,
                "rootcertbundle": str(self.cert)}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class RedirectingFront:
    """An HTTP front of a registry that wants Basic auth (user:password) and answers every blob GET with a
    307 to a 'blob storage' server on another port, which serves the blob and keeps the headers it got
    (`storage_headers`): what a registry on S3 does."""

    def __init__(self, registry_port, user, password):
        import base64
        import http.server
        import urllib.error
        import urllib.request
        want = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        upstream = f"http://127.0.0.1:{registry_port}"
        self.storage_headers = []
        front = self

        def relay(handler, url, head=False):
            try:
                r = urllib.request.urlopen(urllib.request.Request(url, method="HEAD" if head else "GET",
                                                                  headers={k: v for k, v in handler.headers.items()
                                                                           if k in ("Accept", "Range")}))
                status, headers, body = r.status, r.headers, r.read()
            except urllib.error.HTTPError as e:
                status, headers, body = e.code, e.headers, e.read()
            handler.send_response(status)
            for k in ("Content-Type", "Docker-Content-Digest", "Content-Range"):
                if headers.get(k):
                    handler.send_header(k, headers[k])
            handler.send_header("Content-Length", headers.get("Content-Length") or str(len(body)))
            handler.end_headers()
            if not head:
                handler.wfile.write(body)

        class Storage(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                front.storage_headers.append(dict(self.headers.items()))
                relay(self, upstream + self.path[len("/storage"):])

        class Front(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _authorised(self):
                if self.headers.get("Authorization") == want:
                    return True
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="front"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return False

            def do_HEAD(self):
                if self._authorised():
                    relay(self, upstream + self.path, head=True)

            def do_GET(self):
                if not self._authorised():
                    return
                if "/blobs/" in self.path:
                    self.send_response(307)
                    self.send_header("Location", f"http://127.0.0.1:{front.storage_port}/storage{self.path}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                relay(self, upstream + self.path)

        self.storage = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Storage)
        self.storage_port = self.storage.server_address[1]
        self.front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Front)
        self.host = f"127.0.0.1:{self.front.server_address[1]}"
        for srv in (self.storage, self.front):
            threading.Thread(target=srv.serve_forever, daemon=True).start()

    def close(self):
        for srv in (self.front, self.storage):
            srv.shutdown()
            srv.server_close()


class RangeFront:
    """An HTTP front of a registry whose first GET of blob `digest` sends half the body and closes; a
    Range request after it is answered as `mode` says: "ignore" (a 200 with the whole blob, as a server
    without Range support) or "elsewhere" (a 206 whose Content-Range starts at 0, not where asked).
    `served` keeps (Range header, status) of each GET of that blob."""

    def __init__(self, registry_port, digest, mode):
        import http.server
        import urllib.request
        upstream = f"http://127.0.0.1:{registry_port}"
        self.served = []
        front = self

        class Front(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _relay(self, head=False):
                try:
                    r = urllib.request.urlopen(urllib.request.Request(
                        upstream + self.path, method="HEAD" if head else "GET",
                        headers={k: v for k, v in self.headers.items() if k == "Accept"}))
                    status, headers, body = r.status, r.headers, r.read()
                except urllib.error.HTTPError as e:
                    status, headers, body = e.code, e.headers, e.read()
                return status, headers, body

            def _send(self, status, headers, body, length=None, extra=()):
                self.send_response(status)
                for k in ("Content-Type", "Docker-Content-Digest"):
                    if headers.get(k):
                        self.send_header(k, headers[k])
                for k, v in extra:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()

            def do_HEAD(self):
                status, headers, body = self._relay(head=True)
                self._send(status, headers, b"", headers.get("Content-Length") or 0)

            def do_GET(self):
                status, headers, body = self._relay()
                if not self.path.endswith("/blobs/" + digest):
                    self._send(status, headers, body)
                    self.wfile.write(body)
                    return
                rng = self.headers.get("Range")
                if not front.served:                  # the first: half, then the connection drops
                    front.served.append((rng, 200))
                    self._send(200, headers, body)
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if rng and mode == "elsewhere":
                    front.served.append((rng, 206))
                    self._send(206, headers, body, extra=[("Content-Range", f"bytes 0-{len(body) - 1}/{len(body)}")])
                else:
                    front.served.append((rng, 200))
                    self._send(200, headers, body)
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Front)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
