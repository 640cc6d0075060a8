"""`tpi webui`: serve the chat page and relay to a master's HTTP API."""
from __future__ import annotations

import logging
import signal
import threading

from tpi.settings import WebUISettings, split_hostport

log = logging.getLogger("tpi.webui")


def run(settings: WebUISettings) -> int:
    from tpi.wsgi import make_server
    from tpi_webui.app import create_app
    from tpi_webui.relay import Master

    host, port = split_hostport(settings.listen, 8080)
    master = Master(settings.master_url, settings.api_key)
    # Each open chat stream holds a request thread while the page polls the cluster status.
    httpd = make_server(create_app(master), host, port)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start())
    log.info("web UI on http://%s:%d, relaying to %s", host, httpd.port, master.url)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
