"""Bounds on connections, so slow or idle clients cannot hold the server: the time to send
a request's headers and body, idle keep-alive time, the number of connections, the size
of the headers, and the time a shutdown waits for requests in flight. Defaults follow
nginx (client_header_timeout and client_body_timeout 60 s, keepalive_timeout 75 s, large
headers 8 KB x 4) with shorter waits, as this server's requests are small.

    config = server_config(app, "127.0.0.1", 8000, ConnectionLimits(header_timeout=10))
    uvicorn.Server(config).run()
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ConnectionLimits:
    header_timeout: float = 10.0  # seconds from connecting (or a response's end) to a request's headers
    body_timeout: float = 60.0  # seconds from the headers to the body's last byte (408 after)
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 256  # open connections and requests in flight; 503 beyond
    max_header_bytes: int = 32 * 1024
    shutdown_timeout: float = 10.0  # seconds a shutdown waits for requests in flight


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request headers have not all
    arrived `seconds` after it opened or after its previous response (uvicorn itself only
    times out idle keep-alive connections, so a client sending a header a minute held its
    connection for ever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._between_requests():
                self._arm()  # the first bytes of a request stop the keep-alive timer; this one runs on
            super().data_received(data)
            if not self._between_requests():
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeout


def server_config(app, host: str, port: int, limits: ConnectionLimits, log_level: str = "warning"):
    """A uvicorn.Config serving `app` within `limits` (the app's own BodyLimit bounds the
    body's time and size)."""
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=header_timeout_protocol(limits.header_timeout),
        timeout_keep_alive=max(1, round(limits.keep_alive)), limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_graceful_shutdown=max(1, round(limits.shutdown_timeout)))
