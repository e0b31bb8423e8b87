"""A REST scoring server for a registered model: MLflow's scoring protocol, run by uvicorn with
``--workers`` processes, with a limit on the request body (413 beyond it), and with ``--token-env
VAR`` a bearer token on every request but /ping and /health (401 without it).

    python -m flows.serve NAME [--alias champion | --version N] [--port 5001] [--workers 2] [--token-env VAR]

The model is downloaded once, before the workers start; each worker loads it from disk.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import sys
import tempfile

from uvicorn.protocols.http.h11_impl import H11Protocol

from flows.parsing import Parser

MODEL_PATH = "RNNFLOW_SERVE_MODEL_PATH"
MAX_BODY = "RNNFLOW_SERVE_MAX_BODY_BYTES"
TOKEN_ENV = "RNNFLOW_SERVE_TOKEN_ENV"  # the name of the variable holding the token, which the workers inherit


def create_app():
    """The uvicorn factory each worker calls: MLflow's scoring protocol for the downloaded model."""
    import mlflow.pyfunc
    import torch

    # one thread per worker: a one-series forecast is too small to split, and two workers each
    # spreading over every core fight for them (p99 under 8 clients: see docs/BENCHMARKS.md)
    torch.set_num_threads(1)
    app = ScoringApp(mlflow.pyfunc.load_model(os.environ[MODEL_PATH]), int(os.environ.get(MAX_BODY, 5 * 2**20)))
    return BearerToken(app, os.environ[os.environ[TOKEN_ENV]]) if os.environ.get(TOKEN_ENV) else app


class BearerToken:
    """ASGI middleware: an HTTP request needs ``Authorization: Bearer <token>`` (compared in constant
    time) or is answered 401 with ``WWW-Authenticate: Bearer``; /ping and /health stay open for load
    balancers and orchestrators."""

    OPEN = ("/ping", "/health")

    def __init__(self, app, token: str):
        self.app, self.token = app, token.strip().encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN or self.authorised(scope):
            return await self.app(scope, receive, send)
        await _answer(send, 401, b'{"error_code": "UNAUTHENTICATED", "message": "send Authorization: Bearer <token>"}',
                      headers=[(b"www-authenticate", b'Bearer realm="rnnflow"')])

    def authorised(self, scope) -> bool:
        scheme, _, given = dict(scope.get("headers") or []).get(b"authorization", b"").partition(b" ")
        # `&`, not `and`: the token is compared whatever the scheme, so the time taken does not tell them apart
        return hmac.compare_digest(given.strip(), self.token) & (scheme.lower() == b"bearer")


class ScoringApp:
    """MLflow's scoring protocol as a bare ASGI app: ``POST /invocations`` answered by MLflow's own
    ``scoring_server.invocations`` (the same formats, responses and error bodies as ``mlflow models
    serve``), ``GET /ping``, ``/health`` and ``/version``, and a limit on the request body (a 10 MB
    body would otherwise be parsed whole before the model sees its last rows).

    Not MLflow's FastAPI app around that function: its middleware, routing and hop to a worker
    thread cost more CPU than a small model's forecast, and under load that CPU is the latency
    (docs/BENCHMARKS.md). A worker answers one request at a time in its event loop, as its one
    torch thread would anyway; more at once is what ``--workers`` is for. (MLflow's request
    timeout is not enforced: a forecast cannot be cut short in either app, only its answer dropped.)"""

    def __init__(self, model, limit: int):
        from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
        from mlflow.pyfunc import scoring_server
        from mlflow.version import VERSION

        self.model, self.limit, self.version = model, limit, VERSION.encode()
        self.schema = model.metadata.get_input_schema()
        self.invocations = scoring_server.invocations
        os.environ[_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name] = "true"  # as scoring_server.init sets it

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in ("/ping", "/health", "/version"):
            if method != "GET":
                return await _answer(send, 405, b'{"message": "use GET"}')
            return await _answer(send, 200, self.version if path == "/version" else b"\n")
        if path != "/invocations":
            return await _answer(send, 404, json.dumps({"message": f"no route {path}; POST /invocations"}).encode())
        if method != "POST":
            return await _answer(send, 405, b'{"message": "POST a frame to /invocations"}')
        headers = dict(scope.get("headers") or [])
        try:
            body = await self._body(receive, headers.get(b"content-length"))
        except _Disconnected:  # the client went away while sending: nobody to answer
            return
        if body is None:
            return await _answer(send, 413, json.dumps({
                "error_code": "REQUEST_TOO_LARGE",
                "message": f"the request body is over the server's limit of {self.limit:,} bytes; "
                           f"send the last rows of the history only"}).encode())
        status, content, mimetype = self.respond(body, headers.get(b"content-type", b"").decode("latin-1"))
        await _answer(send, status, content, mimetype)

    def respond(self, body: bytes, content_type: str) -> tuple[int, bytes, str]:
        """(status, content, media type) for one /invocations request, as MLflow's app answers it."""
        from mlflow.exceptions import MlflowException

        try:
            result = self.invocations(body, content_type, self.model, self.schema)
        except MlflowException as e:
            return e.get_http_status_code(), e.serialize_as_json().encode(), "application/json"
        content = result.response
        return result.status, content.encode() if isinstance(content, str) else content, result.mimetype

    async def _body(self, receive, length: bytes | None) -> bytes | None:
        """The request body, or None once it is over the limit (by its Content-Length, or as it
        streams in); a body not too far over it is still read, so the client sees the 413
        rather than a connection reset while it is still sending. _Disconnected if the client
        leaves first."""
        declared = int(length) if length and length.isdigit() else 0
        if declared > 16 * self.limit:
            return None  # not worth reading
        too_large = declared > self.limit
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _Disconnected
            chunk = message.get("body", b"")
            seen += len(chunk)
            too_large = too_large or seen > self.limit
            if not too_large:
                chunks.append(chunk)
            if not message.get("more_body"):
                return None if too_large else b"".join(chunks)


class _Disconnected(Exception):
    pass


async def _answer(send, status: int, content: bytes, mimetype: str = "application/json",
                  headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", mimetype.encode()), (b"content-length", str(len(content)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": content})


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with Nagle's algorithm off on every connection. With ``--workers``
    uvicorn binds the socket itself and asyncio leaves TCP_NODELAY off (uvicorn issue #3149): each
    keep-alive request after the first waited for a delayed ACK (docs/BENCHMARKS.md)."""

    def connection_made(self, transport):
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


def parser() -> Parser:
    ap = Parser(prog="python -m flows.serve", description=__doc__.split("\n")[0])
    ap.add_argument("name", help="registered model name")
    ap.add_argument("--alias", default="champion")
    ap.add_argument("--version", default="", help="a version number instead of the alias")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5001)
    ap.add_argument("--workers", type=int, default=2, help="worker processes (each holds the model)")
    ap.add_argument("--max-body-mb", type=float, default=5.0, help="largest request body accepted (413 beyond)")
    ap.add_argument("--token-env", default="", metavar="VAR",
                    help="require Authorization: Bearer <the value of environment variable VAR> (401 without)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.workers < 1 or args.max_body_mb <= 0:
        ap.error("--workers must be at least 1 and --max-body-mb positive")
    if args.token_env and not os.environ.get(args.token_env, "").strip():
        print(f"error: --token-env {args.token_env}: that environment variable is unset or empty; "
              f"export it with the token clients must send", file=sys.stderr)
        return 2

    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.registry import client, refusal

    client()  # the tracking and registry URIs, as every rnnflow command sets them
    uri = f"models:/{args.name}/{args.version}" if args.version else f"models:/{args.name}@{args.alias}"
    with tempfile.TemporaryDirectory(prefix="rnnflow-serve-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(uri, dst_path=tmp)
        except (MlflowException, OSError) as e:
            print(f"error: {refusal(e, f'read model {args.name!r}') or f'{uri}: {str(e).splitlines()[0][:300]}'}",
                  file=sys.stderr)
            return 1
        # the workers inherit these
        os.environ.update({MODEL_PATH: path, MAX_BODY: str(int(args.max_body_mb * 2**20)), TOKEN_ENV: args.token_env})
        print(f"serving {uri} on http://{args.host}:{args.port}/invocations with {args.workers} worker(s)"
              + (f", bearer token from ${args.token_env}" if args.token_env else ""), file=sys.stderr)
        import uvicorn

        uvicorn.run("flows.serve:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                    http="flows.serve:NoDelayH11Protocol", log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
