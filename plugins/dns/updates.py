"""Talking to the DNS server: dynamic UPDATE messages (RFC 2136) and zone
transfers (AXFR), signed with the site's TSIG key. Blocking (dnspython):
called in the controller's plugin thread pool (``api.run_blocking``), never
on the reactor.

Updates add and delete *specific* records, so what Usher does not own at a
name stays (a cluster name loses only the address of the VM that went);
a PTR is deleted only if it still points at the VM (delete-specific-RR is
that condition). Adding a PTR replaces the reverse name's PTRs: the address
was given to this VM. Over TCP: a server that is down answers at once
(connection refused) instead of making every update wait for a timeout.
"""

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.update
import dns.xfr
import dns.zone

# What the messages of a transfer may hold at most: a zone of Usher's names
# (a VM has 2 or 3 records) is far below it; more is refused, not buffered.
MAX_TRANSFER_RECORDS = 1_000_000


class DnsUnavailable(Exception):
    """The server did not do what was asked (down, timed out, refused, bad
    signature); the message says which, never the key's secret."""


class DnsServer:
    """One authoritative server: ``address`` (an IP address text), ``port``,
    ``key`` (keyfile.TsigKey), ``timeout`` (seconds for one message or
    transfer), ``ttl`` of the records it adds."""

    def __init__(self, address, port, key, *, timeout=5.0, ttl=300):
        self.address = address
        self.port = port
        self.key = key
        self.timeout = timeout
        self.ttl = ttl

    def __str__(self):
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def update(self, zone, changes):
        """Apply ``changes`` to ``zone`` in one UPDATE message: a list of
        (name, rdtype, value, wanted) -- wanted: the record is added (a PTR
        replaces the name's PTRs), else that record is deleted. Returns
        None; DnsUnavailable if the server did not apply it."""
        message = dns.update.UpdateMessage(zone, keyring=self.key.keyring,
                                           keyname=self.key.name,
                                           keyalgorithm=self.key.algorithm)
        # Deletions first: a name's old records go before its new ones come.
        for name, rdtype, value, wanted in sorted(changes, key=lambda c: c[3]):
            rdata = dns.rdata.from_text(dns.rdataclass.IN, rdtype, _value(rdtype, value))
            owner = dns.name.from_text(name)
            if not wanted:
                message.delete(owner, rdata)
            elif rdtype == "PTR":
                message.replace(owner, self.ttl, rdata)
            else:
                message.add(owner, self.ttl, rdata)
        answer = self._send(message, f"update of {zone}")
        if answer.rcode() != dns.rcode.NOERROR:
            raise DnsUnavailable(f"{self}: update of {zone} refused: "
                                 f"{dns.rcode.to_text(answer.rcode())}")

    def transfer(self, zone):
        """-> list of (name, rdtype, value) of the whole zone (AXFR), names
        and values as texts without the final dot, lower case."""
        query = dns.message.make_query(zone, dns.rdatatype.AXFR)
        query.use_tsig(self.key.keyring, keyname=self.key.name, algorithm=self.key.algorithm)
        copy = dns.zone.Zone(zone, relativize=False)
        try:
            dns.query.inbound_xfr(self.address, copy, query=query, port=self.port,
                                  timeout=self.timeout, lifetime=self.timeout * 4)
        except dns.xfr.TransferError as e:
            raise DnsUnavailable(f"{self}: transfer of {zone} refused: "
                                 f"{dns.rcode.to_text(e.rcode)}") from None
        except (OSError, EOFError, dns.exception.DNSException) as e:
            raise DnsUnavailable(f"{self}: transfer of {zone}: {_describe(e)}") from None
        found = []
        for name, node in copy.nodes.items():
            owner = name.to_text(omit_final_dot=True).lower()
            for rdataset in node.rdatasets:
                rdtype = dns.rdatatype.to_text(rdataset.rdtype)
                for rdata in rdataset:
                    found.append((owner, rdtype, _text(rdata)))
                    if len(found) > MAX_TRANSFER_RECORDS:
                        raise DnsUnavailable(f"{self}: transfer of {zone}: more than "
                                             f"{MAX_TRANSFER_RECORDS} records")
        return found

    def _send(self, message, what):
        try:
            return dns.query.tcp(message, self.address, port=self.port, timeout=self.timeout)
        except (OSError, EOFError, dns.exception.DNSException) as e:
            raise DnsUnavailable(f"{self}: {what}: {_describe(e)}") from None


def _value(rdtype, value):
    return value + "." if rdtype == "PTR" else value


def _text(rdata):
    text = rdata.to_text()
    if rdata.rdtype == dns.rdatatype.PTR:
        text = text.rstrip(".").lower()
    return text


def _describe(error):
    if isinstance(error, dns.exception.Timeout):
        return "no answer (timed out)"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(error, dns.tsig.PeerBadKey):
        return "the server does not know the TSIG key (BADKEY)"
    if isinstance(error, dns.tsig.PeerBadSignature):
        return "the server found the TSIG signature bad (BADSIG): wrong secret?"
    if isinstance(error, (dns.tsig.PeerError, dns.tsig.BadSignature)):
        return f"TSIG verification failed ({error.__class__.__name__})"
    if isinstance(error, OSError):
        return error.strerror or str(error) or error.__class__.__name__
    return f"{error.__class__.__name__}: {error}"[:200]
