"""apt-get update && apt-get install inside a container on the default bridge: a Debian rootfs
made on the host by mmdebstrap from the machine's own apt source, and a repository of one .deb
(built here with dpkg-deb and apt-ftparchive) served over HTTP on the host's side of the bridge.

mmdebstrap downloads ~40 MB (20-110 s here, by the mirror's and the machine's load); part of the
suite, and UNIONRUN_APT_TEST=0 leaves it out. Skipped, with the reason, where the apt source cannot
be reached.
"""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading

import pytest

from unionfs.net import engine

BIN = os.path.dirname(sys.executable)

pytestmark = [
    pytest.mark.skipif(os.environ.get("UNIONRUN_APT_TEST") == "0",
                       reason="left out with UNIONRUN_APT_TEST=0"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not engine.available(), reason="needs netavark"),
    pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="needs mmdebstrap"),
    pytest.mark.skipif(shutil.which("apt-ftparchive") is None, reason="needs apt-utils"),
]


@pytest.fixture(scope="module")
def debian(tmp_path_factory):
    root = tmp_path_factory.mktemp("debian") / "rootfs"
    # In a private mount namespace: what mmdebstrap mounts in the target (proc, sys, dev) goes
    # with it, whatever it fails to unmount.
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "mmdebstrap",
                        "--variant=apt", "--quiet", "bookworm", str(root)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.skip("mmdebstrap from the machine's apt source failed: "
                    + (r.stderr.strip().splitlines() or ["?"])[-1])
    return root


@pytest.fixture
def repo(tmp_path):
    pkg, out = tmp_path / "pkg", tmp_path / "repo"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/share/unionrun-hello").mkdir(parents=True)
    out.mkdir()
    (pkg / "DEBIAN/control").write_text(
        "Package: unionrun-hello\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: unionfs tests <tests@example.org>\nDescription: a test package\n")
    (pkg / "usr/share/unionrun-hello/hello.txt").write_text("hello from the host's repository\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg),
                    str(out / "unionrun-hello_1.0_all.deb")], check=True, capture_output=True)
    for what in ("packages", "release"):
        with open(out / what.capitalize(), "w") as f:
            subprocess.run(["apt-ftparchive", what, "."], cwd=out, stdout=f, check=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("0.0.0.0", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_apt_get_update_and_install_from_the_host_side(debian, repo, tmp_path):
    script = (f"echo 'deb [trusted=yes] http://host.containers.internal:{repo}/ ./'"
              " > /etc/apt/sources.list; rm -f /etc/apt/sources.list.d/*;"
              " apt-get update && apt-get install -y unionrun-hello"
              " && cat /usr/share/unionrun-hello/hello.txt")
    r = subprocess.run([f"{BIN}/unionrun", "--root", str(tmp_path / "run"), "run", "--rm",
                        "--layers", str(debian), "--", "sh", "-c", script],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.endswith("hello from the host's repository\n")
    # The layer is unchanged: the install went to the container's upper, gone with --rm.
    assert not (debian / "usr/share/unionrun-hello").exists()
