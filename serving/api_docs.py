"""The interactive API docs, Swagger UI at ``/docs`` and ReDoc at ``/redoc``, with every asset
served by the app itself, so they open on a machine without internet.

FastAPI's own docs pages load their JavaScript, CSS and favicon from a CDN (and ReDoc its
fonts from Google), so offline they are blank. The ``fastapi-offline`` package (MIT; the
Swagger UI files in it are Apache-2.0, ReDoc's MIT) ships those files; the app mounts them
at ``ASSETS_URL`` and builds the same two pages on them with FastAPI's own page builders.
Swagger UI's online validator badge, which would fetch an image from swagger.io for a
server not on localhost, is turned off. ReDoc's side menu always shows its maker's logo from
their CDN; the pages' Content-Security-Policy lets them load nothing but this server's own
files, so the browser never sends that request (ReDoc then leaves the logo out), nor any other
a later bundle might add.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = f"{DOCS_URL}/oauth2-redirect"
ASSETS_URL = "/docs-assets"
# The package and its folder that hold swagger-ui-bundle.js, swagger-ui.css,
# redoc.standalone.js and favicon.png.
ASSETS_PACKAGE = ("fastapi_offline", "static")
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}
# What the docs pages may load: this server's files only, plus the inline script that starts
# Swagger UI, the styles both UIs inject, data: images and the blob: worker ReDoc searches in.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:"
)


def add_api_docs(app: FastAPI) -> None:
    """Serve Swagger UI at ``DOCS_URL`` and ReDoc at ``REDOC_URL`` from local assets; ``app``
    is created with ``docs_url=None, redoc_url=None`` so these replace FastAPI's CDN pages.
    None of these routes is in the OpenAPI schema."""
    app.mount(ASSETS_URL, StaticFiles(packages=[ASSETS_PACKAGE]), name="docs-assets")

    def under_root(request: Request, path: str) -> str:
        """``path`` as the browser must ask for it, behind a proxy's root path if any."""
        return f"{request.scope.get('root_path', '')}{path}"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        assets = under_root(request, ASSETS_URL)
        page = get_swagger_ui_html(
            openapi_url=under_root(request, app.openapi_url),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
            oauth2_redirect_url=under_root(request, OAUTH2_REDIRECT_URL),
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )
        return _local_only(page)

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        assets = under_root(request, ASSETS_URL)
        page = get_redoc_html(
            openapi_url=under_root(request, app.openapi_url),
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png",
            with_google_fonts=False,
        )
        return _local_only(page)


def _local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page
