"""Reading a BIND TSIG key file, as ``tsig-keygen`` writes it::

    key "usher-key" {
        algorithm hmac-sha256;
        secret "base64...";
    };

-> ``TsigKey`` (name, algorithm, and the dnspython keyring to sign with).
The secret is never put in an error message or a log line: a bad file is
described by what is wrong with it, never by what it holds.
"""

import base64
import binascii
import re

import dns.exception
import dns.name
import dns.tsig
import dns.tsigkeyring

# The algorithms BIND's tsig-keygen offers (hmac-md5 only for old servers).
ALGORITHMS = {
    "hmac-md5": dns.tsig.HMAC_MD5, "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-sha224": dns.tsig.HMAC_SHA224, "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384, "hmac-sha512": dns.tsig.HMAC_SHA512,
}
MAX_KEY_FILE = 64 * 1024

_COMMENT = re.compile(r"(#|//)[^\n]*|/\*.*?\*/", re.S)
_KEY = re.compile(r'\s*key\s+"?([A-Za-z0-9._-]{1,255})"?\s*\{([^{}]*)\}\s*;\s*')
_STATEMENT = re.compile(r'\s*(algorithm|secret)\s+"?([^";\s]+)"?\s*;\s*', re.S)


class KeyFileError(ValueError):
    """What is wrong with a key file (never its secret)."""


class TsigKey:
    def __init__(self, name, algorithm, secret):
        self.name = dns.name.from_text(name)
        self.algorithm = ALGORITHMS[algorithm]
        self.algorithm_text = algorithm
        self.keyring = dns.tsigkeyring.from_text({name: (algorithm, secret)})

    def __repr__(self):
        return f"<TsigKey {self.name.to_text(omit_final_dot=True)} {self.algorithm_text}>"


def parse_key_text(text):
    """-> TsigKey of the one ``key`` statement in ``text``; KeyFileError."""
    text = _COMMENT.sub(" ", text)
    found = _KEY.fullmatch(text)
    if found is None:
        raise KeyFileError('not one BIND key statement (key "NAME" { algorithm ALG; '
                           'secret "BASE64"; };)')
    name, body = found.groups()
    values = {}
    position = 0
    while position < len(body):
        statement = _STATEMENT.match(body, position)
        if statement is None:
            if body[position:].strip():
                raise KeyFileError(f"key {name!r}: only 'algorithm' and 'secret' statements "
                                   "are understood")
            break
        keyword, value = statement.groups()
        if keyword in values:
            raise KeyFileError(f"key {name!r}: {keyword} given twice")
        values[keyword] = value
        position = statement.end()
    for keyword in ("algorithm", "secret"):
        if keyword not in values:
            raise KeyFileError(f"key {name!r} has no {keyword}")
    algorithm = values["algorithm"].lower()
    if algorithm not in ALGORITHMS:
        raise KeyFileError(f"key {name!r}: unknown algorithm {algorithm[:40]!r} "
                           f"(known: {', '.join(sorted(ALGORITHMS))})")
    try:
        decoded = base64.b64decode(values["secret"], validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"key {name!r}: the secret is not base64") from None
    if len(decoded) < 16:
        raise KeyFileError(f"key {name!r}: the secret is shorter than 128 bits")
    try:
        return TsigKey(name, algorithm, values["secret"])
    except (dns.exception.DNSException, ValueError):
        raise KeyFileError(f"key {name!r}: not a valid key name") from None


def read_key_file(path):
    """-> TsigKey read from ``path``; KeyFileError saying what is wrong
    (unreadable, too big, not a key statement)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read it: {e.strerror or e}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"larger than {MAX_KEY_FILE} bytes: not a key file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError("not UTF-8 text") from None
    return parse_key_text(text)
