"""A network camera for the emulated scene: rendered frames served as an MJPEG stream over HTTP.

Many IP cameras and `ffmpeg`/`mjpg-streamer` serve this format: one HTTP response of type
multipart/x-mixed-replace whose parts are JPEG images. OpenCV's FFmpeg backend reads it as a video stream,
so `robot.sensors.camera.Camera("http://HOST:PORT/camera.mjpg", ...)` runs against it unchanged.

One thread renders at `fps` and keeps the latest JPEG; each client gets every new frame (a slow client
skips frames rather than queueing them). Rendering is costly, so the thread renders only while at least
one client is streaming (and once at start, so errors in the renderer surface at `start()`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

import cv2
import numpy as np

log = logging.getLogger(__name__)

PATH = "/camera.mjpg"
BOUNDARY = "reverieframe"
JPEG_QUALITY = 90
CLIENT_WAIT_S = 1.0  # a streaming client rechecks for shutdown at least this often


class MjpegServer:
    """Serves `render()` (HxWx3 uint8 RGB) at `fps` as http://host:port/camera.mjpg; a context manager."""

    def __init__(self, render: Callable[[], np.ndarray], fps: float, host: str = "127.0.0.1", port: int = 0) -> None:
        if not fps > 0:
            raise ValueError(f"MjpegServer: fps must be > 0, got {fps}")
        self.render, self.fps, self.host, self.port = render, float(fps), host, port
        self.frames = 0  # frames rendered
        self.errors = 0  # renders that failed (logged; the stream keeps its last frame)
        self._jpeg: bytes | None = None
        self._index = 0
        self._clients = 0
        self._new = threading.Condition()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("MjpegServer: not started, so it has no port yet")
        return f"http://{self.host}:{self._server.server_address[1]}{PATH}"

    @property
    def clients(self) -> int:
        """Clients streaming now."""
        with self._new:
            return self._clients

    def start(self) -> MjpegServer:
        """Render the first frame (a failing renderer raises here), bind the port and start serving."""
        if self._server is not None:
            raise RuntimeError("MjpegServer: already started")
        self._publish(self._encode(self.render()))
        try:
            self._server = ThreadingHTTPServer((self.host, self.port), _handler(self))
        except OSError as exc:
            raise OSError(f"MjpegServer: cannot listen on {self.host}:{self.port}: {exc}") from exc
        self._server.daemon_threads = True
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                             name=f"mjpeg-http {self.url}", daemon=True),
            threading.Thread(target=self._render_loop, name=f"mjpeg-render {self.url}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        """Stop rendering and serving; streaming clients see the connection end. Safe to call repeatedly."""
        self._stop.set()
        with self._new:
            self._new.notify_all()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []

    def __enter__(self) -> MjpegServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ----- frames -------------------------------------------------------------------------------
    @staticmethod
    def _encode(rgb: np.ndarray) -> bytes:
        image = np.asarray(rgb)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"MjpegServer: render() returned {image.dtype} {image.shape}; expected HxWx3 uint8 RGB")
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise ValueError(f"MjpegServer: JPEG encoding of a {image.shape} frame failed")
        return data.tobytes()

    def _publish(self, jpeg: bytes) -> None:
        with self._new:
            self._jpeg = jpeg
            self._index += 1
            self.frames += 1
            self._new.notify_all()

    def _render_loop(self) -> None:
        period = 1.0 / self.fps
        due = time.monotonic()
        while not self._stop.is_set():
            with self._new:  # idle while nobody watches
                while self._clients == 0 and not self._stop.is_set():
                    self._new.wait(CLIENT_WAIT_S)
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            due = max(due + period, time.monotonic() - period)  # after a stall: no burst to catch up
            try:
                self._publish(self._encode(self.render()))
            except Exception:
                self.errors += 1
                log.exception("MjpegServer: render failed; clients keep the previous frame")
                if self._stop.wait(1.0):
                    return

    def _next(self, after: int) -> tuple[bytes, int] | None:
        """The first frame newer than index `after`, waiting for it; None once the server stops."""
        with self._new:
            while self._index <= after and not self._stop.is_set():
                self._new.wait(CLIENT_WAIT_S)
            if self._stop.is_set() or self._jpeg is None:
                return None
            return self._jpeg, self._index

    def _watch(self, delta: int) -> None:
        with self._new:
            self._clients += delta
            self._new.notify_all()


def _handler(server: MjpegServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the stream ends when the connection closes

        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            if self.path.split("?")[0] != PATH:
                self.send_error(404, f"no such stream; the camera is at {PATH}")
                return
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-cache, no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            server._watch(+1)
            try:
                index = server._index - 1  # start with the latest frame at once
                while True:
                    got = server._next(index)
                    if got is None:
                        return
                    jpeg, index = got
                    head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n").encode()
                    self.wfile.write(head + jpeg + b"\r\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
                return  # the client went away: normal for a stream
            finally:
                server._watch(-1)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
            log.debug("MjpegServer %s: " + format, self.address_string(), *args)

    return Handler
