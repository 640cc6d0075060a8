"""tpi.host.host_shares: how many of a cluster's processes share each machine, from the
addresses the workers joined from (the master gives each process its share of the cores)."""
import socket

from tpi.host import host_shares


def test_loopback_workers_share_the_masters_machine():
    shares = host_shares({1: "127.0.0.1:40001", 2: "127.0.0.1:40002", 3: "[::1]:40003"})
    assert shares == {0: 4, 1: 4, 2: 4, 3: 4}


def test_workers_elsewhere_are_grouped_by_address():
    shares = host_shares({1: "192.0.2.7:5000", 2: "192.0.2.7:5001", 3: "192.0.2.8:5000",
                          4: "127.0.0.1:5000"})
    assert shares == {0: 2, 1: 2, 2: 2, 3: 1, 4: 2}


def test_this_machines_own_address_counts_as_local():
    try:
        own = socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        own = []
    ip = next((a for a in own if not a.startswith("127.")), None)
    if ip is None:
        return  # no non-loopback address to try here
    assert host_shares({1: f"{ip}:5000", 2: "192.0.2.9:1"}) == {0: 2, 1: 2, 2: 1}
