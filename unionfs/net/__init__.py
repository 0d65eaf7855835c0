"""Container networks: bridges with NAT, DNS by name and published ports, through netavark and
aardvark-dns (podman 4's network stack); /etc/hosts and /etc/resolv.conf; the network store.

    store.py      networks as JSON under the unionrun root (locked), subnets, address allocation
    engine.py     netavark setup/teardown of one container, our own config dir and names
    netns.py      the container's network namespace pinned to a file, so teardown outlives it
    files.py      /etc/hosts and /etc/resolv.conf, kept in the container's state directory
    ports.py      -p/-P: parsing, holding the host ports, random ports
    container.py  what the supervisor and rm call: prepare, attach, release
    cli.py        `unionrun network ...` and `unionrun port`
"""


class NetError(Exception):
    """A network cannot be made, used or removed: one line for the user."""
