"""/docs and /redoc open with no network: every URL the pages load is the server's own and
answers, and no other host is named anywhere in them."""

import ipaddress
import re
import socket
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.testclient import TestClient

from recdistill.server import ServerSettings
from serving.api_docs import CONTENT_SECURITY_POLICY
from serving.app import create_app

PAGES = ("/docs", "/redoc")
ABSOLUTE_URL = re.compile(r"\b(?:https?:)?//[^\s\"'<>)]+", re.IGNORECASE)
# Swagger UI's start-up script names the schema and the OAuth2 page in JavaScript strings.
SCRIPT_URL = re.compile(r"(?:url: |RedirectUrl: window\.location\.origin \+ )'([^']+)'")


class References(HTMLParser):
    """The URLs of a page's elements (src, href and ReDoc's spec-url)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href", "spec-url")]


def referenced_urls(html: str) -> list[str]:
    references = References()
    references.feed(html)
    return [url for url in references.urls if url] + SCRIPT_URL.findall(html)


@pytest.fixture
def offline(monkeypatch):
    """Refuse every outgoing connection that is not to this machine."""
    connect = socket.socket.connect

    def loopback_only(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
            raise OSError(f"test is offline: refused a connection to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # The docs need no model: the app is used without its lifespan, so nothing is loaded.
    directory = tmp_path_factory.mktemp("docs")
    settings = ServerSettings(
        artifacts=(str(directory / "unloaded"),), impressions=str(directory / "i.jsonl")
    )
    return TestClient(create_app(settings))


@pytest.mark.parametrize("page", PAGES)
def test_every_url_of_the_docs_page_is_local_and_answers(client, offline, page):
    response = client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    server = urlsplit(str(response.url)).netloc
    urls = referenced_urls(html)
    # The page's script, stylesheet (Swagger UI), favicon and schema, at least.
    assert len(urls) >= 3
    assert "/openapi.json" in urls
    for url in urls:
        absolute = urlsplit(urljoin(str(response.url), url))
        assert absolute.netloc == server, f"{page} loads {url} from another host"
        asset = client.get(absolute.path)
        assert asset.status_code == 200 and asset.content, f"{page}: {url} did not load"
    foreign = [url for url in ABSOLUTE_URL.findall(html) if urlsplit(url).netloc != server]
    assert foreign == [], f"{page} names other hosts"


@pytest.mark.parametrize("page", PAGES)
def test_the_docs_pages_may_load_nothing_from_another_host(client, page):
    """What the bundles might fetch at run time (ReDoc's logo from its CDN) is blocked by the
    browser: the page allows this server's own files only."""
    policy = client.get(page).headers["content-security-policy"]
    assert policy == CONTENT_SECURITY_POLICY
    directives = dict(rule.split(" ", 1) for rule in policy.split("; "))
    assert directives["default-src"] == "'self'"
    assert all("http" not in sources and "*" not in sources for sources in directives.values())


def test_swagger_ui_loads_its_own_bundle_and_no_validator(client):
    html = client.get("/docs").text
    assert "swagger-ui-bundle.js" in html and "swagger-ui.css" in html
    assert '"validatorUrl": null' in html
    assert "SwaggerUIBundle" in client.get("/docs-assets/swagger-ui-bundle.js").text


def test_redoc_loads_its_own_bundle_without_google_fonts(client):
    html = client.get("/redoc").text
    assert "redoc.standalone.js" in html and "fonts.googleapis" not in html
    assert "Redoc" in client.get("/docs-assets/redoc.standalone.js").text


def test_the_schema_keeps_the_api_and_leaves_the_docs_out(client):
    paths = set(client.get("/openapi.json").json()["paths"])
    assert paths == {
        "/rank",
        "/feedback",
        "/healthz",
        "/readyz",
        "/model",
        "/metrics",
        "/admin/reload",
    }
