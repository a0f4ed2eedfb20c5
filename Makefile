# Usher: set-up, sandbox, tests and benchmarks on a Debian machine.
# Every target installs what it needs (Debian packages as root, a virtualenv).

VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
SANDBOX_DIR ?= $(CURDIR)/sandbox
# Debian packages: libvirt's client library (its test driver is the embedded
# hypervisor), what libvirt-python needs to build, and libvirtd (the failure
# tests give each LNM a private daemon), PostgreSQL (the SQL plugin's tests
# start a private server, tests/pgserver.py), OpenLDAP and BIND (the LDAP and
# DNS plugins' tests start private slapd and named), Chromium (the web
# interface's browser tests drive it through Playwright). The real-hypervisor
# test installs QEMU itself (tests/realhv/hosts.py).
APT_PACKAGES = libvirt-dev pkg-config gcc python3-dev python3-venv libvirt-daemon \
	postgresql slapd ldap-utils bind9 bind9-utils dnsutils chromium
# The browser interface's front-end libraries (clients/web/package.json),
# copied into its static/vendor/ (not committed; no build step).
WEB     = clients/web
VENDOR  = $(WEB)/static/vendor

.PHONY: setup sandbox test bench bench-sql bench-web bench-web-browser bench-batch bench-failover clean

setup: $(VENV)/.installed $(VENDOR)/.installed

$(VENV)/.installed: setup.py
	@if ! pkg-config --exists libvirt 2>/dev/null || ! command -v gcc >/dev/null \
	    || ! command -v libvirtd >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	    || ! command -v slapd >/dev/null || ! command -v named >/dev/null \
	    || ! command -v ldapadd >/dev/null || ! command -v tsig-keygen >/dev/null \
	    || ! command -v chromium >/dev/null; then \
	  echo "installing Debian packages: $(APT_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENDOR)/.installed: $(WEB)/package.json $(WEB)/package-lock.json $(VENV)/.installed
	@command -v npm >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends npm; }
	cd $(WEB) && npm ci --ignore-scripts --omit=dev --no-audit --no-fund --loglevel=error
	mkdir -p $(VENDOR)
	cp $(WEB)/node_modules/uplot/dist/uPlot.esm.js $(WEB)/node_modules/uplot/dist/uPlot.min.css \
	   $(WEB)/node_modules/uplot/LICENSE $(VENDOR)/
	touch $@

sandbox: setup
	$(VENV)/bin/usher sandbox --dir $(SANDBOX_DIR) --shell

test: setup
	$(PY) -m pytest -q tests

# SCALE=large: 50,000 VMs on 2,000 fleet LNMs, 50 idle clients (opt-in;
# writes bench/results-large.json). The default profile is unchanged.
SCALE ?= full
bench: setup
	$(PY) -m bench.run --scale $(SCALE)

# Starts of 1,000 VMs with the SQL plugin on PostgreSQL vs without it.
bench-sql: setup
	$(PY) -m bench.sql

# usherweb with 10,000 VMs: GET /vms, the stream's snapshot, change latency,
# CPU with 20 open streaming sessions.
bench-web: setup
	$(PY) -m bench.web

# The browser interface in headless Chromium: time to show the 10,000-VM
# table and to reflect one change (the real system, then the browser alone).
bench-web-browser: setup
	$(PY) -m bench.web_browser

# usherbatchd (the RRC-KI batch policy daemon) on a synthetic trace of 200
# jobs on 10 LNMs: utilisation and hosts in use against one job per host.
bench-batch: setup
	$(PY) -m bench.batch

# A standby pair on a private PostgreSQL, 100 fleet LNMs and 10,000 VMs: from
# kill -9 of the active controller until a client lists every VM running on
# the new active one (median of 3 kills, alternating).
bench-failover: setup
	$(PY) -m bench.failover

clean:
	rm -rf $(VENV) $(SANDBOX_DIR) build *.egg-info $(VENDOR) $(WEB)/node_modules
