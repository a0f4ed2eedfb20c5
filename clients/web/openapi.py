"""The OpenAPI 3.1 document of the REST API, served at
/api/v1/openapi.json (and checked by openapi-spec-validator and
schemathesis in the tests: what it says is what the daemon does)."""

from usher import __version__, errors as usher_errors, states
from usher.clients.web import errors

JSON = "application/json"


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind):
    return {"type": [kind, "null"]}


STRING_LIST = {"type": "array", "items": {"type": "string"}}
SELECTION_PROPERTIES = {
    "names": {**STRING_LIST, "description": "VM names or ranges (short or full)"},
    "regex": {"type": "string", "description": "RE2 regular expression on full names"},
    "cluster": {"oneOf": [{"type": "string"}, STRING_LIST],
                "description": "virtual cluster name(s)"},
    "lnm": {"oneOf": [{"type": "string"}, STRING_LIST],
            "description": "only the VMs on these LNMs (names, ranges, /regex/ or ~regex); "
                           "alone: every VM you may see on them"},
}

# What the summary of an operation cannot say (issue 17: destroy keeps VMs).
OPERATION_NOTES = {
    "destroy": "Hard power-off (Table 3): the VMs are kept, shut off; start boots them again.",
    "delete": "Remove VMs that are off (shutoff, hibernated, missing), their definitions "
              "and saved images; VMs that run are refused unless force is true.",
}
# What each of Usher's codes means (usher.errors.ERROR_CODES).
CODE_MEANINGS = "; ".join(f"{code}: {meaning}"
                          for code, (_, meaning) in usher_errors.ERROR_CODES.items())
FAILED_VM = {
    "type": "object", "required": ["name", "error"],
    "properties": {"name": {"type": "string"}, "error": {"type": "string"},
                   "code": {"type": "string", "enum": sorted(usher_errors.ERROR_CODES),
                            "description": "why this VM failed (stable)"}}}
DONE_VM = {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string"}, "state": _nullable("string"),
                   "lnm": {"type": "string"},
                   "already": {"type": "boolean",
                               "description": "the VM was in that state already (success)"}}}

SCHEMAS = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string", "enum": sorted(errors.STATUSES),
                                    "description": "stable; Usher's codes are those of "
                                                   "ush --json ('ush help exit-codes'): "
                                                   + CODE_MEANINGS},
                           "message": {"type": "string"}}}}},
    "Session": {
        "type": "object", "required": ["user", "admin", "domain", "csrf"],
        "properties": {"user": {"type": "string"}, "admin": {"type": "boolean"},
                       "domain": {"type": "string"},
                       "csrf": {"type": "string",
                                "description": "send as X-CSRF-Token with every "
                                               "state-changing request (cookie sessions)"}}},
    "Login": {
        "type": "object", "required": ["username", "password"], "additionalProperties": False,
        "properties": {"username": {"type": "string", "minLength": 1},
                       "password": {"type": "string"}}},
    "Token": {
        "type": "object", "required": ["token", "expires"],
        "properties": {"token": {"type": "string"},
                       "expires": {"type": "number", "description": "Unix time"},
                       "idle_timeout": {"type": "number"}}},
    "VM": {
        "type": "object", "required": ["name", "state"],
        "description": "A VM record as `ush --json list` gives it (other users' come "
                       "without args).",
        "properties": {"name": {"type": "string"}, "owner": _nullable("string"),
                       "cluster": _nullable("string"),
                       "state": {"type": "string", "enum": list(states.ALL_STATES)},
                       "lnm": _nullable("string"), "memory_mib": _nullable("integer"),
                       "vcpus": _nullable("integer"), "uuid": _nullable("string"),
                       "managed": {"type": "boolean"}, "version": {"type": "integer"},
                       "args": {"type": "object"},
                       "status": {"type": "object",
                                  "description": "1/5/15-minute figures (GET /vms/{name})"}}},
    "VMList": {
        "type": "object", "required": ["vms", "total"],
        "properties": {"vms": {"type": "array", "items": _ref("VM")},
                       "total": {"type": "integer", "minimum": 0}}},
    "Start": {
        "type": "object", "additionalProperties": False,
        "description": "names, or cluster and count",
        "properties": {"names": STRING_LIST, "cluster": {"type": "string"},
                       "count": {"type": "integer", "minimum": 1},
                       "lnms": {**STRING_LIST, "description": "suggested hosts"},
                       "args": {"type": "object", "additionalProperties": {
                           "type": ["string", "number", "boolean"]}},
                       "memory_mib": {"type": "integer", "minimum": 1},
                       "vcpus": {"type": "integer", "minimum": 1}}},
    "Selection": {"type": "object", "additionalProperties": False,
                  "properties": SELECTION_PROPERTIES},
    "Delete": {"type": "object", "additionalProperties": False,
               "properties": dict(SELECTION_PROPERTIES, force={
                   "type": "boolean", "description": "also VMs that run: powered off hard "
                   "(destroy) first; without it such VMs are refused"})},
    "Migrate": {"type": "object", "additionalProperties": False, "required": ["lnms"],
                "properties": dict(SELECTION_PROPERTIES, lnms=STRING_LIST)},
    "Result": {
        "type": "object",
        "description": "The controller's result as ush --json shows it (started/done/"
                       "migrated, failed, notes, elapsed) and `summary`: ush's text.",
        "properties": {"started": {"type": "array", "items": DONE_VM},
                       "done": {"type": "array", "items": DONE_VM},
                       "migrated": {"type": "array"},
                       "failed": {"type": "array", "items": FAILED_VM},
                       "notes": {"type": "array"}, "elapsed": _nullable("number"),
                       "summary": {"type": "string"}}},
    "LNM": {"type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "connected": {"type": "boolean"},
                           "committed_memory_mib": {
                               "type": "integer", "description":
                               "configured memory of the VMs placed on the host: what "
                               "placement counts (status.free_memory_mib is what the host "
                               "measures free)"},
                           "committed_vcpus": {"type": "integer"},
                           "test_host": {"type": "boolean",
                                         "description": "an embedded libvirt test host "
                                                        "(its VMs run nothing)"},
                           "status": {"type": "object"}}},
    "LNMList": {"type": "object", "required": ["lnms"],
                "properties": {"lnms": {"type": "array", "items": _ref("LNM")}}},
    "Top": {"type": "object", "required": ["lnms", "vms"],
            "properties": {"lnms": {"type": "array", "items": _ref("LNM")},
                           "vms": {"type": "array", "items": _ref("VM")}}},
    "Problems": {"type": "object", "required": ["lost", "missing", "unmanaged"],
                 "properties": {k: {"type": "array", "items": _ref("VM")}
                                for k in ("lost", "missing", "unmanaged")}},
    "Plugins": {"type": "object", "required": ["available", "registered"],
                "properties": {"available": STRING_LIST, "about": {"type": "object"},
                               "registered": {"type": "array", "items": {"type": "object"}}}},
    "Register": {"type": "object", "additionalProperties": False,
                 "required": ["name", "event"],
                 "properties": {"name": {"type": "string"}, "event": {"type": "string"},
                                "config_file": {"type": "string"},
                                "order": {"type": "integer"}}},
    "Unregister": {"type": "object", "additionalProperties": False, "required": ["name"],
                   "properties": {"name": {"type": "string"}, "event": {"type": "string"}}},
}


def _errors(*codes):
    statuses = sorted({errors.STATUSES[c] for c in codes} | {400, 401, 413, 415, 500, 503})
    return {str(s): {"description": "error", "content": {JSON: {"schema": _ref("Error")}}}
            for s in statuses}


def _op(summary, ok=200, schema=None, body=None, params=(), codes=(), public=False,
        content=JSON, description=None):
    responses = {str(ok): {"description": "success"}}
    if schema is not None:
        responses[str(ok)]["content"] = {content: {"schema": schema}}
    responses.update(_errors(*codes, *(() if public else ("not_logged_in",))))
    if body is not None:
        responses.setdefault("415", _errors()["415"])
    operation = {"summary": summary, "responses": responses}
    if description:
        operation["description"] = description
    if params:
        operation["parameters"] = list(params)
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    if public:
        operation["security"] = []
    return operation


def _query(name, schema, description=""):
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _path(name):
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1}}


def document():
    paths = {
        "/login": {"post": _op("Log in: a new session (cookie usher_session)",
                               schema=_ref("Session"), body=_ref("Login"), public=True,
                               codes=("authentication_failed",))},
        "/logout": {"post": _op("End the session and its controller connection", ok=204,
                                codes=("csrf_failed",))},
        "/session": {"get": _op("The session's user", schema=_ref("Session"))},
        "/tokens": {"post": _op("A bearer token for scripts (returned once)", ok=201,
                                schema=_ref("Token"), codes=("csrf_failed",))},
        "/tokens/current": {"delete": _op("End the bearer token this request carries",
                                          ok=204)},
        "/vms": {"get": _op(
            "The caller's VMs, filtered (AND), sorted by name", schema=_ref("VMList"),
            params=[_query("regex", {"type": "string"}, "RE2, on full names"),
                    _query("cluster", {"type": "string"}),
                    _query("state", {"type": "string", "enum": list(states.ALL_STATES)},
                           "repeat for any of several"),
                    _query("lnm", {"type": "string"}),
                    _query("names", {"type": "string"}, "comma-separated names"),
                    _query("offset", {"type": "integer", "minimum": 0,
                                      "maximum": 10 ** 9}),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 5000})])},
        "/vms/start": {"post": _op("Start VMs (ush start)", schema=_ref("Result"),
                                   body=_ref("Start"),
                                   codes=("csrf_failed", "permission_denied", "rejected",
                                          "outcome_unknown"))},
        "/vms/migrate": {"post": _op("Migrate VMs (ush migrate)", schema=_ref("Result"),
                                     body=_ref("Migrate"),
                                     codes=("csrf_failed", "permission_denied", "no_such_vm",
                                            "rejected", "outcome_unknown"))},
        "/vms/{name}": {"get": _op("One VM with its figures", schema=_ref("VM"),
                                   params=[_path("name")], codes=("no_such_vm",))},
        "/lnms": {"get": _op("The LNMs (with figures: status=1)", schema=_ref("LNMList"),
                             params=[_query("status", {"type": "string",
                                                       "enum": ["0", "1", "true", "false"]})])},
        "/lnms/{name}": {"get": _op("One LNM with its figures", schema=_ref("LNM"),
                                    params=[_path("name")], codes=("no_such_lnm",))},
        "/top": {"get": _op("Hosts and their busiest VMs (ush top)", schema=_ref("Top"),
                            params=[_query("count", {"type": "integer", "minimum": 0,
                                                     "maximum": 1000})])},
        "/problems": {"get": _op("Lost, missing and unmanaged VMs the caller may see",
                                 schema=_ref("Problems"))},
        "/plugins": {"get": _op("Plugins (administrators)", schema=_ref("Plugins"),
                                codes=("permission_denied",))},
        "/plugins/register": {"post": _op("Register a plugin (administrators)",
                                          schema=_ref("Plugins"), body=_ref("Register"),
                                          codes=("csrf_failed", "permission_denied"))},
        "/plugins/unregister": {"post": _op("Unregister a plugin (administrators)",
                                            schema=_ref("Plugins"), body=_ref("Unregister"),
                                            codes=("csrf_failed", "permission_denied"))},
        "/stream": {"get": _op(
            "Server-Sent Events: snapshot, snapshot-part, snapshot-end, changes, "
            "connection, session-ended; ': keepalive' comments",
            schema={"type": "string"}, content="text/event-stream")},
        "/openapi.json": {"get": _op("This document", schema={"type": "object"},
                                     public=True)},
    }
    for operation in states.OPERATIONS:
        paths[f"/vms/{operation}"] = {"post": _op(
            f"{operation} the selected VMs (ush {operation})", schema=_ref("Result"),
            body=_ref("Delete" if operation == "delete" else "Selection"),
            description=OPERATION_NOTES.get(operation),
            codes=("csrf_failed", "permission_denied", "no_such_vm", "rejected",
                   "outcome_unknown"))}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Usher REST API", "version": __version__,
                 "description": "usherweb's API: the controller's Table 3 and Table 4 for "
                                "browsers (cookie session + X-CSRF-Token) and scripts "
                                "(Authorization: Bearer TOKEN from POST /tokens). Errors: "
                                "{\"error\": {\"code\", \"message\"}}, the message as ush "
                                "prints it."},
        "servers": [{"url": "/api/v1"}],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "cookie": {"type": "apiKey", "in": "cookie", "name": "usher_session"},
                "bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"cookie": []}, {"bearer": []}],
    }
