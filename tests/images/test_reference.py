"""Image references normalised as docker's distribution/reference does (in-process)."""

import pytest

from unionfs.images import reference as r

CASES = {
    "busybox": "docker.io/library/busybox:latest",
    "busybox:1": "docker.io/library/busybox:1",
    "library/busybox:1": "docker.io/library/busybox:1",
    "docker.io/busybox": "docker.io/library/busybox:latest",
    "index.docker.io/library/busybox": "docker.io/library/busybox:latest",
    "user/app": "docker.io/user/app:latest",
    "localhost/busybox:1": "localhost/busybox:1",
    "localhost:5000/a/b": "localhost:5000/a/b:latest",
    "127.0.0.1:5000/busybox:1.36": "127.0.0.1:5000/busybox:1.36",
    "quay.io/podman/hello": "quay.io/podman/hello:latest",
    "Host/foo": "Host/foo:latest",     # an upper-case first component is a host
    "foo/bar/baz:x": "docker.io/foo/bar/baz:x",
    "busybox@sha256:" + "a" * 64: "docker.io/library/busybox@sha256:" + "a" * 64,
    "busybox:1@sha256:" + "b" * 64: "docker.io/library/busybox:1@sha256:" + "b" * 64,
    "[::1]:5000/x": "[::1]:5000/x:latest",
}


@pytest.mark.parametrize("text", sorted(CASES))
def test_normalised_as_docker_does(text):
    assert str(r.parse(text)) == CASES[text]


def test_parts_and_api_host():
    ref = r.parse("busybox")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == ("docker.io", "library/busybox", "latest", None)
    assert ref.api_host == "registry-1.docker.io" and ref.ref == "latest"
    pinned = r.parse("127.0.0.1:5000/x:1@sha256:" + "c" * 64)
    assert pinned.api_host == "127.0.0.1:5000" and pinned.ref == "sha256:" + "c" * 64
    assert r.parse("busybox", default_tag=False).tag is None
    # busybox:1 and localhost/busybox:1 are different repositories under docker's rules.
    assert r.parse("busybox:1").name != r.parse("localhost/busybox:1").name


@pytest.mark.parametrize("bad", ["", " busybox", "Busybox", "busybox:", "busybox:-x", "busybox@sha256:12",
                                 "a//b", "/busybox", "busybox/", "127.0.0.1:5000/", "ex ample/x",
                                 "x" * 256, "docker.io/UP/x", "host:port/x"])
def test_refused_with_one_line(bad):
    with pytest.raises(r.ReferenceError) as e:
        r.parse(bad)
    assert "\n" not in str(e.value) and "invalid reference format" in str(e.value)


def test_familiar_and_loopback():
    assert r.familiar("docker.io/library/busybox:1") == "busybox:1"
    assert r.familiar("docker.io/user/app:latest") == "user/app:latest"
    assert r.familiar("127.0.0.1:5000/x:1") == "127.0.0.1:5000/x:1"
    for host in ("127.0.0.1:5000", "127.3.4.5", "localhost:80", "localhost", "[::1]:5000"):
        assert r.is_loopback(host), host
    for host in ("docker.io", "10.0.0.1:5000", "localhost.example.com", "128.0.0.1"):
        assert not r.is_loopback(host), host
