"""`tpi webui`: serve the chat page and relay to a master's HTTP API."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

log = logging.getLogger("tpi.webui")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--master", default=os.environ.get("TPI_MASTER_URL", "http://127.0.0.1:8000"),
                   help="URL of the master's HTTP API (default $TPI_MASTER_URL or http://127.0.0.1:8000)")
    p.add_argument("--listen", default="127.0.0.1:8080",
                   help="HOST:PORT to serve the page on (default 127.0.0.1:8080; 0.0.0.0:8080 in a container)")
    p.add_argument("--api-key", default=os.environ.get("TPI_API_KEY"),
                   help="the master's API key, if it requires one (default $TPI_API_KEY)")


def run(args) -> int:
    from werkzeug.serving import make_server

    from tpi_webui.app import create_app
    from tpi_webui.relay import Master

    host, _, port = args.listen.rpartition(":")
    host, port = (host or "127.0.0.1"), int(port or 8080)
    master = Master(args.master, args.api_key)
    # Threaded: each open chat stream holds a thread while the page polls the cluster status.
    httpd = make_server(host, port, create_app(master), threaded=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start())
    log.info("web UI on http://%s:%d, relaying to %s", host, httpd.server_port, master.url)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0
