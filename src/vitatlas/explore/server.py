"""The explorer's web app (Starlette): the pages, the JSON API under them, and the generated files.

Routes (every parameter checked by ``validate``; errors are ``{"error": "<one line>"}`` with a 4xx):

    GET  /                      the atom table (also /index.html); /atom.html, /image.html, /compare.html
    GET  /static/<file>         the vendored JS/CSS (a fixed list; nothing else on disk is reachable)
    GET  /api/meta              runs, store, whether live intervention is on
    GET  /api/atoms             ?run=&sort=&q=&label=&offset=&limit=&min_frequency=... one page of the table
    GET  /api/atoms/{id}        the atom's card as JSON (404 when out of range)
    GET  /api/images/{id}       the image's patch grid and active atoms (404 for an unknown image)
    GET  /api/compare           ?a=&b= two runs side by side
    POST /api/intervene         {"run", "image", "edits": [{"atom", "value"|"op": "ablate"}], "patches"}
    GET  /images/{id}.png       a store image as the model saw it
    GET  /cards/{run}/{file}    a card PNG written by ``vitatlas interpret`` (names matched by pattern)

Only files the explorer or the interpret pass generated are served; a failing intervention answers
500 with its one-line reason and the server keeps running.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import VitatlasError
from . import validate as v
from .explorer import Explorer

log = logging.getLogger("vitatlas.explore")

PAGES = ("index.html", "atom.html", "image.html", "compare.html")
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer",
                    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                               "style-src 'self' 'unsafe-inline'; script-src 'self'; "
                                               "connect-src 'self'"}


def asset(name: str) -> bytes:
    """A vendored page or static file shipped in the package."""
    return resources.files("vitatlas.explore").joinpath("static", name).read_bytes()


def json_safe(obj):
    """NaN/Inf -> null (browsers reject them in JSON), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(x) for k, x in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(x) for x in obj]
    return obj


class SafeJSON(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(json_safe(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def error(status: int, message: str) -> SafeJSON:
    return SafeJSON({"error": message}, status_code=status)


def config_js(explorer: Explorer, mode: str = "live") -> bytes:
    live = mode == "live" and explorer.live is not None
    return ("window.VITATLAS = " + json.dumps({"mode": mode, "live": live}) + ";\n").encode()


def create_app(explorer: Explorer, *, allowed_hosts: list[str] | None = None) -> Starlette:
    """The ASGI app over ``explorer``. ``allowed_hosts`` guards against DNS rebinding on a local bind."""

    def headers(extra: dict | None = None) -> dict:
        return {**SECURITY_HEADERS, **(extra or {})}

    def n_atoms_of(run: str) -> int:
        return explorer.runs[run].n_atoms

    async def page(request: Request) -> Response:
        name = request.path_params.get("name")
        name = f"{name}.html" if name else "index.html"
        if name not in PAGES:
            return error(404, f"no page {name[:60]!r}")
        return Response(asset(name), media_type="text/html", headers=headers())

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "config.js":
            return Response(config_js(explorer), media_type="text/javascript", headers=headers())
        if name not in STATIC:
            return error(404, f"{name[:60]!r} is not a file the explorer serves")
        return Response(asset(name), media_type=STATIC[name], headers=headers({"Cache-Control": "no-cache"}))

    async def meta(request: Request) -> Response:
        v.only_params(request.query_params, ())
        return SafeJSON(explorer.meta(), headers=headers())

    async def atoms(request: Request) -> Response:
        params = request.query_params
        query = v.atoms_query(params)
        run = v.run_name(params, explorer.run_names)
        return SafeJSON(explorer.atoms(run, query), headers=headers())

    async def atom(request: Request) -> Response:
        params = request.query_params
        v.only_params(params, ("run",))
        run = v.run_name(params, explorer.run_names)
        atom_id = v.atom_id(request.path_params["atom_id"], n_atoms_of(run))
        return SafeJSON(explorer.atom(run, atom_id), headers=headers())

    async def image(request: Request) -> Response:
        params = request.query_params
        v.only_params(params, ("run",))
        run = v.run_name(params, explorer.run_names)
        image_id = v.image_id(request.path_params["image_id"], explorer.images)
        data = await run_in_threadpool(explorer.image, run, image_id)
        return SafeJSON(data, headers=headers())

    async def compare(request: Request) -> Response:
        params = request.query_params
        v.only_params(params, ("a", "b"))
        if len(explorer.run_names) < 2:
            raise v.ApiError(404, "the compare page needs two runs: start the explorer with two run directories")
        a = v.run_name({"run": params.get("a")}, explorer.run_names)
        b = v.run_name({"run": params.get("b")}, explorer.run_names) if params.get("b") else None
        if b == a:
            raise v.ApiError(400, "a and b must be two different runs")
        data = await run_in_threadpool(explorer.compare, a, b)
        return SafeJSON(data, headers=headers())

    async def intervene(request: Request) -> Response:
        if explorer.live is None:
            raise v.ApiError(409, "live intervention is off: start the explorer with --model "
                                  "(and --probe for predictions)")
        raw = b""
        async for chunk in request.stream():  # read at most MAX_BODY bytes, whatever Content-Length claims
            raw += chunk
            if len(raw) > v.MAX_BODY:
                raise v.ApiError(413, f"request body too large (more than {v.MAX_BODY} bytes)")
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise v.ApiError(400, "the body is not valid JSON") from None
        req = v.intervention(body, explorer.run_names, n_atoms_of, explorer.images,
                             (explorer.images.grid[0] * explorer.images.grid[1]) if explorer.images.grid else None)
        try:
            data = await run_in_threadpool(explorer.intervene, req["run"], req["image"], req["edits"], req["patches"])
        except VitatlasError as exc:
            raise v.ApiError(400, f"intervention refused: {exc}") from None
        except Exception as exc:  # the server must outlive a broken model, probe or edit
            log.error("intervention failed:\n%s", traceback.format_exc())
            return error(500, f"intervention failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        return SafeJSON(data, headers=headers())

    async def image_png(request: Request) -> Response:
        raw = request.path_params["name"]
        if not raw.endswith(".png"):
            raise v.ApiError(404, "images are served as /images/<id>.png")
        image_id = v.image_id(raw[:-4], explorer.images)
        try:
            data = await run_in_threadpool(explorer.image_png, image_id)
        except VitatlasError as exc:
            raise v.ApiError(404, f"image {image_id} cannot be shown: {exc}") from None
        return Response(data, media_type="image/png", headers=headers({"Cache-Control": "max-age=3600"}))

    async def card_file(request: Request) -> Response:
        run = v.run_name({"run": request.path_params["run"]}, explorer.run_names)
        name = request.path_params["name"]
        path = explorer.runs[run].cards.file("cards", name)
        if path is None:
            raise v.ApiError(404, f"{name[:60]!r} is not a card file of run {run}")
        media = "image/webp" if name.endswith(".webp") else "image/png"
        return Response(path.read_bytes(), media_type=media, headers=headers({"Cache-Control": "max-age=3600"}))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error(404, f"nothing at {request.url.path[:80]!r}")
        return error(exc.status_code, f"{exc.detail} ({request.method} {request.url.path[:80]})")

    async def api_error(request: Request, exc: v.ApiError) -> Response:
        return error(exc.status, exc.message)

    async def vitatlas_error(request: Request, exc: VitatlasError) -> Response:
        return error(400, str(exc))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("request %s failed:\n%s", request.url.path, traceback.format_exc())
        return error(500, f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")

    routes = [
        Route("/", page), Route("/{name:str}.html", page),
        Route("/static/{name:str}", static),
        Route("/api/meta", meta), Route("/api/atoms", atoms), Route("/api/atoms/{atom_id:str}", atom),
        Route("/api/images/{image_id:str}", image), Route("/api/compare", compare),
        Route("/api/intervene", intervene, methods=["POST"]),
        Route("/images/{name:str}", image_png), Route("/cards/{run:str}/{name:str}", card_file),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: http_error, v.ApiError: api_error,
                                         VitatlasError: vitatlas_error,
                                         Exception: internal_error})


def local_hosts(host: str, port: int) -> list[str] | None:
    """Hosts to accept on a loopback bind (guards against DNS rebinding); None = any (a public bind)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return ["127.0.0.1", "localhost", "::1", "[::1]"]
    return None
