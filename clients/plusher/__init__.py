"""plusher: the XML-RPC gateway between the Plush execution manager and Usher
(paper, "Applications").

Plush drives resource providers over XML-RPC: *down-calls* it makes to the
provider, each answered at once, and *up-calls* the provider makes back to
Plush's own XML-RPC server when something it asked for is done. plusher is an
Usher client: every session holds one ``UsherClient`` connection, logged in
with the credentials Plush relays for its user (plusher checks no password
itself: the controller's authentication chain does), closed when idle.

Down-calls (``session`` is a session id from ``login``, or a struct
``{"user": ..., "password": ...}`` sent with each call instead)::

    login(user, password) -> session id
    logout(session) -> True
    request_vms(session, cluster, count, options, callback_url) -> request id
        Starts ``count`` VMs in the virtual cluster; returns at once. ``options``
        (a struct) become the start request's arguments (memory_mib, vcpus, os
        ..., as ``ush start --arg``); "lnms" (an array) suggests hosts.
    release(session, request id | [VM names]) -> {"released", "failed", "notes"}
    status(session, request id) -> struct (see ``Gateway.status``)
    list_vms(session[, cluster]) -> [{"name", "state", "lnm", "cluster",
                                      "memory_mib", "vcpus", "address"}]
    operate(session, operation, request id | [VM names])
        -> {"operation", "done": [{"name", "state"}], "failed": [{"name", "error"}],
            "notes"}

Up-calls, to the request's ``callback_url`` only (and only to hosts the site
allows: ``callback_hosts``; an empty ``callback_url`` asks for none), once
every VM of the request runs, or as soon as the request cannot be met::

    resources_ready(request id, [hosts])
    resources_failed(request id, message, [hosts that did start])

A host is the VM's address when an IP-management plugin put one in its
arguments (``address_args``), else its DNS name ``<name>.<owner>.<domain>``.
VMs that did start stay until Plush releases them (``release(request id)``).
An up-call that cannot be delivered is tried again with a doubling delay
(``upcall_attempts`` in all), then logged and given up; one Plush answers
with a fault is not repeated.

Errors are XML-RPC faults whose codes never change (``FAULT_*`` below);
input that is refused changes nothing. Methods are listed with
``system.listMethods`` and described by ``system.methodHelp``.

Layout: ``gateway`` (``Gateway``) holds sessions and requests and does the
work (no HTTP); ``upcalls`` (``UpcallSender``) delivers up-calls; ``resource``
(``PlusherResource``) is the thin XML-RPC boundary; ``checks`` vets what Plush
sends; ``wire`` holds the fault codes and states callers see; ``settings`` the
options; ``main`` (``make_service``, ``main``) the daemon. Every public name
of them is importable from here.
"""

from usher.clients.plusher.checks import (ANY_PORT, MAX_OPTION_NAME, check_callback_url,
                                          check_names, check_options, parse_callback_hosts,
                                          safe_url)
from usher.clients.plusher.gateway import Gateway, PlushRequest, Session
from usher.clients.plusher.main import (build, check_transport, main, make_service,
                                        server_endpoint)
from usher.clients.plusher.resource import BoundedRequest, PlusherResource, make_site
from usher.clients.plusher.settings import PlusherSettings
from usher.clients.plusher.upcalls import UpcallSender
from usher.clients.plusher.wire import (
    FAILED, FAULT_AUTHENTICATION, FAULT_FAILED, FAULT_INTERNAL, FAULT_INVALID_REQUEST,
    FAULT_NO_SUCH_REQUEST, FAULT_NO_SUCH_VM, FAULT_PERMISSION, FAULT_REJECTED,
    FAULT_UNAVAILABLE, READY, RELEASED, STARTING, UPCALL_CANCELLED, UPCALL_DELIVERED,
    UPCALL_GAVE_UP, UPCALL_NONE, UPCALL_PENDING, UPCALL_REFUSED, WAITING, NoSuchRequest)

__all__ = [
    "ANY_PORT", "BoundedRequest", "FAILED", "FAULT_AUTHENTICATION", "FAULT_FAILED",
    "FAULT_INTERNAL", "FAULT_INVALID_REQUEST", "FAULT_NO_SUCH_REQUEST", "FAULT_NO_SUCH_VM",
    "FAULT_PERMISSION", "FAULT_REJECTED", "FAULT_UNAVAILABLE", "Gateway", "MAX_OPTION_NAME",
    "NoSuchRequest", "PlushRequest", "PlusherResource", "PlusherSettings", "READY",
    "RELEASED", "STARTING", "Session", "UPCALL_CANCELLED", "UPCALL_DELIVERED",
    "UPCALL_GAVE_UP", "UPCALL_NONE", "UPCALL_PENDING", "UPCALL_REFUSED", "UpcallSender",
    "WAITING", "build", "check_callback_url", "check_names", "check_options",
    "check_transport", "main", "make_service", "make_site", "parse_callback_hosts",
    "safe_url", "server_endpoint",
]
