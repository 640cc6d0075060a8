"""A real `tpi worker` (the CLI's own code) whose step replies carry a malformed time
breakdown, as a buggy or hostile worker could send (issue 16, finding 10): compute_s NaN
(`nan`) or a string (`string`). Run as `python bad_breakdown_worker.py nan|string worker-args...`;
only Breakdown.totals is replaced."""
from __future__ import annotations

import sys

from tpi.timing import Breakdown

if __name__ == "__main__":
    bad = {"nan": float("nan"), "string": "slow"}[sys.argv[1]]
    Breakdown.totals = lambda self: {"compute_s": bad, "comm_s": 0.0, "disk_wait_s": 0.0}
    from tpi_cli.main import main

    sys.exit(main(sys.argv[2:]))
