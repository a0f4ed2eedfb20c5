"""Fixtures shared by the tests (pytest finds them here; no import needed):

- ``pool``: a started thread pool for blocking work (libvirt, bcrypt, PAM);
- ``pki_dir``: a CA and the controller's certificate (one per module);
- ``client_grids``: in-process grids behind the real client port
  (``tests.clientgrid.ClientGrid``), stopped after the test;
- ``system``: a sandbox of real processes (``tests.e2e.RunningSandbox``, one
  per module); a module sets ``SANDBOX_LNMS`` for other than three LNMs.

Every test runs without $COLUMNS (ush fits its tables to it): a test that
wants a width sets it.
"""

import os

import pytest
import pytest_twisted
from twisted.python.threadpool import ThreadPool


@pytest.fixture(autouse=True)
def _no_terminal_width(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    # GNU readline, once imported (pdb imports it), writes COLUMNS and LINES
    # into the C environment behind os.environ's back; child processes
    # started without env= would inherit them.
    os.unsetenv("COLUMNS")
    os.unsetenv("LINES")


@pytest.fixture
def pool(request):
    threads = ThreadPool(minthreads=1, maxthreads=4, name=f"test-{request.node.name}"[:60])
    threads.start()
    yield threads
    threads.stop()


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    from tests.clientgrid import make_pki
    directory, _ca = make_pki(tmp_path_factory.mktemp("pki"))
    return directory


@pytest_twisted.async_yield_fixture
async def client_grids(tmp_path, pki_dir):
    """-> async make(**ClientGrid options): started ClientGrids, stopped after the test."""
    from twisted.internet import reactor

    from tests.clientgrid import ClientGrid
    made = []

    async def make(**kwargs):
        grid = ClientGrid(reactor, tmp_path / f"grid{len(made)}", pki_dir, **kwargs)
        made.append(grid)
        await grid.start()
        return grid
    yield make
    for grid in made:
        await grid.stop()


@pytest_twisted.async_yield_fixture(scope="module")
async def system(request, tmp_path_factory):
    """A sandbox with ``SANDBOX_LNMS`` LNMs (3 unless the module says) and
    the user bob besides the sandbox's own."""
    from tests.e2e import RunningSandbox
    label = request.module.__name__.rsplit(".", 1)[-1]
    box = RunningSandbox(tmp_path_factory.mktemp(f"{label}-sandbox"),
                         lnms=getattr(request.module, "SANDBOX_LNMS", 3))
    await box.start()
    box.add_user("bob", "bob-secret")
    yield box
    await box.stop()


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server (``tests.pgserver.PostgresServer``) for the
    session, started on first use; ``create_database(name)`` -> URL. A test
    that stops it (``stop()``) starts it again (``start()``) before it ends.
    Never skipped: a server that cannot start fails the test, saying why."""
    from tests.pgserver import PostgresServer, PostgresUnavailable
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as e:
        pytest.fail(f"the test PostgreSQL server did not start: {e}", pytrace=False)
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def slapd():
    """A private OpenLDAP slapd (``tests.slapd.SlapdServer``) for the session,
    with the shipped access rules and the base entries of an Usher directory
    (``dc=usher,dc=local``). A test that stops it (``stop()``) starts it again
    (``start()``) before it ends; tests use user names of their own. Never
    skipped: a server that cannot start fails the test, saying why."""
    from tests.slapd import SlapdServer, SlapdUnavailable
    try:
        server = SlapdServer().start()
    except SlapdUnavailable as e:
        pytest.fail(f"the test slapd did not start: {e}", pytrace=False)
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def bind():
    """A private BIND ``named`` (``tests.bindserver.BindServer``) for the
    session, serving ``usher.test`` and the reverse zones 0.9.10.in-addr.arpa
    and 1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa on a free loopback port. A test that
    stops it (``stop()``) starts it again (``start()``) before it ends. Never
    skipped: a missing named fails the test, naming the Debian package."""
    from tests.bindserver import BindServer, BindUnavailable
    try:
        server = BindServer(zone="usher.test", reverse_zones=[
            "0.9.10.in-addr.arpa", "1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"]).start()
    except BindUnavailable as e:
        pytest.fail(f"the test BIND server did not start: {e}", pytrace=False)
    yield server
    server.destroy()


@pytest.fixture(autouse=True)
def _sigint_as_it_was(request):
    """A test that changed this process's SIGINT disposition (a daemon's main
    run in-process ignores it, say) gives it back: children inherit an ignored
    SIGINT, and a ush started later would not hear Ctrl-C (seen in the full
    suite: SIGINT ignored by the time the ush terminal tests ran)."""
    import signal
    before = signal.getsignal(signal.SIGINT)
    yield
    now = signal.getsignal(signal.SIGINT)
    if before is not None and now != before:
        import warnings
        warnings.warn(f"{request.node.nodeid} left SIGINT at {now!r}; restored")
        signal.signal(signal.SIGINT, before)
