"""The bodies of the HTTP API, and the 422 answer to a body that does not fit them.

Every error body is ``{"detail": ...}``: a message, or one ``FieldError`` per offending field.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

# An ID as the data has it: an integer, or a string for data imported with string IDs.
ExternalId = (
    Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
    | Annotated[str, Field(min_length=1, max_length=256)]
)


class RankRequest(BaseModel):
    # The example /docs fills in (without it, the bounds of the first kind of ID).
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"user_id": 1, "candidates": [10, 20, 30], "k": 2}]},
    )

    user_id: ExternalId
    candidates: list[ExternalId] = Field(min_length=1, json_schema_extra={"uniqueItems": True})
    k: int | None = Field(default=None, gt=0, strict=True)
    recent_items: list[ExternalId] = Field(
        default_factory=list, description="this session's items, most recent first"
    )

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates: list[int | str]) -> list[int | str]:
        if len(set(candidates)) != len(candidates):
            raise ValueError("candidates must be distinct")
        return candidates


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [{"request_id": "5f0c…", "item_id": 20, "event": "click", "time": 1.7e9}]
        },
    )

    request_id: str = Field(min_length=1, max_length=64, description="as /rank answered it")
    item_id: ExternalId = Field(description="an item that request showed")
    event: Literal["click", "conversion"]
    time: float | None = Field(
        default=None, ge=0, description="when it happened, epoch seconds (default: received)"
    )


class FeedbackResponse(BaseModel):
    request_id: str
    item_id: int | str
    event: str
    arm: str = Field(description="the arm credited: the one that placed the item")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    artifact: str
    model: str | None = Field(default=None, description="served model to replace")


# /rank writes its body with orjson (validating it through these models would cost ~0.6 ms
# at 1000 items); "forbid" puts additionalProperties: false into the OpenAPI schema, so the
# schema tests (tests/serving/test_fuzz.py) catch a body that drifts from the model either way.
class RankedItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: int | str
    score: float


class RankResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    model: str
    version: str
    arm: str
    cold_start: bool
    unknown_items: list[int | str]
    items: list[RankedItem]


class ReloadResponse(BaseModel):
    model: str
    version: str
    previous_version: str


class Readiness(BaseModel):
    ready: bool
    models: dict[str, str]


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str | list[FieldError]


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming every offending field, non-finite numbers first.

    Pydantic would report a NaN sent for an integer as "not a valid integer", and echo the
    input back, which JSON cannot carry; so inputs are never echoed.
    """
    non_finite = list(_non_finite_numbers(error.body))
    named = {("body", *path) for path, _ in non_finite}
    detail = [
        {
            "loc": ["body", *path],
            "msg": f"{_field_name(path)} is {value}: JSON numbers must be finite",
            "type": "finite_number",
        }
        for path, value in non_finite
    ] + [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in error.errors()
        if tuple(e["loc"]) not in named
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def _non_finite_numbers(
    value: Any, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """(path, "NaN"/"Infinity"/"-Infinity") of each non-finite number in a parsed body."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path, "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite_numbers(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite_numbers(item, (*path, index))


def _field_name(path: tuple[str | int, ...]) -> str:
    """``("candidates", 1)`` → ``candidates[1]``, ``(0,)`` → ``body[0]``."""
    if not path:
        return "the body"
    name = "body" if isinstance(path[0], int) else ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name
