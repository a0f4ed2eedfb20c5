"""usherweb's checks of what a request says: JSON body fields, selections,
the query string (taken from the URI: twisted's request.args also holds a
form body's fields). Each refusal is an InvalidRequest naming the field."""

import re
from urllib.parse import parse_qsl

from usher import naming
from usher.errors import InvalidRequest
from usher.protocol import MAX_FIELD
from usher.vmset import Selection

MAX_LIST_ITEMS = 100_000
ARG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_string(value, field, *, empty=False):
    if not isinstance(value, str) or (not value and not empty) or len(value) > MAX_FIELD:
        raise InvalidRequest(f"{field} must be a{'' if empty else ' non-empty'} string "
                             f"(at most {MAX_FIELD} characters)")
    return value


def check_strings(value, field):
    if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS:
        raise InvalidRequest(f"{field} must be a list of strings")
    return [check_string(item, f"each of {field}") for item in value]


def check_count(value, field, low=1, high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        bounds = f"at least {low}" + (f" and at most {high}" if high is not None else "")
        raise InvalidRequest(f"{field} must be an integer {bounds}")
    return value


def check_start_args(value):
    """``args``: an object of short keys to strings, numbers or booleans."""
    if not isinstance(value, dict):
        raise InvalidRequest("args must be an object")
    for key, item in value.items():
        if not ARG_KEY.match(key) or len(key) > 64:
            raise InvalidRequest(f"args: {key[:64]!r} is not a valid argument name")
        if not isinstance(item, (str, int, float, bool)) or (
                isinstance(item, str) and len(item) > MAX_FIELD):
            raise InvalidRequest(f"args: {key} must be a string, number or boolean")
    return dict(value)


def check_selection(body, required=True):
    """``{"names"} | {"regex"} | {"cluster"}`` (combinable, as ush's -r, -n
    and names), filtered or (alone) given by ``{"lnm"}``: the hosts the VMs
    are on (names, ranges, /regex/ or ~regex, as ush's --lnm) -> Selection."""
    names = check_strings(body["names"], "names") if "names" in body else []
    regex = check_string(body["regex"], "regex", empty=True) if "regex" in body else None
    clusters = body.get("cluster", [])
    clusters = [clusters] if isinstance(clusters, str) else clusters
    clusters = check_strings(clusters, "cluster") if "cluster" in body else []
    for cluster in clusters:
        naming.check_label(cluster, "cluster name")
    lnms = body.get("lnm", [])
    lnms = [lnms] if isinstance(lnms, str) else lnms
    lnms = check_strings(lnms, "lnm") if "lnm" in body else []
    selection = Selection(names=names, regex=regex, clusters=clusters, lnms=lnms)
    if required and not selection:
        raise InvalidRequest("nothing selected: give names, regex, cluster or lnm")
    return selection


def parse_query(request, allowed):
    """The query string -> {name: [values]}; unknown parameters are refused.
    (From the URI: twisted's request.args also holds a form body's fields.)"""
    query = {}
    text = request.uri.partition(b"?")[2]
    try:
        pairs = parse_qsl(text.decode("ascii"), keep_blank_values=True, errors="strict",
                          max_num_fields=100)
    except (UnicodeError, ValueError):
        raise InvalidRequest("the query string is not valid (UTF-8, at most 100 "
                             "parameters)") from None
    for name, value in pairs:
        query.setdefault(name, []).append(value)
        if name not in allowed:
            raise InvalidRequest(f"unknown query parameter {name[:40]!r}; known: "
                                 + ", ".join(sorted(allowed)))
    return query


def one_param(query, name, default=None):
    values = query.get(name)
    if not values:
        return default
    if len(values) > 1:
        raise InvalidRequest(f"{name} given more than once")
    return values[0]


def int_param(query, name, default, low, high):
    text = one_param(query, name)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return check_count(int(text), name, low, high)


def flag_param(query, name):
    text = one_param(query, name, "0")
    if text not in ("0", "1", "true", "false"):
        raise InvalidRequest(f"{name} must be 1 or 0")
    return text in ("1", "true")
