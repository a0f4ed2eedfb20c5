"""Usher: an extensible framework for managing clusters of virtual machines."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "usher/__init__.py").read_text()).group(1)

setup(
    name="usher",
    version=VERSION,
    description="Usher: an extensible framework for managing clusters of virtual machines",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.11",
    # plugins/ and clients/ install under the usher namespace, so nothing
    # generic ("plugins", "clients") lands in site-packages.
    packages=["usher", "usher.auth", "usher.client", "usher.controller", "usher.lnm",
              "usher.pki", "usher.plugins", "usher.plugins.sql", "usher.plugins.ldap",
              "usher.plugins.dns", "usher.plugins.filesystem", "usher.plugins.ha",
              "usher.plugins.leases",  # issue 15, leases
              "usher.clients",
              "usher.clients.ush", "usher.clients.plusher", "usher.clients.web",
              "usher.clients.batchd"],
    package_dir={"usher.plugins": "plugins", "usher.clients": "clients"},
    package_data={
        # The guest side of the filesystem plugin (usher-net-rc, its systemd unit
        # and SysV script, the guest README), installed beside the package.
        "usher.plugins.filesystem": ["guest/*"],
        # The web daemon's static files (clients/web/static/; vendor/ is filled by make setup).
        "usher.clients.web": ["static/*.*", "static/*/*.*", "static/*/*/*.*"],
    },
    install_requires=[
        "twisted>=24.7",
        "pyopenssl>=24",
        "service-identity>=24",
        "configobj>=5.0.8",
        "libvirt-python>=9.0",
        "bcrypt>=4",
        "cryptography>=42",
        "prometheus-client>=0.20",
        "pamela>=1.2",
        # Linear-time regular expressions for user-supplied selections.
        "google-re2>=1.1",
        # The migration state machine (usher.controller.migration).
        "automat>=22.10",
        # The SQL plugin's PostgreSQL engine (usher.plugins.sql.store).
        "psycopg[binary]>=3.1",
        # The LDAP plugin's directory client (usher.plugins.ldap).
        "ldap3>=2.9",
        # The DNS plugin's dynamic updates and zone transfers (usher.plugins.dns).
        "dnspython>=2.6",
        # Shell completion scripts generated from the parsers (usher.completion).
        "shtab>=1.7",
    ],
    extras_require={"test": ["pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6.100",
                             # The web API's OpenAPI document checked, and property
                             # tests generated from it (tests/test_web_openapi.py).
                             "openapi-spec-validator>=0.7", "schemathesis>=4",
                             # The browser tests drive Debian's chromium.
                             "playwright>=1.40"]},
    entry_points={"console_scripts": [
        "usherctrl = usher.controller.main:main",
        "usherlnm = usher.lnm.main:main",
        "ush = usher.clients.ush:main",
        "plusher = usher.clients.plusher:main",
        "usherweb = usher.clients.web:main",
        "usher = usher.admin:main",
        # The RRC-KI batch policy daemon and its submit command (usher.clients.batchd).
        "usherbatchd = usher.clients.batchd:main",
        "usher-batch = usher.clients.batchd.cli:main",
        # The in-VM tool for a cluster's LDAP branch (also usable as one copied file).
        "usher-cluster-ldap = usher.plugins.ldap.vmtool:main",
    ]},
    data_files=[
        ("share/usher/etc", ["etc/ctrl.config.orig", "etc/lnm.config.orig",
                             "etc/ush.config.orig", "etc/lnm-qemu.config.example",
                             "etc/plusher.config.orig", "etc/web.config.orig",
                             "etc/batchd.config.orig"]),
        ("share/usher/etc/plugins", sorted(f"etc/plugins/{p.name}"
                                           for p in (HERE / "etc/plugins").glob("*.config"))),
        ("share/usher/etc/ldap", ["etc/ldap/usher-acl.conf", "etc/ldap/usher-acl.ldif"]),
        ("share/usher/initscripts", ["initscripts/usherctrl", "initscripts/usherlnm",
                                     "initscripts/plusher",
                                     "initscripts/usherctrl.service",
                                     "initscripts/usherlnm.service",
                                     "initscripts/plusher.service",
                                     "initscripts/usherweb",
                                     "initscripts/usherweb.service",
                                     "initscripts/usherbatchd",
                                     "initscripts/usherbatchd.service",
                                     "initscripts/install.sh"]),
    ],
)
