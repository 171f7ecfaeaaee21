"""Property-based fuzzing of a real server from its own OpenAPI schema (schemathesis).

Every documented operation gets generated requests, valid and invalid, with and without the
admin token: none may get a 5xx, and every response must match the documented status codes,
content types, headers and body schemas.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from recdistill.server import running_server
from serving.middleware import ADMIN_TOKEN_ENV

pytestmark = pytest.mark.slow  # every test here starts a server

TOKEN = "fuzz-token"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
OPERATIONS = [
    ("POST", "/rank"),
    ("POST", "/feedback"),
    ("POST", "/admin/reload"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/model"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def served_schema(tiny_artifacts, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "impressions.jsonl"
    artifacts = [tiny_artifacts["student"]]
    with running_server(artifacts, impressions=log, env={ADMIN_TOKEN_ENV: TOKEN}) as server:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_the_schema_documents_every_operation(served_schema):
    operations = [result.ok() for result in served_schema.get_all_operations()]
    documented = {(operation.method.upper(), operation.path) for operation in operations}
    assert documented == set(OPERATIONS)


# Operations without parameters or a body have no invalid requests to generate.
@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS]
    + [(method, path, GenerationMode.NEGATIVE) for method, path in OPERATIONS if method == "POST"],
)
def test_no_request_gets_a_5xx_and_every_response_matches_the_schema(
    served_schema, method, path, mode
):
    operation = served_schema[path][method]

    # Derandomized, so a run in CI tries the same requests as the last run here.
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    def fuzz(case):
        case.call_and_validate(checks=CHECKS, headers={"authorization": f"Bearer {TOKEN}"})
        case.call_and_validate(checks=CHECKS)

    fuzz()
