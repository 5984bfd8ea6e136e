"""GET /ui and GET /ui/{name}: the web page for generating images, public (no key needed).

The page, its script and its style are plain files in http_front/static (no build step, no
CDN). The key is typed into the page and kept in the browser; a strict Content-Security-Policy
allows only this front's own scripts, styles, images and requests, and the script builds the
page with DOM calls only (Trusted Types enforce that no HTML string reaches the page).
"""

from __future__ import annotations

from importlib import resources

import falcon

from http_front.errors import ApiError

STATIC = resources.files("http_front") / "static"
ASSETS = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'; "
       "require-trusted-types-for 'script'; trusted-types 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _send(resp: falcon.Response, content_type: str, data: bytes) -> None:
    resp.content_type = content_type
    for name, value in HEADERS.items():
        resp.set_header(name, value)
    resp.data = data


class UiPage:
    """GET /ui : the generation page (public)."""

    public = True

    def __init__(self) -> None:
        self._page = (STATIC / "ui.html").read_bytes()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The HTML page."""
        _send(resp, "text/html; charset=utf-8", self._page)


class UiAsset:
    """GET /ui/{name} : the page's script and style, from a fixed list (public)."""

    public = True

    def __init__(self) -> None:
        self._files = {name: (kind, (STATIC / name).read_bytes()) for name, kind in ASSETS.items()}

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        """One asset with its media type; 404 for any other name."""
        if name not in self._files:
            raise ApiError(404, "not found", f"no asset {name[:64]!r} under /ui/")
        _send(resp, *self._files[name])
