"""Pagination, the same on every list of the API: `limit` and `offset`, and a
`Link: <...>; rel="next"` header while there may be more."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request, Response

_T = TypeVar("_T")


class Page:
    def __init__(self, request: Request, response: Response,
                 limit: Annotated[int, Query(ge=1, le=10_000, description="rows per page")] = 100,
                 offset: Annotated[int, Query(ge=0, le=1_000_000_000,
                                              description="rows to skip")] = 0) -> None:
        self.limit, self.offset = limit, offset
        self._request, self._response = request, response

    def __call__(self, rows: list[_T]) -> list[_T]:
        """The page's rows; a full page links to the next one."""
        if len(rows) == self.limit:
            nxt = self._request.url.include_query_params(offset=self.offset + self.limit)
            self._response.headers["link"] = f'<{nxt}>; rel="next"'
        return rows


Paged = Annotated[Page, Depends()]
Rows = list[dict[str, Any]]
