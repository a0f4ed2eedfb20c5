"""The site's small PKI and the TLS settings of Usher's connections.

- ``init_ca`` / ``issue_cert`` create a site CA and certificates signed by it
  (``usher ca init`` / ``usher cert issue --controller|--lnm|--gateway``).
- Certificate roles. Every certificate Usher issues carries its role, one of
  ``ROLES``, in two places: the subject attribute ``ROLE_OID`` (Usher's own
  object identifier, value ``controller``, ``lnm`` or ``gateway``; e.g.
  ``openssl x509 -subject`` shows ``2.25.1485...=lnm``) and the extended key
  usages the role needs (``ROLE_USAGES``). Its common name is its identity
  (the controller's host, the LNM's name, the gateway's host). Roles:

  ``controller``  serves the client and LNM ports; TLS client of the LNMs'
                  recovery listeners. Names: the hosts it is dialled as.
  ``lnm``         TLS client of the controller's LNM port; serves its recovery
                  listener, which the controller verifies by LNM name. Names:
                  the LNM's name only.
  ``gateway``     plusher and other web daemons: serves HTTPS, and may present
                  its certificate on the controller's client port, where it is
                  recognised as a trusted gateway (``peer_role``).

- ``server_tls_options`` / ``client_tls_options``: TLS 1.2+ against the site
  CA, checking the role of the peer's certificate (and, for the LNM port, its
  name against an allow-list, ``NameAllowList``) in the handshake: a peer
  with the wrong role, no role (a certificate issued before roles) or a name
  not allowed fails the handshake, and the refusing side logs one line naming
  the certificate's CN and role. Each also checks that the process's own
  certificate has the role it serves in (a ``ConfigError`` naming the remedy).
- ``peer_identity`` / ``peer_role``: the (CN, role) of a peer accepted by
  those checks, for the code behind a listener (the controller's login code
  trusts a client-reported source address only from a ``gateway``).

Modules, every public name of which is importable from here: ``certificates``
(reading certificates and keys, roles, identities), ``tls`` (TLS options,
peer checks, peer identities), ``authority`` (the CA and issuing).

Everything here reads or writes files and is meant for start-up and the admin
command, not for the reactor thread while serving. Problems with existing
files raise ``usher.errors.ConfigError`` naming the file; bad arguments raise
``usher.errors.InvalidRequest`` and write nothing.
"""

from usher.pki.authority import (CA_CERT_FILE, CA_KEY_FILE, DEFAULT_CA_DIR, KEY_TYPES,
                                 KeyPairFiles, init_ca, issue_cert)
from usher.pki.certificates import (ROLE_CONTROLLER, ROLE_GATEWAY, ROLE_LNM, ROLE_OID,
                                    ROLE_USAGES, ROLES, PeerIdentity, certificate_identity,
                                    load_certificate, load_private_key)
from usher.pki.tls import (MINIMUM_TLS_VERSION, CertificateRefused, NameAllowList,
                           client_tls_options, client_tls_options_for, peer_common_name,
                           peer_identity, peer_role, server_tls_options,
                           verify_certificate_names)

__all__ = [
    "CA_CERT_FILE", "CA_KEY_FILE", "CertificateRefused", "DEFAULT_CA_DIR", "KEY_TYPES",
    "KeyPairFiles", "MINIMUM_TLS_VERSION", "NameAllowList", "PeerIdentity", "ROLES",
    "ROLE_CONTROLLER", "ROLE_GATEWAY", "ROLE_LNM", "ROLE_OID", "ROLE_USAGES",
    "certificate_identity", "client_tls_options", "client_tls_options_for", "init_ca",
    "issue_cert", "load_certificate", "load_private_key", "peer_common_name",
    "peer_identity", "peer_role", "server_tls_options", "verify_certificate_names",
]
