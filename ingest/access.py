"""Who may call which endpoint: bearer tokens, roles, and the API's JSON errors.

Every route names its roles with `require(...)`; `tests/test_api_roles.py` walks
every route with every role and checks the matrix. Errors are JSON objects with
a `code` a program can switch on and a `message` a person can read.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry.tokens import Principal, authenticate

_bearer = HTTPBearer(auto_error=False, description="a token from `bikewatch token create`")
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 409: "conflict", 413: "too_large",
          422: "invalid_request"}


class ErrorBody(BaseModel):
    code: str = Field(description="for programs: " + ", ".join(sorted(set(_CODES.values()))))
    message: str = Field(description="for people")


# Documented on every route, so that a client generated from /openapi.json knows them.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": code.replace("_", " ")}
    for status, code in _CODES.items() if status != 405}


class CsvStream(StreamingResponse):
    media_type = "text/csv"


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


def answers(*media_types: str) -> dict[int | str, dict[str, Any]]:
    """Document a success in these media types. (A route's `response_class` would
    document its errors in that type too, when they are JSON.)"""
    return {200: {"content": {m: {"schema": {"type": "string"}} for m in media_types}}}


class ApiError(Exception):
    """An answer other than success: its HTTP status, code and message."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.code = code or _CODES.get(status, "error")


def error_body(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def require(*roles: str) -> Any:
    """A dependency that admits a live token of one of `roles` and yields its Principal."""

    async def principal(request: Request, credentials: _Credentials) -> Principal:
        if credentials is None:
            raise ApiError(401, "send the header Authorization: Bearer <token>")
        who = await authenticate(request.app.state.engine, credentials.credentials)
        if who is None:
            raise ApiError(401, "unknown or revoked token")
        if who.role not in roles:
            raise ApiError(403, f"this needs a {' or '.join(roles)} token, "
                           f"not {who.role}")
        return who

    return Depends(principal)


def install_errors(app: FastAPI) -> None:
    """Every error the API answers, in the one JSON shape."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(exc.code, exc.message), exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(_CODES.get(exc.status_code, "error"), str(exc.detail)),
                            exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
                    for e in exc.errors()]
        return JSONResponse(error_body("invalid_request", "; ".join(problems)[:1000]), 422)
