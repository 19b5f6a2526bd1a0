"""The web chat UI: ``GET /`` and the static files under ``/static/``.

Everything the page needs ships inside the package (``server/static/``); nothing is fetched
from a CDN or at run time. Model output is untrusted, so the page is served with a strict
Content-Security-Policy: scripts, styles and connections only from this origin, no inline
script or style, no frames, no plugins. The page's own renderer never parses model text as
HTML (see ``static/markdown.js``); the CSP is the second wall if that ever fails.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

__all__ = ["CONTENT_SECURITY_POLICY", "STATIC_DIR", "routes"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    ]
)

#: Headers on the page and every static file.
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}


class _SecureStatic(StaticFiles):
    """StaticFiles with the security headers, revalidated on every load (ETag) so an
    upgraded package never serves stale scripts from the browser cache."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend((k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items())
                headers.append((b"cache-control", b"no-cache"))
                message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


async def index(request: Request) -> Response:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={**SECURITY_HEADERS, "cache-control": "no-cache"},
    )


def routes() -> list[BaseRoute]:
    """The UI's routes, for ``create_app``."""
    return [
        Route("/", index, methods=["GET", "HEAD"]),
        Mount("/static", app=_SecureStatic(directory=STATIC_DIR), name="static"),
    ]
