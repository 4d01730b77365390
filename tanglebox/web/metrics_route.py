"""``GET /metrics``: Prometheus' text format, and the count of every HTTP request.

Each app has its own ``CollectorRegistry`` (never the process-wide default, so a test process
can run several apps): a counter of HTTP requests by surface, model and status, bumped in an
app-wide ``after_request``, and the collectors of ``tanglebox.metrics`` (replies, tokens,
latencies, and each model's load read at scrape time).

Who may read it (``enableMetrics: false``: 404 for everyone):

- an address in ``metricsAllowedAddresses`` (addresses or networks such as ``10.0.0.0/8``);
- when tokens are required (``isApiTokensRequired``), anyone else with a valid API token
  (``Authorization: Bearer``, as Prometheus' ``authorization`` sends it; the one check of
  ``web/auth.py``): 401 without one;
- when tokens are not required: anyone if the list is empty (like ``/health``), else 403.

The after_request also puts the request's surface in its WSGI environ (``Runtime.submit`` put
its model there), where the JSON access log (``tanglebox.json_logging``) reads them.
"""

from __future__ import annotations

import ipaddress

from flask import Blueprint, Flask, Response, abort, current_app, request
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from tanglebox.metrics import MODEL_KEY, SURFACE_KEY, ModelCollector, ReplyCollector, \
    surface_of_request
from tanglebox.runtime import current_runtime
from tanglebox.web.auth import require_token

blueprint = Blueprint("metrics", __name__)

SWITCHING_PROTOCOLS = "101"  # a socket's request, counted when the socket has closed


def init_app(app: Flask) -> None:
    runtime = app.extensions["tanglebox"]
    registry = CollectorRegistry(auto_describe=True)
    requests_total = Counter("tanglebox_http_requests", "HTTP requests (a socket's when it "
                             "closes) by surface, model and status.",
                             ["surface", "model", "status"], registry=registry)
    registry.register(ReplyCollector(runtime.metrics))
    registry.register(ModelCollector(runtime))
    app.extensions["tanglebox.metrics"] = registry

    @app.after_request
    def count_request(response: Response) -> Response:
        surface = surface_of_request()
        model = request.environ.get(MODEL_KEY, "")
        request.environ[SURFACE_KEY] = surface
        status = str(response.status_code)
        if status == "200" and request.headers.get("Upgrade", "").lower() == "websocket":
            status = SWITCHING_PROTOCOLS  # Flask-Sock answers 200 once the socket is done
        requests_total.labels(surface, model, status).inc()
        return response

    app.register_blueprint(blueprint)


@blueprint.get("/metrics")
def metrics() -> Response:
    settings = current_runtime().settings
    if not settings["enableMetrics"]:
        abort(404)
    allowed = settings["metricsAllowedAddresses"]
    if not address_allowed(request.remote_addr or "", allowed):
        if settings["isApiTokensRequired"]:
            require_token()  # 401 unless a valid token came
        elif allowed:
            abort(403, description="metrics: this address is not in metricsAllowedAddresses")
    registry = current_app.extensions["tanglebox.metrics"]
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST,
                    headers={"Cache-Control": "no-store"})


def address_allowed(address: str, allowed: list[str]) -> bool:
    """Whether ``address`` is one of ``allowed`` (addresses, or networks like 10.0.0.0/8)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(entry, strict=False) for entry in allowed)
