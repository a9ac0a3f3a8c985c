"""The dashboard's web face: the JSON API the pages use, the live stream (SSE), the pages.

Reads are open to whoever reaches the bind address; actions need the bearer token of
`[dashboard] token_file`, and without a token file there are none (403). Handlers that ask
the fleet are plain functions: Starlette runs them in its thread pool, the event loop
never waits on a broker or a host.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ctl.dashboard.fleet import ActionError, Fleet
from ctl.dashboard.history import SAMPLE_EVERY, History, Sampler
from worker.brokers.base import BrokerUnavailable

STATIC = os.path.join(os.path.dirname(__file__), "static")
LIST_LIMIT, LIST_MAX = 100, 1000  # tasks listed by default, and at most
HISTORY_HOURS, HISTORY_MAX_HOURS = 3.0, 24.0
STREAM_LOOK_EVERY = 0.25  # seconds between two looks for a new snapshot, per live page
STREAM_KEEPALIVE = 15.0  # seconds of quiet after which a comment keeps proxies from closing
SCHEDULE_VERBS = ("pause", "resume", "trigger")  # `fleetctl schedule VERB NAME`
READ_ONLY = "this dashboard is read-only: give it [dashboard] token_file to allow actions"


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status)


class Dashboard:
    """The routes over one Fleet, its sampler and its history."""

    def __init__(self, fleet: Fleet, history: History, sampler: Sampler, token: str) -> None:
        self.fleet = fleet
        self.history = history
        self.sampler = sampler
        self.token = token
        # Whether the server is shutting down: live streams end then, at once (else each
        # was cancelled at the end of the grace, with a traceback in the log).
        self.stopping: Callable[[], bool] = lambda: False

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/", self.page),
                Route("/api/info", self.info),
                Route("/api/nodes", self.nodes),
                Route("/api/queues", self.queues),
                Route("/api/tasks", self.tasks),
                Route("/api/tasks/{task_id}", self.task),
                Route("/api/history", self.chart),
                Route("/api/events", self.events),
                Route("/api/schedules", self.schedules),
                Route("/api/tasks/{task_id}/revoke", self.revoke, methods=["POST"]),
                Route("/api/dead/retry", self.retry_dead, methods=["POST"]),
                Route("/api/dead/purge", self.purge_dead, methods=["POST"]),
                Route("/api/nodes/{node}/pool", self.pool, methods=["POST"]),
                Route("/api/rate-limit", self.rate_limit, methods=["POST"]),
                Route("/api/schedules/{name}/{verb}", self.steer_schedule, methods=["POST"]),
                Mount("/static", StaticFiles(directory=STATIC), name="static"),
            ],
            exception_handlers={
                HTTPException: lambda _r, exc: error(str(exc.detail), exc.status_code),
                ActionError: lambda _r, exc: error(str(exc), exc.status),
                BrokerUnavailable: lambda _r, exc: error(str(exc), 503),
                # Each its own key: Starlette answers these and is done; a handler of
                # Exception answers and raises again (uvicorn logs a traceback).
                sqlite3.Error: broker_error,
                RedisError: broker_error,
                ClientDisconnect: lambda _r, _exc: error("the client left before its end", 400),
                Exception: unexpected,
            },
        )

    # --- pages and reads ---------------------------------------------------------------
    def page(self, request: Request) -> Response:
        return FileResponse(os.path.join(STATIC, "index.html"))

    def info(self, request: Request) -> Response:
        return JSONResponse(
            {
                "read_only": not self.token,
                "sample_every": SAMPLE_EVERY,
                "queue_waits": self.fleet.records.knows_waits,
            }
        )

    def nodes(self, request: Request) -> Response:
        return JSONResponse(self.fleet.nodes())

    def queues(self, request: Request) -> Response:
        return JSONResponse(self.fleet.queues())

    def tasks(self, request: Request) -> Response:
        limit = number(request, "limit", LIST_LIMIT, LIST_MAX)
        if limit != int(limit):
            raise HTTPException(400, f"limit must be a whole number, got {limit:g}")
        state = request.query_params.get("state", "").upper()
        name = request.query_params.get("name", "")
        return JSONResponse(self.fleet.tasks(state, name, int(limit)))

    def task(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        info = self.fleet.task(task_id)
        if info is None:
            return error(f"no task {task_id}: the broker never saw it (or its record expired)", 404)
        return JSONResponse(info)

    def schedules(self, request: Request) -> Response:
        return JSONResponse(self.fleet.schedules())

    def chart(self, request: Request) -> Response:
        hours = number(request, "hours", HISTORY_HOURS, HISTORY_MAX_HOURS)
        return JSONResponse({"samples": self.history.since(hours * 3600)})

    async def events(self, request: Request) -> Response:
        return StreamingResponse(self.stream(request), media_type="text/event-stream")

    async def stream(self, request: Request) -> AsyncIterator[str]:
        """Each new snapshot of the sampler as an SSE `data:` line, until the page leaves."""
        seen, quiet = 0, 0.0  # version 0: no reading yet
        while not self.stopping() and not await request.is_disconnected():
            if self.sampler.version != seen:
                seen, quiet = self.sampler.version, 0.0
                yield f"data: {json.dumps(self.sampler.snapshot)}\n\n"
            elif quiet >= STREAM_KEEPALIVE:
                quiet = 0.0
                yield ": keepalive\n\n"
            await asyncio.sleep(STREAM_LOOK_EVERY)
            quiet += STREAM_LOOK_EVERY

    # --- actions -------------------------------------------------------------------------
    def refused(self, request: Request) -> Response | None:
        """Why this request may not act, if it may not: no token file (403), no or a wrong
        bearer token (401)."""
        if not self.token:
            return error(READ_ONLY, 403)
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # Bytes: compare_digest refuses text that is not ASCII (a header is latin-1 to
        # Starlette: its bytes as they came), and the token file is UTF-8.
        given_bytes = token.strip().encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given_bytes, self.token.encode("utf-8")
        ):
            return JSONResponse(
                {"error": "actions need the dashboard's token: Authorization: Bearer TOKEN"},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None

    async def revoke(self, request: Request) -> Response:
        if answer := self.refused(request):
            return answer
        terminate = request.query_params.get("terminate", "") in ("1", "true", "yes")
        args = {"ids": [request.path_params["task_id"]], "terminate": terminate}
        return await self.run(self.fleet.control, "revoke", args, None)

    async def retry_dead(self, request: Request) -> Response:
        if answer := self.refused(request):
            return answer
        body = await json_body(request)
        ids, every = body.get("ids"), body.get("all") is True
        if every == (ids is not None) or not (
            every or (isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids))
        ):
            return error('give {"ids": [ID, ...]} or {"all": true}', 400)
        return await self.run(self.fleet.retry_dead, None if every else ids)

    async def purge_dead(self, request: Request) -> Response:
        if answer := self.refused(request):
            return answer
        return await self.run(self.fleet.purge_dead)

    async def pool(self, request: Request) -> Response:
        if answer := self.refused(request):
            return answer
        body = await json_body(request)
        action = body.get("action")
        if action not in ("grow", "shrink"):
            return error(
                'give {"action": "grow"} or {"action": "shrink"} (and "n", default 1)', 400
            )
        args = {"n": body.get("n", 1)}
        return await self.run(
            self.fleet.control, f"pool_{action}", args, [request.path_params["node"]]
        )

    async def rate_limit(self, request: Request) -> Response:
        if answer := self.refused(request):
            return answer
        body = await json_body(request)
        dest = body.get("dest")
        if dest is not None and not (
            isinstance(dest, list) and dest and all(isinstance(d, str) and d for d in dest)
        ):  # [] would be nobody to the arbiters, and everyone to the client
            return error('"dest" must be a non-empty list of nodes or hosts', 400)
        args = {key: body[key] for key in ("task", "rate") if key in body}
        return await self.run(self.fleet.control, "rate_limit", args, dest)

    async def steer_schedule(self, request: Request) -> Response:
        if answer := self.refused(request):
            return answer
        verb = request.path_params["verb"]
        if verb not in SCHEDULE_VERBS:
            return error(f"no schedule action {verb!r}: give {', '.join(SCHEDULE_VERBS)}", 404)
        return await self.run(self.fleet.schedule, verb, {"name": request.path_params["name"]})

    async def run(self, action: Any, *args: Any) -> Response:
        """An action of the fleet, in a thread: it waits on hosts or the broker."""
        return JSONResponse(await run_in_threadpool(action, *args))


def broker_error(request: Request, exc: Exception) -> JSONResponse:
    """The broker's own error (a Redis gone, a queue file that is no database): 503."""
    return error(f"broker: {type(exc).__name__}: {exc}", 503)


def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Any other error, as JSON in one line (500; uvicorn logs its traceback)."""
    return error(f"internal error: {type(exc).__name__}: {exc}", 500)


def number(request: Request, key: str, default: float, most: float) -> float:
    """A query parameter that is a number above 0 and at most `most`; HTTP 400 if not."""
    text = request.query_params.get(key)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise HTTPException(400, f"{key} must be a number, got {text!r}") from None
    if not 0 < value <= most:
        raise HTTPException(400, f"{key} must be above 0 and at most {most:g}, got {text}")
    return value


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object (none: {}); HTTP 400 if it is something else."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    try:  # "\\ud800" is JSON, but no text a reply or a control request can carry
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise HTTPException(400, "the body holds a lone surrogate: no UTF-8 text") from None
    return body
