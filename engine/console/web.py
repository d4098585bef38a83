"""The console: server-rendered pages for the security team and the JSON API they use.

Pages: the queue (`/`), an alert (`/alerts/{alert_id}`: notifications link here), an
entity (`/entity?value=`), the rules (`/rules`), sign-in. The API (`/api/...`, its
OpenAPI description at `/api/openapi.json`, shown at `/api/docs`) answers a signed-in
session or an API token (`Authorization: Bearer cs_...`), and 401 to anyone else.

Safety, in one place: every page is a Jinja2 template with autoescape on (data is
never marked safe; the server-drawn SVG escapes its own texts); every POST from a
page carries the session's CSRF token (the API's POST with a session wants it in
`X-CSRF-Token`; a token-authenticated script has no ambient cookie to abuse);
every answer carries the headers of engine.console.safety (a CSP without inline
script); failed sign-ins are logged (the typed name through engine.core.text.shown)
and throttled. The reviewer recorded is the account signed in, never a form field.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from engine.alerts.actionbook import ActionError, ActionRequest, NoActions, open_book
from engine.alerts.actionbook import approve as approve_action
from engine.alerts.actionbook import reject as reject_action
from engine.alerts.outbox import OutboxError
from engine.console.accounts import Account, Accounts, accounts_path
from engine.console.chart import Band, bar_chart
from engine.console.lakeview import (
    ENTITY_TYPES,
    LEVELS,
    QUEUE_COLUMNS,
    SEVERITIES,
    SORTS,
    LakeView,
    LakeViewError,
    QueueFilter,
    RuleBook,
)
from engine.console.safety import HEADERS, LoginThrottle, csrf_matches, new_csrf_token
from engine.core.text import shown
from engine.detect.exceptionfiles import exception_in_force
from engine.lake.review_status import STATUSES, status_named
from engine.lake.reviews import ReviewError, add_reviews, assign_alerts

log = logging.getLogger("callsentry.console")

HERE = Path(__file__).parent
SESSION_COOKIE = "callsentry_session"
SESSION_HOURS = 12
QUEUE_LIMIT = 200
API_LIMIT_MAX = 1000


@dataclass
class Console:
    """What the application holds: the data dir, its lake view, the accounts (read
    again when their file changes, so `console adduser` needs no restart)."""

    data_dir: Path
    view: LakeView
    rules: RuleBook
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    poll_s: int = 15
    # Told of each verdict recorded (alert and review ids, status, note, reviewer): the
    # command wires NATS publication here when `[relay.nats]` is on.
    on_reviews: Callable[[list[tuple[str, str]], str, str, str], None] | None = None
    _accounts: Accounts | None = None
    _accounts_stamp: tuple[int, int] | None = None

    def accounts(self) -> Accounts:
        path = accounts_path(self.data_dir)
        try:
            stat = path.stat()
            stamp: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = None
        if self._accounts is None or stamp != self._accounts_stamp:
            # A file broken since start-up keeps the accounts last read (the error is
            # logged); `console adduser` refuses to write a broken file anyway.
            from engine.console.accounts import AccountsFileError

            try:
                self._accounts = Accounts.load(path)
            except AccountsFileError as error:
                log.error("console: %s", error)
                if self._accounts is None:
                    self._accounts = Accounts(path)
            self._accounts_stamp = stamp
        return self._accounts


# -- small helpers ------------------------------------------------------------------------


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, int | float) and not isinstance(value, bool):
        # Seconds since the epoch (the actions' times).
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if not value.is_integer() else f"{value:g}"
    return str(value)


def _shown_text(value: Any) -> Any:
    if isinstance(value, str) and not isinstance(value, Markup):
        return shown(value)
    return value


def _prose(text: str) -> str:
    """The console's own description of an endpoint (a docstring, wrapped over lines)
    as one paragraph: its line breaks are where the source wrapped it, not text that
    `shown` should write as `\\x0a`."""
    return " ".join(text.split())


def _lines(text: str) -> Markup:
    """A text of several lines (a rule file) for a <pre>: each line as `shown` gives it,
    escaped; the line breaks kept."""
    return Markup("\n").join(escape(shown(line)) for line in text.splitlines())


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return value


def _fingerprint(account: Account) -> str:
    """Ties a session to the password it was opened with: a new password (adduser
    again) signs every session of that user out."""
    return hashlib.sha256(account.secret.encode()).hexdigest()[:24]


def _local_path(target: str, default: str = "/") -> str:
    """`target` if it is a path of this site (never `//host` or `http://...`)."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


def _moment(text: str) -> datetime | None:
    text = text.strip()
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time (2026-12-05 or 2026-12-05T10:00, UTC)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class BadRequest(Exception):
    """A filter or form value the console cannot take; the message says which."""


def queue_filter(params: Any) -> QueueFilter:
    status = (params.get("status") or "open").strip()
    if status != "all":
        try:
            status = status_named(status)
        except ValueError as error:
            raise BadRequest(str(error)) from None
    severities = tuple(s for s in params.getlist("severity") if s)
    for severity in severities:
        if severity not in SEVERITIES:
            raise BadRequest(f"severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    levels = tuple(s for s in params.getlist("level") if s)
    for level in levels:
        if level not in LEVELS:
            raise BadRequest(f"level {level!r} is not one of {', '.join(LEVELS)}")
    try:
        since = _moment(params.get("since") or "")
        until = _moment(params.get("until") or "")
    except ValueError as error:
        raise BadRequest(str(error)) from None
    return QueueFilter(
        status=status,
        severities=severities,
        levels=levels,
        rules=tuple(r for r in params.getlist("rule") if r),
        entity=(params.get("entity") or "").strip(),
        assignee=(params.get("assignee") or "").strip(),
        since=since,
        until=until,
    )


def queue_sort(params: Any, view: LakeView, default: str, choices: tuple[str, ...]) -> str:
    """The order asked for: one of `choices`; "exposure" only with a tariff list."""
    sort = (params.get("sort") or default).strip()
    if sort not in choices:
        raise BadRequest(f"sort {sort!r} is not one of {', '.join(choices)}")
    if sort == "exposure" and view.tariffs is None:
        raise BadRequest(
            "sorting by exposure needs a tariff list (callsentry console --tariffs FILE, "
            "or the setting console.tariffs)"
        )
    return sort


def _money(value: Any) -> str:
    return "" if value is None else f"{value:,.2f}"


def traffic_chart(
    view: LakeView, alert: dict[str, Any], window_s: int | None, now: datetime | None = None
) -> Any:
    """The entity's calls around the alert as the rule counts them: at each step, the
    calls started within the rule's window before it (a sliding count, in the unit of
    the rule's threshold when the rule counts calls), the alert's window shaded and
    the threshold drawn. Steps that have not begun by `now` are not drawn: their
    sliding count would carry the calls before them into times still to come."""
    start, end = alert["window_start"], alert["window_end"]
    window_s = window_s or max(60, int((end - start).total_seconds()))
    step_s = 60 if window_s <= 3600 else 3600
    # Up to the alert's own step whatever the clock says: a switch whose clock runs
    # ahead of this machine's would otherwise show an empty chart.
    now = max(now or datetime.now(tz=UTC), alert["raised_at"] + timedelta(seconds=step_s))
    steps_per_window = max(1, window_s // step_s)
    shown_steps = 36
    first = datetime.fromtimestamp(
        (int(alert["raised_at"].timestamp()) // step_s - shown_steps // 2) * step_s, tz=UTC
    )
    last = first + timedelta(seconds=step_s * shown_steps)
    counted = dict(
        view.traffic(
            alert["entity_type"],
            alert["entity"],
            first - timedelta(seconds=step_s * steps_per_window),
            last,
            step_s,
        )
    )
    bars: list[tuple[str, float]] = []
    band_first = band_last = -1
    for index in range(shown_steps):
        moment = first + timedelta(seconds=step_s * index)
        if moment >= now:
            break
        # Calls started in the window that ends at the end of this step.
        total = sum(
            counted.get(moment - timedelta(seconds=step_s * back), 0)
            for back in range(steps_per_window)
        )
        bars.append(((moment + timedelta(seconds=step_s)).strftime("%H:%M"), float(total)))
        if moment + timedelta(seconds=step_s) > start and moment <= end:
            band_first = index if band_first < 0 else band_first
            band_last = index
    window_text = f"{window_s // 60} min" if window_s < 7200 else f"{window_s // 3600} h"
    return bar_chart(
        bars,
        title=f"calls of {alert['entity_type']} {alert['entity']} in the {window_text} "
        f"before each time (UTC)",
        threshold=alert["threshold"],
        threshold_label=f"threshold {alert['threshold']:g} (rule {alert['rule_id']})",
        band=Band(band_first, band_last, "the alert's window") if band_first >= 0 else None,
        css_class="chart traffic",
    )


def day_chart(points: list[tuple[Any, int]], title: str) -> Any:
    bars = [
        (d.strftime("%m-%d") if isinstance(d, datetime) else str(d), float(n)) for d, n in points
    ]
    return bar_chart(bars, title=title, css_class="chart small")


# -- the API's shapes (for its OpenAPI description) ---------------------------------------


class ReviewIn(BaseModel):
    status: str = Field(description="open, investigating, confirmed, false_positive (fp), closed")
    note: str = Field(description="What was checked, what was found (required).")


class ReviewOut(BaseModel):
    alert_id: str
    review_id: str
    status: str
    reviewer: str


# -- the application ----------------------------------------------------------------------


def _for_the_api(request: Request) -> bool:
    """Whether a request is the API's (answered in JSON), not a page's."""
    return request.url.path.startswith("/api/")


def create_app(console: Console, secret: bytes, *, secure_cookies: bool = False) -> FastAPI:
    app = FastAPI(
        title="callsentry console API",
        description="Alerts, their evidence and their reviews. Authenticate with a session "
        "(the console's pages) or `Authorization: Bearer <token>` "
        "(`callsentry console token create`).",
        version="1",
        openapi_url="/api/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"], default_for_string=True, default=True),
    )
    # Every text a page shows passes engine.core.text.shown first (control and
    # reordering characters as visible escapes), then autoescape: the rule of
    # html_text, for every {{ value }} (the charts' Markup is escaped already).
    env.finalize = _shown_text
    env.filters["when"] = _when
    env.filters["number"] = _number
    env.filters["money"] = _money
    env.filters["lines"] = _lines
    env.filters["prose"] = _prose

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> Response:
        """FastAPI's own answer echoes each refused input, which JSON cannot always
        carry (NaN, Infinity: a 500 instead of the 422): where and why, not what. A
        page's request gets the console's page saying the same."""
        detail = [
            {
                "loc": [part if isinstance(part, int) else str(part) for part in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in error.errors()
        ]
        if _for_the_api(request):
            return JSONResponse({"detail": detail}, status_code=422)
        said = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)
        return problem(request, signed_in(request), f"the request is not valid: {said}", 422)

    @app.middleware("http")
    async def safe_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    # Added last, so it runs first: the session is there for the headers middleware's
    # handlers too.
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret.decode(),
        session_cookie=SESSION_COOKIE,
        max_age=SESSION_HOURS * 3600,
        same_site="strict",
        https_only=secure_cookies,
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def signed_in(request: Request) -> Account | None:
        name = request.session.get("user")
        if not isinstance(name, str):
            return None
        account = console.accounts().users.get(name)
        if account is None or request.session.get("pw") != _fingerprint(account):
            return None
        return account

    def api_account(request: Request) -> Account | None:
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            return console.accounts().check_token(header[7:].strip())
        return signed_in(request)

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not isinstance(token, str) or not token:
            token = new_csrf_token()
            request.session["csrf"] = token
        return token

    def page(
        request: Request,
        template: str,
        account: Account | None,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        **values: Any,
    ) -> HTMLResponse:
        html = env.get_template(template).render(
            request=request,
            user=account,
            csrf=csrf_token(request),
            statuses=STATUSES,
            severities=SEVERITIES,
            levels=LEVELS,
            **values,
        )
        return HTMLResponse(html, status_code=status_code, headers=headers)

    def to_login(request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            target = "/"  # a form's target is no page to come back to
        return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)

    def problem(
        request: Request,
        account: Account | None,
        message: str,
        code: int,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        return page(
            request, "problem.html", account, status_code=code, headers=headers, message=message
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(request: Request, error: StarletteHTTPException) -> Response:
        """No such page, or not that method: the API answers JSON, the pages a page."""
        if _for_the_api(request) or error.status_code < 400:
            return JSONResponse(
                {"detail": error.detail}, status_code=error.status_code, headers=error.headers
            )
        said = {404: "there is no such page", 405: "that page does not take that method"}
        message = said.get(error.status_code, str(error.detail))
        return problem(request, signed_in(request), message, error.status_code, error.headers)

    def unauthorized() -> JSONResponse:
        return JSONResponse(
            {"detail": "sign in, or send an API token: Authorization: Bearer <token>"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    # -- sign-in ----------------------------------------------------------------------

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request, next: str = "/") -> Response:
        return page(request, "login.html", None, next=_local_path(next), error="")

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await request.form()
        name = str(form.get("username", ""))[:200]
        password = str(form.get("password", ""))
        target = _local_path(str(form.get("next", "/")))
        client = request.client.host if request.client else "?"
        if not csrf_matches(request.session.get("csrf"), form.get("csrf")):
            return page(
                request,
                "login.html",
                None,
                status_code=403,
                next=target,
                error="the form was out of date; please sign in again",
            )
        wait, attempt = console.throttle.begin(client, name)
        if wait:
            log.warning(
                "console: sign-in refused for %s from %s: too many failures (%d s left)",
                shown(name),
                client,
                wait,
            )
            return page(
                request,
                "login.html",
                None,
                status_code=429,
                next=target,
                error=f"too many failed sign-ins; try again in {wait} s",
            )
        account = await run_in_threadpool(console.accounts().check_password, name, password)
        if account is None:
            log.warning("console: failed sign-in for %s from %s", shown(name), client)
            return page(
                request,
                "login.html",
                None,
                status_code=401,
                next=target,
                error="wrong name or password",
            )
        console.throttle.succeeded(client, name, attempt)
        request.session.clear()
        request.session.update(
            {"user": account.name, "pw": _fingerprint(account), "csrf": new_csrf_token()}
        )
        log.info("console: %s signed in from %s", account.name, client)
        return RedirectResponse(target, status_code=303)

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        form = await request.form()
        account = signed_in(request)
        if account is not None and not csrf_matches(request.session.get("csrf"), form.get("csrf")):
            # Another site's form may not sign anyone out; the user is told they still are
            # signed in, rather than sent to the sign-in page as if they were not.
            return problem(
                request, account, "the form has no valid CSRF token; reload the page", 403
            )
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # -- the queue ----------------------------------------------------------------------

    def queue_values(request: Request) -> dict[str, Any]:
        chosen = queue_filter(request.query_params)
        sort = queue_sort(request.query_params, console.view, "severity", SORTS)
        return {
            "chosen": chosen,
            "sort": sort,
            "tariffs": console.view.tariffs,
            "alerts": console.view.queue(chosen, QUEUE_LIMIT, sort),
            "counts": console.view.status_counts(chosen),
            "choices": {
                "rules": console.view.rule_ids(),
                # Alerts are assigned to console users only.
                "assignees": sorted(console.accounts().users),
            },
            "limit": QUEUE_LIMIT,
            "query": request.url.query,
            "poll_s": console.poll_s,
            "flash": request.session.pop("flash", ""),
        }

    @app.get("/", include_in_schema=False)
    def queue(request: Request) -> Response:
        account = signed_in(request)
        if account is None:
            return to_login(request)
        try:
            values = queue_values(request)
        except BadRequest as error:
            return problem(request, account, str(error), 400)
        except LakeViewError as error:
            return problem(request, account, str(error), 503)
        return page(request, "queue.html", account, **values)

    @app.get("/queue/rows", include_in_schema=False)
    def queue_rows(request: Request) -> Response:
        """The queue's rows alone, for the page's poll (new alerts without a reload)."""
        account = signed_in(request)
        if account is None:
            return Response(status_code=401)
        try:
            values = queue_values(request)
        except (BadRequest, LakeViewError) as error:
            return Response(str(error), status_code=400, media_type="text/plain")
        return page(request, "queue_rows.html", account, **values)

    async def form_act(request: Request, form: Any, account: Account) -> str:
        """Apply a page's review or assignment form; the message to show."""
        ids = [str(i) for i in form.getlist("alert_id") if str(i).strip()]
        if not ids:
            raise BadRequest("tick at least one alert")
        if form.get("action") == "assign":
            assignee = str(form.get("assignee", "")).strip()
            if assignee == "me":
                assignee = account.name
            if assignee and assignee not in console.accounts().users:
                raise BadRequest(f"{assignee!r} is not a console user")
            await run_in_threadpool(assign_alerts, console.data_dir, ids, assignee, account.name)
            who = assignee or "nobody"
            return f"{len(ids)} alert(s) assigned to {who}"
        status = str(form.get("status", ""))
        note = str(form.get("note", ""))
        # The page's own ids, whole: a forged or cut one names no alert.
        recorded = await run_in_threadpool(
            functools.partial(add_reviews, whole=True),
            console.data_dir,
            ids,
            status,
            note,
            account.name,
        )
        if console.on_reviews is not None:
            await run_in_threadpool(console.on_reviews, recorded, status, note, account.name)
        return f"{len(recorded)} alert(s) marked {status_named(status)}"

    @app.post("/act", include_in_schema=False)
    async def act(request: Request) -> Response:
        account = signed_in(request)
        if account is None:
            return to_login(request)
        form = await request.form()
        back = _local_path(str(form.get("back", "/")))
        if not csrf_matches(request.session.get("csrf"), form.get("csrf")):
            return problem(
                request, account, "the form has no valid CSRF token; reload the page", 403
            )
        if not account.may_review:
            return problem(
                request, account, f"{account.name} is a viewer: reviews need a reviewer", 403
            )
        try:
            message = await form_act(request, form, account)
        except (BadRequest, ReviewError) as error:
            return problem(request, account, str(error), 400)
        request.session["flash"] = message
        return RedirectResponse(back, status_code=303)

    # -- one alert ----------------------------------------------------------------------

    @app.get("/alerts/{alert_id}", include_in_schema=False)
    def alert_page(request: Request, alert_id: str) -> Response:
        account = signed_in(request)
        if account is None:
            return to_login(request)
        try:
            alert = console.view.alert(alert_id)
            if alert is None:
                # The start of an id, as the CLI takes it: its page, when it names one.
                named = console.view.alert_ids_starting(alert_id) if alert_id else []
                if len(named) == 1:
                    return RedirectResponse(f"/alerts/{named[0]}", status_code=303)
                return problem(request, account, f"no alert {alert_id!r}", 404)
            earlier = [
                a
                for a in console.view.entity_alerts(alert["entity"], alert["entity_type"], 30)
                if a["alert_id"] != alert["alert_id"]
            ]
            rule = console.rules.rules.get(alert["rule_id"])
            calls = console.view.evidence(alert)
            values = {
                "alert": alert,
                "rule": rule,
                "calls": calls,
                "tariffs": console.view.tariffs,
                "exposure": console.view.exposure_of(calls),
                "chart": traffic_chart(console.view, alert, rule.window_s if rule else None),
                "earlier": earlier,
                "reviews": console.view.reviews([alert["alert_id"]]),
                "escalations": console.view.escalations(alert["alert_id"]),
                "assignments": console.view.assignments(alert["alert_id"]),
                "users": sorted(console.accounts().users),
                "flash": request.session.pop("flash", ""),
                "exception": exception_in_force(
                    console.rules.folder, alert["rule_id"], alert["entity"], time.time()
                ),
            }
        except LakeViewError as error:
            return problem(request, account, str(error), 503)
        return page(request, "alert.html", account, **values)

    # -- actions waiting for a reviewer ---------------------------------------------------

    @app.get("/actions", include_in_schema=False)
    def actions_page(request: Request) -> Response:
        account = signed_in(request)
        if account is None:
            return to_login(request)
        pending: list[ActionRequest] = []
        recent: list[ActionRequest] = []
        try:
            book = open_book(console.data_dir)
        except NoActions:
            book = None  # no action was ever decided in this data dir
        except ActionError as error:
            return problem(request, account, str(error), 503)
        if book is not None:
            try:
                pending = book.requests(["pending"], limit=500)
                recent = [r for r in book.requests(limit=50) if r.state != "pending"]
            except OutboxError as error:
                return problem(request, account, str(error), 503)
            finally:
                book.close()
        return page(
            request,
            "actions.html",
            account,
            pending=pending,
            recent=recent,
            flash=request.session.pop("flash", ""),
        )

    @app.post("/actions/{request_id}", include_in_schema=False)
    async def decide_action(request: Request, request_id: int) -> Response:
        """A reviewer approves (the action is done by a running serve) or rejects a
        pending action request; the trail records the signed-in reviewer."""
        account = signed_in(request)
        if account is None:
            return to_login(request)
        form = await request.form()
        if not csrf_matches(request.session.get("csrf"), form.get("csrf")):
            return problem(
                request, account, "the form has no valid CSRF token; reload the page", 403
            )
        if not account.may_review:
            return problem(
                request, account, f"{account.name} is a viewer: actions need a reviewer", 403
            )
        decision = str(form.get("decision", ""))
        decisions = {"approve": (approve_action, "approved"), "reject": (reject_action, "rejected")}
        if decision not in decisions:
            return problem(request, account, "the decision must be approve or reject", 400)
        decide, said = decisions[decision]
        try:
            done = await run_in_threadpool(decide, console.data_dir, request_id, account.name)
        except ActionError as error:
            return problem(request, account, str(error), 400)
        request.session["flash"] = (
            f"action request {done.id} ({shown(done.action_id)} on {shown(done.entity)}) {said}"
        )
        return RedirectResponse("/actions", status_code=303)

    # -- an entity ----------------------------------------------------------------------

    @app.get("/entity", include_in_schema=False)
    def entity_page(request: Request, value: str = "", type: str = "") -> Response:
        account = signed_in(request)
        if account is None:
            return to_login(request)
        value = value.strip()
        if type and type not in ENTITY_TYPES:
            known = ", ".join(ENTITY_TYPES)
            return problem(request, account, f"type {type!r} is not one of {known}", 400)
        try:
            kinds = console.view.entity_types(value) if value else []
            shown_kinds = [type] if type else kinds
            sections = []
            for kind in shown_kinds:
                span = console.view.entity_span(kind, value)
                chart = None
                if span is not None:
                    days = max(1, (span[1] - span[0]).days + 1)
                    bucket_s = 3600 if days <= 3 else 86400
                    first = datetime.fromtimestamp(
                        (int(span[0].timestamp()) // bucket_s) * bucket_s, tz=UTC
                    )
                    counted = dict(
                        console.view.traffic(
                            kind, value, first, span[1] + timedelta(seconds=1), bucket_s
                        )
                    )
                    bars: list[tuple[str, float]] = []
                    moment = first
                    while moment <= span[1] and len(bars) < 400:
                        label = moment.strftime("%d %H:%M" if bucket_s == 3600 else "%m-%d")
                        bars.append((label, float(counted.get(moment, 0))))
                        moment += timedelta(seconds=bucket_s)
                    unit = "hour" if bucket_s == 3600 else "day"
                    chart = bar_chart(
                        bars, title=f"calls of {kind} {value} per {unit} (UTC)", css_class="chart"
                    )
                sections.append(
                    {
                        "kind": kind,
                        "chart": chart,
                        "calls": console.view.entity_calls(kind, value, 30),
                    }
                )
            alerts = console.view.entity_alerts(value, type or None, 100) if value else []
            reviews = console.view.reviews([a["alert_id"] for a in alerts]) if alerts else []
            lists = (
                [path.stem for path in _lists_holding(console.rules.folder, value)] if value else []
            )
        except LakeViewError as error:
            return problem(request, account, str(error), 503)
        return page(
            request,
            "entity.html",
            account,
            value=value,
            kinds=kinds,
            sections=sections,
            alerts=alerts,
            reviews=reviews,
            lists=lists,
        )

    # -- rules --------------------------------------------------------------------------

    @app.get("/rules", include_in_schema=False)
    def rules_page(request: Request) -> Response:
        account = signed_in(request)
        if account is None:
            return to_login(request)
        try:
            summary = console.view.rule_summary()
            per_day: dict[str, list[tuple[Any, int]]] = {}
            for rule_id, day, count in console.view.per_day("alerts"):
                per_day.setdefault(rule_id, []).append((day, count))
            shadow = console.view.shadow_summary()
            shadow_per_day: dict[str, list[tuple[Any, int]]] = {}
            for rule_id, day, count in console.view.per_day("shadow_alerts"):
                shadow_per_day.setdefault(rule_id, []).append((day, count))
            recent_shadow = console.view.shadow_recent(20)
        except LakeViewError as error:
            return problem(request, account, str(error), 503)
        for row in summary:
            row["fp_share"] = row["false_positive"] / row["reviewed"] if row["reviewed"] else None
            row["chart"] = day_chart(
                per_day.get(row["rule_id"], []), f"{row['rule_id']}: alerts per day"
            )
            row["rule"] = console.rules.rules.get(row["rule_id"])
        for row in shadow:
            row["chart"] = day_chart(
                shadow_per_day.get(row["rule_id"], []), f"{row['rule_id']}: would-be alerts per day"
            )
        shadow_rules = [r for r in console.rules.rules.values() if r.mode != "alert"]
        return page(
            request,
            "rules.html",
            account,
            summary=summary,
            shadow=shadow,
            shadow_rules=shadow_rules,
            recent_shadow=recent_shadow,
        )

    # -- the API ------------------------------------------------------------------------

    @app.get("/api/docs", include_in_schema=False)
    def api_docs(request: Request) -> Response:
        schema = app.openapi()
        return page(request, "apidocs.html", signed_in(request), schema=schema)

    @app.get("/api/alerts", summary="Alerts with their latest review status")
    def api_alerts(
        request: Request,
        status: str = "open",
        severity: str = "",
        rule: str = "",
        entity: str = "",
        limit: int = 100,
        sort: str = "time",
    ) -> Any:
        """`{"alerts": [...]}` with the `alerts_current` columns, newest first; `status=all`
        for every alert; `severity` and `rule` may be given more than once. With a tariff
        list each alert has `exposure` (in `currency`) and `unpriced_minutes`, and
        `sort=exposure` puts the largest exposure first (`sort=severity`: the queue's
        order, critical first)."""
        if api_account(request) is None:
            return unauthorized()
        try:
            chosen = queue_filter(request.query_params)
            order = queue_sort(request.query_params, console.view, "time", ("time", *SORTS))
        except BadRequest as error:
            return JSONResponse({"detail": str(error)}, status_code=400)
        if limit < 1:
            return JSONResponse({"detail": f"limit {limit}: give 1 or more"}, status_code=400)
        limit = min(API_LIMIT_MAX, limit)  # more than the most is the most (README)
        try:
            if order == "severity":
                rows = console.view.queue(chosen, limit, order, columns=QUEUE_COLUMNS)
            else:
                rows = console.view.newest_first(chosen, limit, order)
        except LakeViewError as error:
            return JSONResponse({"detail": str(error)}, status_code=503)
        tariffs = console.view.tariffs
        if tariffs is not None:
            return {"alerts": _json(rows), "currency": tariffs.currency}
        return {"alerts": _json(rows)}

    @app.get("/api/alerts/{alert_id}", summary="One alert with its evidence calls and reviews")
    def api_alert(request: Request, alert_id: str) -> Any:
        if api_account(request) is None:
            return unauthorized()
        try:
            alert = console.view.alert(alert_id)
            if alert is None:
                return JSONResponse({"detail": f"no alert {alert_id!r}"}, status_code=404)
            alert["calls"] = console.view.evidence(alert)
            alert["reviews"] = console.view.reviews([alert_id])
            alert["escalations"] = console.view.escalations(alert_id)
            if console.view.tariffs is not None:
                breakdown = console.view.exposure_of(alert["calls"])
                alert["exposure"] = sum(part["exposure"] for part in breakdown)
                alert["unpriced_minutes"] = sum(
                    part["minutes"] for part in breakdown if part["prefix"] is None
                )
                alert["exposure_by_prefix"] = breakdown
                alert["currency"] = console.view.tariffs.currency
        except LakeViewError as error:
            return JSONResponse({"detail": str(error)}, status_code=503)
        return _json(alert)

    @app.post(
        "/api/alerts/{alert_id}/review",
        summary="Record a verdict on an alert (appended to the review trail)",
        response_model=ReviewOut,
    )
    async def api_review(request: Request, alert_id: str, review: ReviewIn) -> Any:
        account = api_account(request)
        if account is None:
            return unauthorized()
        token_used = request.headers.get("authorization", "")[:7].lower() == "bearer "
        if not token_used and not csrf_matches(
            request.session.get("csrf"), request.headers.get("x-csrf-token")
        ):
            return JSONResponse(
                {"detail": "a session's POST needs the X-CSRF-Token header"}, status_code=403
            )
        if not account.may_review:
            return JSONResponse(
                {"detail": f"{account.name} is a viewer: reviews need a reviewer"},
                status_code=403,
            )
        reviewer = account.name if not token_used else f"{account.name} (API token)"
        try:
            # The whole id, as GET /api/alerts/{alert_id} takes it: a program that sent a
            # cut id would otherwise record its verdict on whichever alert it starts.
            ((full_id, review_id),) = await run_in_threadpool(
                functools.partial(add_reviews, whole=True),
                console.data_dir,
                [alert_id],
                review.status,
                review.note,
                reviewer,
            )
        except ReviewError as error:
            code = 404 if str(error).startswith("no alert") else 400
            return JSONResponse({"detail": str(error)}, status_code=code)
        if console.on_reviews is not None:
            await run_in_threadpool(
                console.on_reviews, [(full_id, review_id)], review.status, review.note, reviewer
            )
        return ReviewOut(
            alert_id=full_id,
            review_id=review_id,
            status=status_named(review.status),
            reviewer=reviewer,
        )

    return app


def _lists_holding(folder: Path | None, value: str) -> list[Path]:
    """The rule lists (rules/lists/*.yaml) that name `value`."""
    import yaml

    if folder is None or not (folder / "lists").is_dir():
        return []
    found = []
    for path in sorted((folder / "lists").glob("*.yaml")):
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        values = document.get("values") if isinstance(document, dict) else None
        if isinstance(values, list) and any(str(v) == value for v in values):
            found.append(path)
    return found
