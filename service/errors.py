"""Errors the scorer answers with, all as {"detail": [{"loc", "msg", "type"}]}: never a 500 page."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("ctrserve.service")


class ApiError(Exception):
    """An error with an HTTP status, the location of the problem and a message."""

    status = 400
    kind = "bad_request"

    def __init__(self, loc: list[str | int], msg: str, headers: dict[str, str] | None = None):
        super().__init__(msg)
        self.loc, self.msg, self.headers = loc, msg, headers or {}

    def items(self) -> list[dict[str, Any]]:
        return [{"loc": self.loc, "msg": self.msg, "type": self.kind}]


class InvalidInput(ApiError):
    status, kind = 422, "invalid"


class InvalidBody(InvalidInput):
    """Several problems at once (pydantic's errors), each with its location."""

    def __init__(self, items: list[dict[str, Any]]):
        super().__init__(items[0]["loc"] if items else ["body"], "invalid request body")
        self._items = items

    def items(self) -> list[dict[str, Any]]:
        return self._items


class BodyTooLarge(ApiError):
    status, kind = 413, "body_too_large"


class BodyTimeout(ApiError):
    status, kind = 408, "body_timeout"


class ClientClosed(ApiError):
    """The client went away before its request was read: nginx's 499, so that a disconnect
    counts under its own status label and not as a server error."""

    status, kind = 499, "client_closed_request"


class Unauthorized(ApiError):
    status, kind = 401, "unauthorized"


class Forbidden(ApiError):
    status, kind = 403, "forbidden"


class NotFound(ApiError):
    status, kind = 404, "not_found"


class Conflict(ApiError):
    status, kind = 409, "conflict"


class Overloaded(ApiError):
    status, kind = 503, "overloaded"


class NotReady(ApiError):
    status, kind = 503, "not_ready"


class DeadlineExceeded(ApiError):
    status, kind = 504, "deadline_exceeded"


def error_body(items: list[dict[str, Any]]) -> bytes:
    from pydantic_core import to_json

    return to_json({"detail": items})


def error_response(status: int, items: list[dict[str, Any]],
                   headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(items), status, headers=headers, media_type="application/json")


def validation_items(exc: ValidationError, prefix: str = "body") -> list[dict[str, Any]]:
    """Pydantic errors with their location, without echoing the input back."""
    return [{"loc": [prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]}
            for err in exc.errors(include_url=False, include_input=False)]


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.items(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _fastapi(_: Request, exc: RequestValidationError) -> Response:
        items = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                 for e in exc.errors()]
        return error_response(422, items)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, [{"loc": [], "msg": str(exc.detail),
                                                 "type": "http"}], exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, [{"loc": [], "msg": f"internal error: {type(exc).__name__}",
                                     "type": "internal"}])
