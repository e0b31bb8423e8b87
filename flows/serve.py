"""A REST scoring server for a registered model: MLflow's own scoring app (``/invocations``,
``/ping``, the same request and response formats as ``mlflow models serve``), run by uvicorn
with ``--workers`` processes, with a limit on the request body (413 beyond it: a 10 MB body
would otherwise be parsed whole before the model sees its last rows).

    python -m flows.serve NAME [--alias champion | --version N] [--port 5001] [--workers 2]

The model is downloaded once, before the workers start; each worker loads it from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

from uvicorn.protocols.http.h11_impl import H11Protocol

MODEL_PATH = "RNNFLOW_SERVE_MODEL_PATH"
MAX_BODY = "RNNFLOW_SERVE_MAX_BODY_BYTES"


def create_app():
    """The uvicorn factory each worker calls: MLflow's scoring app for the downloaded model,
    behind the body-size limit."""
    import mlflow.pyfunc
    import torch
    from mlflow.pyfunc import scoring_server

    # one thread per worker: a one-series forecast is too small to split, and two workers each
    # spreading over every core fight for them (p99 under 8 clients: see docs/BENCHMARKS.md)
    torch.set_num_threads(1)
    return BodyLimit(scoring_server.init(mlflow.pyfunc.load_model(os.environ[MODEL_PATH])),
                     int(os.environ.get(MAX_BODY, 5 * 2**20)))


class BodyLimit:
    """ASGI middleware: a request whose body exceeds ``limit`` bytes (by its Content-Length, or as
    it streams in) is answered 413 with a message, before the app reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._drain(receive, int(length))
            return await self._too_large(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            return await self.app(scope, counted, send)
        except _TooLarge:
            return await self._too_large(send)

    async def _drain(self, receive, length: int) -> None:
        """Read (and drop) a body that is not too far over the limit, so the client sees the 413
        rather than a connection reset while it is still sending."""
        if length > 16 * self.limit:
            return
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    async def _too_large(self, send):
        body = json.dumps({"error_code": "REQUEST_TOO_LARGE",
                           "message": f"the request body is over the server's limit of {self.limit:,} bytes; "
                                      f"send the last rows of the history only"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with Nagle's algorithm off on every connection. With ``--workers``
    uvicorn binds the socket itself and asyncio then leaves TCP_NODELAY off (uvicorn issue
    #3149): each keep-alive request after the first waited ~40 ms for a delayed ACK (measured
    here: 50 ms against 7 ms with one worker)."""

    def connection_made(self, transport):
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n")[0])
    ap.add_argument("name", help="registered model name")
    ap.add_argument("--alias", default="champion")
    ap.add_argument("--version", default="", help="a version number instead of the alias")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5001)
    ap.add_argument("--workers", type=int, default=2, help="worker processes (each holds the model)")
    ap.add_argument("--max-body-mb", type=float, default=5.0, help="largest request body accepted (413 beyond)")
    args = ap.parse_args(argv)
    if args.workers < 1 or args.max_body_mb <= 0:
        ap.error("--workers must be at least 1 and --max-body-mb positive")

    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.registry import client

    client()  # the tracking and registry URIs, as every rnnflow command sets them
    uri = f"models:/{args.name}/{args.version}" if args.version else f"models:/{args.name}@{args.alias}"
    with tempfile.TemporaryDirectory(prefix="rnnflow-serve-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(uri, dst_path=tmp)
        except (MlflowException, OSError) as e:
            print(f"error: {uri}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
            return 1
        env = {**os.environ, MODEL_PATH: path, MAX_BODY: str(int(args.max_body_mb * 2**20))}
        print(f"serving {uri} on http://{args.host}:{args.port}/invocations with {args.workers} worker(s)",
              file=sys.stderr)
        os.environ.update(env)  # the workers inherit it
        import uvicorn

        uvicorn.run("flows.serve:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                    http="flows.serve:NoDelayH11Protocol", log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
