"""Where registry credentials and certificates live, as containers/image and docker keep them.

Credentials: containers' auth.json ($REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json, else
/run/containers/UID/auth.json), which login writes, then docker's ~/.docker/config.json, read only.
Certificates: DIR/HOST:PORT/*.crt (CAs), *.cert with *.key (client) for DIR in /etc/containers/certs.d
and /etc/docker/certs.d, or the one --cert-dir given.
"""

import base64
import json
import os
import ssl
import tempfile

CERT_DIRS = ("/etc/containers/certs.d", "/etc/docker/certs.d")
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")


class AuthError(ValueError):
    """Unreadable credentials or certificates; the message is one line."""


def auth_file():
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return os.environ["REGISTRY_AUTH_FILE"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json")
    return f"/run/containers/{os.getuid()}/auth.json"


def _read(path):
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise AuthError(f"cannot read credentials in {path}: {e}") from None
    return obj if isinstance(obj, dict) else {}


def _keys(registry, repository):
    """The auths keys that may hold credentials for REGISTRY/REPOSITORY, most specific first."""
    keys = []
    parts = repository.split("/")
    for i in range(len(parts), 0, -1):
        keys.append(f"{registry}/{'/'.join(parts[:i])}")
    keys.append(registry)
    if registry == "docker.io":
        keys += list(_HUB_KEYS)
    return keys


def credentials(registry, repository=""):
    """(user, password) for the registry, or None."""
    docker = os.path.join(os.path.expanduser("~"), ".docker", "config.json")
    for path in (auth_file(), docker):
        auths = _read(path).get("auths") or {}
        for key in _keys(registry, repository):
            entry = auths.get(key) or auths.get("https://" + key) or auths.get("http://" + key)
            if entry and entry.get("auth"):
                try:
                    user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    raise AuthError(f"malformed credentials for {key} in {path}") from None
                return user, pw
    return None


def store_credentials(registry, user, password):
    path = auth_file()
    obj = _read(path)
    obj.setdefault("auths", {})[registry] = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
    _write(path, obj)


def remove_credentials(registry):
    """Forget the registry's credentials; False when there were none."""
    path = auth_file()
    obj = _read(path)
    if registry not in (obj.get("auths") or {}):
        return False
    del obj["auths"][registry]
    _write(path, obj)
    return True


def _write(path, obj):
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".auth")
    with open(fd, "w") as f:     # mkstemp's 0600: the file holds passwords
        json.dump(obj, f, indent=1)
    os.rename(tmp, path)


def ssl_context(registry, cert_dir=None):
    """The TLS context for a registry: the system's CAs plus those in its certs.d directory."""
    ctx = ssl.create_default_context()
    for base in ([cert_dir] if cert_dir else CERT_DIRS):
        d = os.path.join(base, registry)
        try:
            names = sorted(os.listdir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            for n in names:
                if n.endswith(".crt"):
                    ctx.load_verify_locations(os.path.join(d, n))
                elif n.endswith(".cert"):
                    ctx.load_cert_chain(os.path.join(d, n), os.path.join(d, n[:-5] + ".key"))
        except (OSError, ssl.SSLError) as e:
            raise AuthError(f"bad certificate in {d}: {e}") from None
    return ctx
