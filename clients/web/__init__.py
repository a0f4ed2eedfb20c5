"""usherweb: Usher's web interface and REST API (WEB_SPEC; README, "The web
interface and REST API").

An Usher client like plusher: every logged-in browser or script has a
session holding its own ``UsherClient``, logged in with the user's
credentials (the controller's authentication chain checks them, and its
plugins decide what the user may see and do). The browser interface's
files are in ``static/``; the REST API is under /api/v1 (OpenAPI document
at /api/v1/openapi.json); GET /api/v1/stream is a Server-Sent Events stream
of the user's VMs, fed by the controller's change notifications.

Layout: ``sessions`` (``WebSessions``: sessions, tokens, expiry; no HTTP),
``api`` (``Api`` the handlers, ``ApiResource`` the HTTP boundary),
``stream`` (``EventStream``), ``errors`` (codes and statuses), ``openapi``
(the document), ``resource`` (the site: static files, security headers,
bounded bodies), ``settings`` (``WebSettings``), ``main`` (the daemon).
"""

from usher.clients.web.api import Api, ApiResource, encode_json
from usher.clients.web.errors import STATUSES, ApiError
from usher.clients.web.main import (build, build_api, check_transport, main, make_service,
                                    url_of)
from usher.clients.web.openapi import document
from usher.clients.web.resource import make_site
from usher.clients.web.sessions import COOKIE, TOKEN, WebSession, WebSessions
from usher.clients.web.settings import WebSettings
from usher.clients.web.stream import EventStream

__all__ = ["Api", "ApiError", "ApiResource", "COOKIE", "EventStream", "STATUSES", "TOKEN",
           "WebSession", "WebSessions", "WebSettings", "build", "build_api",
           "check_transport", "document", "encode_json", "main", "make_service",
           "make_site", "url_of"]
