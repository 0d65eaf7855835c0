"""A registry as a transport: the distribution API (/v2/) over httpx, with Basic and Bearer-token auth.

Manifests by tag or digest, blobs streamed to a file with the digest computed as bytes arrive and resumed
with Range after a dropped connection, uploads with HEAD first and cross-repository mount.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import ssl
import threading

import httpx

from . import auth, manifest, reference
from .copy import TransportError

RETRIES = 3                         # fresh tries of a blob download after a dropped connection
CHUNK = int(os.environ.get("UNIONRUN_PUSH_CHUNK", 0)) or None   # chunked uploads of this size (else monolithic)
_USER_AGENT = "unionrun/0.1 (httpx)"
_DROPPED = (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.WriteError)


class RegistryError(TransportError):
    """A registry refused or failed us; the message is one line for the user."""


def _challenge(header):
    """WWW-Authenticate: `Bearer realm="...",service="...",scope="..."` -> ("bearer", {...})."""
    scheme, _, rest = header.partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class _Auth(httpx.Auth):
    """Answers 401 challenges: Basic with the credentials, or a Bearer token fetched from the realm
    (anonymously without credentials); the answer is remembered per repository and access."""

    def __init__(self, registry):
        self.r = registry

    def auth_flow(self, request):
        key = self.r._scope_key(request)
        cached = self.r._answers.get(key)
        if cached:
            request.headers["Authorization"] = cached
        response = yield request
        if response.status_code != 401 or "WWW-Authenticate" not in response.headers:
            return
        answer = self.r._answer(_challenge(response.headers["WWW-Authenticate"]), request)
        if answer is None or answer == cached:
            return
        self.r._answers[key] = answer
        request.headers["Authorization"] = answer
        yield request


class Registry:
    def __init__(self, registry, tls_verify=True, creds=None, cert_dir=None, repository=""):
        self.registry = registry
        self.host = reference.HUB_API if registry == reference.DEFAULT_REGISTRY else registry
        self.creds = creds if creds is not None else auth.credentials(registry, repository)
        self.tls_verify = tls_verify
        verify = self._verify = auth.ssl_context(registry, cert_dir) if tls_verify else False
        # Redirects (to blob storage) are followed by httpx, which drops Authorization for another origin.
        self.client = httpx.Client(verify=verify, follow_redirects=True, auth=_Auth(self),
                                   timeout=httpx.Timeout(60, connect=15),
                                   headers={"User-Agent": _USER_AGENT})
        self._answers = {}
        self._mounts = {}        # repository -> where it may mount from (added to the token's scope)
        self._base = None
        self._lock = threading.Lock()

    def close(self):
        self.client.close()

    # --- the connection: TLS, or plain HTTP on loopback (and with --tls-verify=false) as docker does

    def base(self):
        with self._lock:
            if self._base is None:
                self._base = self._probe()
            return self._base

    def _probe(self):
        url = f"https://{self.host}/v2/"
        try:
            self.client.get(url, auth=None)
            return f"https://{self.host}"
        except httpx.ConnectError as e:
            verify_failed = "CERTIFICATE_VERIFY_FAILED" in str(e) or isinstance(e.__cause__,
                                                                                ssl.SSLCertVerificationError)
            if verify_failed or not (reference.is_loopback(self.registry) or not self.tls_verify):
                # A TLS handshake answered with something else: most likely a plain-HTTP registry.
                plain = not verify_failed and "SSL" in str(e)
                raise self._unreachable(e, " (plain HTTP is used only on loopback or with --tls-verify=false)"
                                        if plain else "") from None
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        try:
            self.client.get(f"http://{self.host}/v2/", auth=None)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        return f"http://{self.host}"

    def _unreachable(self, e, hint=""):
        return RegistryError(f"cannot reach registry {self.registry}: {str(e) or type(e).__name__}{hint}")

    # --- auth

    def _scope_key(self, request):
        m = re.match(r"/v2/(.+?)/(manifests|blobs|tags)/", request.url.path)
        repo = m.group(1) if m else ""
        return repo, request.method not in ("GET", "HEAD")

    def _answer(self, challenge, request):
        scheme, params = challenge
        if scheme == "basic":
            return _basic(*self.creds) if self.creds else None
        if scheme != "bearer" or "realm" not in params:
            return None
        scopes = [s for s in params.get("scope", "").split(" ") if s]
        repo, push = self._scope_key(request)
        if push and repo in self._mounts:
            scopes.append(f"repository:{self._mounts[repo]}:pull")
        query = [("service", params["service"])] if "service" in params else []
        query += [("scope", s) for s in scopes]
        try:
            r = httpx.get(params["realm"], params=query, auth=httpx.BasicAuth(*self.creds) if self.creds else None,
                          verify=self._verify, timeout=30,
                          headers={"User-Agent": _USER_AGENT})
        except httpx.HTTPError as e:
            raise RegistryError(f"token server {params['realm']}: {e}") from None
        if r.status_code != 200:
            raise RegistryError(f"token server {params['realm']}: {r.status_code} {r.reason_phrase}"
                                + (" (wrong credentials?)" if r.status_code == 401 else ""))
        try:
            body = r.json()
            token = body.get("token") or body["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise RegistryError(f"token server {params['realm']} answered no token") from None
        return f"Bearer {token}"

    # --- requests

    def _url(self, path):
        return self.base() + path

    def _request(self, method, path_or_url, **kw):
        url = path_or_url if "://" in str(path_or_url) else self._url(path_or_url)
        try:
            return self.client.request(method, url, **kw)
        except _DROPPED as e:
            raise RegistryError(f"{method} {url}: connection dropped ({e or type(e).__name__})") from None
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None

    def _fail(self, r, what):
        detail = ""
        try:
            errors = r.json().get("errors") or []
            if errors:
                detail = ": " + "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors)
        except (ValueError, AttributeError):
            pass
        hint = ""
        if r.status_code == 401:
            hint = " (give --creds USER[:PASS] or unionrun login)" if not self.creds else " (wrong credentials?)"
        return RegistryError(f"{what}: {r.status_code} {r.reason_phrase}{detail}{hint}")

    def get_manifest(self, repo, ref):
        """(bytes, media type, digest) of a manifest or index; checked against a pinned digest."""
        r = self._request("GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": manifest.ACCEPT})
        what = f"manifest {self.registry}/{repo}:{ref}".replace(":sha256:", "@sha256:")
        if r.status_code != 200:
            raise self._fail(r, what)
        data = r.content
        if len(data) > manifest.MAX_MANIFEST:
            raise RegistryError(f"{what}: larger than {manifest.MAX_MANIFEST} bytes")
        digest = manifest.digest_of(data)
        if ref.startswith("sha256:") and digest != ref:
            raise RegistryError(f"{what}: digest mismatch (got {digest})")
        mt = manifest.media_type(data, r.headers.get("Content-Type", "").split(";")[0].strip())
        return data, mt, digest

    def head_manifest(self, repo, ref):
        """The digest a tag points at now (Docker-Content-Digest of a HEAD), or None when not told."""
        r = self._request("HEAD", f"/v2/{repo}/manifests/{ref}", headers={"Accept": manifest.ACCEPT})
        digest = r.headers.get("Docker-Content-Digest")
        return digest if r.status_code == 200 and digest else None

    def get_blob_bytes(self, repo, digest, limit=manifest.MAX_MANIFEST * 4):
        r = self._request("GET", f"/v2/{repo}/blobs/{digest}")
        if r.status_code != 200:
            raise self._fail(r, f"blob {digest[:19]} of {self.registry}/{repo}")
        if len(r.content) > limit or manifest.digest_of(r.content) != digest:
            raise RegistryError(f"blob {digest} of {self.registry}/{repo}: digest mismatch "
                                f"(got {manifest.digest_of(r.content)})")
        return r.content

    def fetch_blob(self, repo, digest, size, path, progress=None):
        """Stream a blob into `path`, hashing as bytes arrive; after a dropped connection ask for the rest
        (Range) and continue only on a 206 that starts where we stopped. Raises unless the digest matches."""
        what = f"blob {digest[:19]} of {self.registry}/{repo}"
        h, n, drops = hashlib.sha256(), 0, 0
        with open(path, "wb") as out:
            while True:
                headers = {"Range": f"bytes={n}-"} if n else {}
                try:
                    with self.client.stream("GET", self._url(f"/v2/{repo}/blobs/{digest}"),
                                            headers=headers) as r:
                        if n and r.status_code == 206 and \
                                r.headers.get("Content-Range", "").startswith(f"bytes {n}-"):
                            pass
                        elif r.status_code == 200 or n:
                            # Anything but the rest we asked for: start over, from this answer if it is
                            # the whole blob, else with a plain GET.
                            out.seek(0)
                            out.truncate()
                            h, n = hashlib.sha256(), 0
                            if r.status_code != 200:
                                drops += 1
                                if drops > RETRIES:
                                    raise RegistryError(f"{what}: the registry did not resume ({r.status_code})")
                                continue
                        else:
                            r.read()
                            raise self._fail(r, what)
                        # As bytes arrive (a chunk size would hold back what came before a drop:
                        # the resume would start over instead of where the bytes stopped).
                        for chunk in r.iter_raw():
                            out.write(chunk)
                            h.update(chunk)
                            n += len(chunk)
                            if n > size:
                                raise RegistryError(f"{what}: more bytes than the manifest's {size}")
                            if progress:
                                progress(n)
                    if n < size:
                        raise httpx.RemoteProtocolError("response ended early")
                    break
                except _DROPPED as e:
                    drops += 1
                    if drops > RETRIES:
                        raise RegistryError(f"{what}: connection dropped {drops} times, last after {n} bytes "
                                            f"({e or type(e).__name__})") from None
                except httpx.HTTPError as e:
                    raise self._unreachable(e) from None
        got = "sha256:" + h.hexdigest()
        if got != digest:
            raise RegistryError(f"{what}: digest mismatch (got {got}): corrupted on the registry or the way")

    def has_blob(self, repo, digest):
        r = self._request("HEAD", f"/v2/{repo}/blobs/{digest}")
        if r.status_code in (200, 404):
            return r.status_code == 200
        raise self._fail(r, f"HEAD blob {digest[:19]} of {self.registry}/{repo}")

    def put_blob(self, repo, digest, size, path, mount_from=None, progress=None):
        """Upload a blob unless there; returns "exists", "mounted" or "uploaded"."""
        if self.has_blob(repo, digest):
            return "exists"
        what = f"upload of {digest[:19]} to {self.registry}/{repo}"
        params = {}
        if mount_from:
            self._mounts[repo] = mount_from
            params = {"mount": digest, "from": mount_from}
        r = self._request("POST", f"/v2/{repo}/blobs/uploads/", params=params)
        if r.status_code == 201 and mount_from:
            return "mounted"
        if r.status_code != 202 or "Location" not in r.headers:
            raise self._fail(r, what)
        location = r.url.join(r.headers["Location"])   # may be relative, and carry a query already
        with open(path, "rb") as f:
            if CHUNK and size > CHUNK:
                start = 0
                while chunk := f.read(CHUNK):
                    r = self._request("PATCH", location, content=chunk, headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{start}-{start + len(chunk) - 1}"})
                    if r.status_code != 202 or "Location" not in r.headers:
                        raise self._fail(r, what)
                    location = r.url.join(r.headers["Location"])
                    start += len(chunk)
                    if progress:
                        progress(start)
                body = b""
            else:
                body = _reading(f, progress)
            r = self._request("PUT", location.copy_merge_params({"digest": digest}), content=body,
                              headers={"Content-Type": "application/octet-stream",
                                       **({"Content-Length": str(size)} if body != b"" else {})})
        if r.status_code != 201:
            raise self._fail(r, what)
        return "uploaded"

    def put_manifest(self, repo, ref, data, media_type):
        r = self._request("PUT", f"/v2/{repo}/manifests/{ref}", content=data,
                          headers={"Content-Type": media_type})
        if r.status_code != 201:
            raise self._fail(r, f"manifest {self.registry}/{repo}:{ref}")

    def ping(self):
        """Check the credentials (login): GET /v2/ through the auth flow."""
        r = self._request("GET", "/v2/")
        if r.status_code == 401 and "bearer" in r.headers.get("WWW-Authenticate", "").lower():
            self._answer(_challenge(r.headers["WWW-Authenticate"]), r.request)
            return
        if r.status_code != 200:
            raise self._fail(r, f"login to {self.registry}")


def _basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _reading(f, progress):
    n = 0
    while chunk := f.read(1 << 20):
        n += len(chunk)
        if progress:
            progress(n)
        yield chunk
