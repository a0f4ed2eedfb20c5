"""The browser interface end to end, in a real headless Chromium (Debian's
chromium through Playwright, tests/browser.py): a sandbox (controller and
LNMs as processes over real TLS), the real usherweb over HTTPS in the test
reactor, and the pages as a user sees them. Every wait is Playwright's own
wait on the DOM (``expect(...)``), never a sleep; a change made elsewhere
(the client library, ush) must show within a second of being done. The
10,000-VM table runs against tests/webfake.py (the same static files and
headers, a fake API). Screenshots of each page go to the test's directory
(and to $USHER_SCREENSHOTS when set)."""

import os
import re

import pytest
import pytest_twisted

from tests.browser import BrowserThread
from tests.webclient import ServedWeb
from tests.webfake import PASSWORD, FakeWeb, fleet

DOMAIN = "usher.test"
SANDBOX_LNMS = 2
STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "clients", "web", "static")
LIVE = 1000   # ms: a change made elsewhere shows within a second
RUN = 60000   # ms: VMs starting on the libvirt test driver
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def expect(*args):
    from playwright.sync_api import expect as playwright_expect
    return playwright_expect(*args)


def row(page, name):
    return page.locator(f'.vt-body .vt-row[data-name="{name}"]')


# --- Fixtures ----------------------------------------------------------------------------

@pytest_twisted.async_yield_fixture(scope="module")
async def chromium(tmp_path_factory):
    if not os.path.exists(os.path.join(STATIC, "vendor", "uPlot.esm.js")):
        pytest.fail("clients/web/static/vendor/ is empty: run make setup (npm ci, uPlot)",
                    pytrace=False)
    browser = BrowserThread(tmp_path_factory.mktemp("screenshots"))
    await browser.start()
    yield browser
    browser.stop()


@pytest_twisted.async_yield_fixture(scope="module")
async def web(system):
    served = ServedWeb(system, STATIC)
    yield served
    await served.stop()


def logged_in(b, browser, url, user, password):
    page = b.new_page(browser, url)
    page.goto("/")
    page.fill("#login-user", user)
    page.fill("#login-password", password)
    page.click("form button[type=submit]")
    expect(page.locator("h1")).to_have_text("Your VMs")
    expect(page.locator("#vm-summary")).to_have_text(re.compile(r"^\d+ VMs?"))
    return page


@pytest_twisted.async_yield_fixture(scope="module")
async def alice(chromium, web, system):
    page = await chromium.run(lambda browser: logged_in(chromium, browser, web.url, "alice",
                                                        system.description["password"]))
    yield page
    await chromium.run(lambda browser: page.context.close())


async def started(client, **kwargs):
    result = await client.start(**kwargs)
    assert result["started"] and not result["failed"], result
    return result


# --- Logging in --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_login_refuses_a_wrong_password_then_logs_in(chromium, web, system):
    b = chromium

    def steps(browser):
        page = b.new_page(browser, web.url)
        page.goto("/")
        expect(page).to_have_url(re.compile("#/login$"))
        expect(page.get_by_role("navigation")).to_be_hidden()
        b.screenshot(page, "login")
        page.get_by_label("User name").fill("alice")
        page.get_by_label("Password").fill("not-her-password")
        page.get_by_role("button", name="Log in").click()
        error = page.locator("#login-error")
        expect(error).to_be_visible()
        expect(error).to_contain_text(re.compile("authentication|password|refused", re.I))
        expect(page).to_have_url(re.compile("#/login$"))
        b.screenshot(page, "login-refused")
        page.get_by_label("Password").fill(system.description["password"])
        page.get_by_role("button", name="Log in").click()
        expect(page.locator("h1")).to_have_text("Your VMs")
        expect(page.locator("#user-name")).to_have_text("alice (administrator)")
        # The session cookie is HttpOnly: no script can read it.
        assert "usher_session" not in page.evaluate("document.cookie")
        cookie = [c for c in page.context.cookies() if c["name"] == "usher_session"][0]
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
        # Logging out ends the session on the server too.
        page.get_by_role("button", name="Log out").click()
        expect(page).to_have_url(re.compile("#/login$"))
        status = page.evaluate("fetch('/api/v1/session').then(r => r.status)")
        assert status == 401
        assert page.errors == []
        page.context.close()
    await b.run(steps)


# --- The VM table, live ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_start_three_from_the_dialog_they_reach_run_without_reloading(chromium, alice):
    b, page = chromium, alice

    def steps(browser):
        page.evaluate("window.notReloaded = true")
        page.get_by_role("button", name="Start VMs…").click()
        dialog = page.get_by_role("dialog", name="Start VMs")
        expect(dialog).to_be_visible()
        dialog.get_by_label("Cluster").fill("dlg")
        dialog.get_by_label("Number of VMs").fill("3")
        dialog.get_by_label("Memory (MiB)").fill("256")
        b.screenshot(page, "start-dialog")
        dialog.get_by_role("button", name="Start").click()
        for i in (1, 2, 3):
            expect(row(page, full(f"{i}.dlg")).locator(".c-state")).to_have_text("run", timeout=RUN)
        expect(dialog).to_be_hidden()
        expect(page.locator("#status")).to_contain_text("started 3 VMs")
        assert page.evaluate("window.notReloaded") is True
        expect(row(page, full("1.dlg")).locator(".c-mem")).to_have_text("256 MiB")
        b.screenshot(page, "vms")
    await b.run(steps)


@pytest_twisted.ensureDeferred
async def test_pause_from_the_table_then_destroy_asks_first(chromium, alice, system):
    b, page = chromium, alice
    client = await system.connected_client()
    await started(client, cluster="tbl", count=2)

    def steps(browser):
        page.goto("#/vms")
        one, two = row(page, full("1.tbl")), row(page, full("2.tbl"))
        expect(one.locator(".c-state")).to_have_text("run", timeout=RUN)
        one.get_by_role("checkbox").check()
        expect(page.locator("#selection-count")).to_have_text("1 selected")
        page.locator("button.op[data-op=pause]").click()
        expect(one.locator(".c-state")).to_have_text("paused", timeout=RUN)
        expect(one).to_have_attribute("aria-selected", "true")
        expect(page.locator("#status")).to_contain_text("paused 1 VM")
        # A destructive operation asks first; "Cancel" changes nothing.
        two.get_by_role("checkbox").check()
        page.locator("button.op[data-op=destroy]").click()
        confirm = page.get_by_role("dialog", name="Please confirm")
        expect(confirm).to_contain_text("destroy 2 VMs?")
        b.screenshot(page, "vms-confirm-destroy")
        confirm.get_by_role("button", name="Cancel").click()
        expect(confirm).to_be_hidden()
        expect(two.locator(".c-state")).to_have_text("run")
        page.locator("button.op[data-op=destroy]").click()
        page.get_by_role("button", name="destroy 2 VMs").click()
        # Kept, shut off (issue 17); delete removes them, asking first too.
        expect(one.locator(".c-state")).to_have_text("shutoff", timeout=RUN)
        expect(two.locator(".c-state")).to_have_text("shutoff", timeout=RUN)
        page.locator("button.op[data-op=delete]").click()
        expect(confirm).to_contain_text("removed for good")
        page.get_by_role("button", name="delete 2 VMs").click()
        expect(one).to_have_count(0, timeout=RUN)
        expect(two).to_have_count(0, timeout=RUN)
    await b.run(steps)


@pytest_twisted.ensureDeferred
async def test_changes_made_elsewhere_show_within_a_second(chromium, alice, system):
    b, page = chromium, alice
    client = await system.connected_client()
    await started(client, cluster="far", count=2)
    name1, name2 = full("1.far"), full("2.far")
    await b.run(lambda browser: expect(row(page, name2).locator(".c-state")).to_have_text(
        "run", timeout=RUN))
    # From the client library (another controller session of alice's) ...
    done = await client.op_on("pause", [name1])
    assert done["done"], done
    await b.run(lambda browser: expect(row(page, name1).locator(".c-state")).to_have_text(
        "paused", timeout=LIVE))
    # ... and from ush, another process, at the same time as the page shows it.
    completed = await system.ush("pause", "2.far")
    assert completed.returncode == 0, completed.stderr
    await b.run(lambda browser: expect(row(page, name2).locator(".c-state")).to_have_text(
        "paused", timeout=LIVE))
    completed = await system.ush("delete", "--force", "-n", "far")
    assert completed.returncode == 0, completed.stderr
    await b.run(lambda browser: expect(page.locator(".vt-body .vt-row[data-name$='.far.alice."
                                                    "usher.test']")).to_have_count(0, timeout=LIVE))


@pytest_twisted.ensureDeferred
async def test_another_users_vms_never_appear(chromium, web, alice, system):
    b = chromium
    bobs = await system.connected_client("bob", "bob-secret")
    await started(bobs, names=["secret"])
    # A change of alice's made after bob's start: once the page shows it, the
    # stream has delivered everything before it (it is ordered).
    client = await system.connected_client()
    await started(client, names=["after"])

    def alices_view(browser):
        expect(row(alice, full("after")).locator(".c-state")).to_have_text("run", timeout=RUN)
        # alice is an administrator: the API lets her name bob's VMs, but her
        # table holds her own (her controller session's), as ush list does.
        expect(alice.locator(".vt-body .vt-row[data-name*='.bob.']")).to_have_count(0)

    def bobs_view(browser):
        page = logged_in(b, browser, web.url, "bob", "bob-secret")
        expect(row(page, full("secret", "bob")).locator(".c-state")).to_have_text("run",
                                                                                  timeout=RUN)
        expect(page.locator(".vt-body .vt-row[data-name*='.alice.']")).to_have_count(0)
        page.goto(f"#/vm/{full('after')}")
        expect(page.locator(".error")).to_contain_text(re.compile("no such VM", re.I))
        page.context.close()
    await b.run(alices_view)
    await b.run(bobs_view)
    await bobs.op_on("delete", [full("secret", "bob")], {"force": True})
    await client.op_on("delete", [full("after")], {"force": True})


@pytest_twisted.ensureDeferred
async def test_an_ordinary_user_sees_no_admin_pages_and_the_api_refuses_them(chromium, web,
                                                                              alice):
    b = chromium

    def steps(browser):
        page = logged_in(b, browser, web.url, "bob", "bob-secret")
        nav = page.get_by_role("navigation", name="Main")
        expect(nav.get_by_role("link", name="VMs", exact=True)).to_be_visible()
        expect(nav.get_by_role("link", name="Plugins")).to_be_hidden()
        expect(nav.get_by_role("link", name="Problems")).to_be_hidden()
        for route in ("plugins", "problems"):
            page.goto(f"#/admin/{route}")
            expect(page.locator("h1")).to_have_text("Administrators only")
            csrf = page.evaluate("window.usher.session.csrf")
            status = page.evaluate(
                """([route, csrf]) => fetch('/api/v1/' + (route === 'plugins' ? 'plugins'
                      : 'plugins/unregister'), route === 'plugins' ? {} : {method: 'POST',
                      headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf},
                      body: JSON.stringify({name: 'quota'})}).then(r => r.status)""",
                [route, csrf])
            assert status == 403
        b.screenshot(page, "admin-refused")
        page.context.close()
        # An administrator has both pages.
        alice.goto("#/admin/plugins")
        expect(alice.locator("h1")).to_have_text("Plugins")
        expect(alice.locator("#plugins-available li").first).to_be_visible()
        b.screenshot(alice, "admin-plugins")
        alice.goto("#/admin/problems")
        expect(alice.locator("h1")).to_have_text("Problems")
        expect(alice.locator("#problems-lost")).to_contain_text(re.compile(r"Lost \(\d+\)"))
        b.screenshot(alice, "admin-problems")
        alice.goto("#/vms")
    await b.run(steps)


@pytest_twisted.ensureDeferred
async def test_plugin_register_order_and_unregister_from_the_admin_page(chromium, alice):
    b, page = chromium, alice

    def steps(browser):
        page.goto("#/admin/plugins")
        expect(page.locator("#plugins-available li").first).to_be_visible()
        available = page.locator("#plugins-available li strong").all_text_contents()
        taken = page.locator("#plugin-chains tr[data-event='start_request']").evaluate_all(
            "rows => rows.map(r => r.dataset.plugin)")
        free = [p for p in available if p not in taken]
        assert free, (available, taken)
        # One that needs no configuration file (filesystem, dns, ldap, sql do).
        plugin = next(p for p in ("roundrobin", "leastloaded", "spread", "pack") if p in free)
        page.get_by_label("Plugin", exact=True).select_option(plugin)
        page.get_by_label("Event").fill("start_request")
        page.get_by_label("Order (optional)").fill("7")
        page.get_by_role("button", name="Register", exact=True).click()
        expect(page.locator("#status")).to_contain_text("done")
        expect(page.locator("#plugins-error")).to_be_hidden()
        registration = page.locator(
            f"#plugin-chains tr[data-plugin='{plugin}'][data-event='start_request']")
        expect(registration).to_have_count(1)
        expect(registration.locator(".order-input")).to_have_value("7")
        registration.locator(".order-input").fill("9")
        registration.get_by_role("button", name=f"set the order of {plugin} on start_request").click()
        expect(registration.locator(".order-input")).to_have_value("9")
        registration.get_by_role("button", name=f"unregister {plugin} from start_request").click()
        page.get_by_role("dialog", name="Please confirm").get_by_role(
            "button", name="Unregister").click()
        expect(registration).to_have_count(0)
        expect(page.locator("#plugins-error")).to_be_hidden()
        page.goto("#/vms")
    await b.run(steps)


# --- Figures -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_vm_and_hosts_pages_plot_the_simulated_load(chromium, alice, system):
    b, page = chromium, alice
    client = await system.connected_client()
    await started(client, names=["plotted"])
    name = full("plotted")

    def steps(browser):
        page.goto("#/vms")
        expect(row(page, name).locator(".c-state")).to_have_text("run", timeout=RUN)
        row(page, name).get_by_role("link").click()
        expect(page).to_have_url(re.compile(f"#/vm/{re.escape(name)}$"))
        expect(page.locator("h1")).to_have_text(name)
        # The monitoring's figures (the sandbox LNMs' simulated load, sampled
        # every 2 s, reported every 5 s), as text and as a uPlot plot.
        figures = page.locator("#vm-figures [data-figure=cpu]")
        expect(figures).to_have_text(re.compile(r"^\d+\.\d / \d+\.\d / \d+\.\d$"), timeout=RUN)
        expect(page.locator("#vm-figures")).to_contain_text("simulated:wave")
        plot = page.locator("#vm-cpu-plot")
        expect(plot).to_have_attribute("data-points", re.compile(r"^[1-9]\d*$"))
        expect(plot.locator("canvas")).to_have_count(1)
        # The plot's latest point is the figure shown (read at one moment).
        text, latest = page.evaluate("""() => [
            document.querySelector('#vm-figures [data-figure=cpu]').textContent,
            document.querySelector('#vm-cpu-plot .plot-latest').textContent]""")
        shown = [float(x) for x in text.split(" / ")]
        assert any(x > 0 for x in shown), shown
        assert latest == ", ".join(f"{w}: {v:.1f}%" for w, v in
                                   zip(("1 min", "5 min", "15 min"), shown)), (text, latest)
        b.screenshot(page, "vm")
        # Over time: a later sample adds a point (the page re-reads every 5 s).
        expect(plot).to_have_attribute("data-points", re.compile(r"^([2-9]|\d\d+)$"), timeout=20000)
        page.goto("#/lnms")
        cards = page.locator(".host-card")
        expect(cards).to_have_count(SANDBOX_LNMS)
        for i in range(SANDBOX_LNMS):
            expect(cards.nth(i).locator("figure.plot")).to_have_attribute(
                "data-points", re.compile(r"^[1-9]\d*$"), timeout=RUN)
        b.screenshot(page, "hosts")
        host = page.evaluate(f"window.usher.stream.vms.get({name!r}).lnm")
        page.get_by_role("link", name=host, exact=True).click()
        expect(page.locator("h1")).to_have_text(host)
        expect(row(page, name)).to_have_count(1)
        expect(page.locator("#lnm-cpu-plot")).to_have_attribute("data-points",
                                                                re.compile(r"^[1-9]\d*$"))
        expect(page.locator("#lnm-record")).to_contain_text("simulated")
        b.screenshot(page, "host")
        page.goto("#/vms")
    await b.run(steps)
    await client.op_on("delete", [name], {"force": True})


# --- Hostile data, narrow screens, keyboard, 10,000 VMs ----------------------------------

@pytest_twisted.ensureDeferred
async def test_a_script_in_a_vm_arg_shows_as_text_and_never_runs(chromium, alice, system):
    b, page = chromium, alice
    hostile = "<script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">"
    client = await system.connected_client()
    await started(client, names=["xss"], args={"note": hostile})
    name = full("xss")

    def steps(browser):
        page.goto("#/vms")
        expect(row(page, name).locator(".c-args")).to_have_text(f"note={hostile}", timeout=RUN)
        page.goto(f"#/vm/{name}")
        expect(page.locator("#vm-record [data-field=args]")).to_have_text(f"note={hostile}")
        assert page.evaluate("window.pwned") is None
        assert page.locator("img[src=x]").count() == 0
        assert page.errors == []
        page.goto("#/vms")
    await b.run(steps)
    await client.op_on("delete", [name], {"force": True})


@pytest_twisted.ensureDeferred
async def test_keyboard_use_and_a_phone_width_screen(chromium, web, system):
    b = chromium
    client = await system.connected_client()
    await started(client, cluster="kbd", count=3)

    def steps(browser):
        page = logged_in(b, browser, web.url, "alice", system.description["password"])
        page.set_viewport_size({"width": 375, "height": 740})
        page.get_by_label("Name (regular expression)").fill(r"\.kbd\.")
        expect(page.locator(".vt-body .vt-row")).to_have_count(3, timeout=RUN)
        # An invalid regex is said so, and keeps the last good filter.
        page.get_by_label("Name (regular expression)").fill("(")
        expect(page.locator("#regex-error")).to_contain_text("not a valid regular expression")
        page.get_by_label("Name (regular expression)").fill(r"\.kbd\.")
        grid = page.get_by_role("grid", name="Your VMs")
        grid.focus()
        page.keyboard.press("Home")
        page.keyboard.press("ArrowDown")
        page.keyboard.press("Space")
        expect(row(page, full("2.kbd"))).to_have_attribute("aria-selected", "true")
        page.keyboard.press("Shift+ArrowDown")
        expect(row(page, full("3.kbd"))).to_have_attribute("aria-selected", "true")
        expect(page.locator("#selection-count")).to_have_text("2 selected")
        # Nothing wider than the screen; the name and state columns shown.
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        expect(row(page, full("1.kbd")).locator(".c-state")).to_be_visible()
        expect(row(page, full("1.kbd")).locator(".c-cluster")).to_be_hidden()
        b.screenshot(page, "vms-375px")
        page.keyboard.press("Enter")
        expect(page.locator("h1")).to_have_text(full("3.kbd"))
        b.screenshot(page, "vm-375px")
        page.context.close()
    await b.run(steps)
    await client.op_on("delete", [full(f"{i}.kbd") for i in (1, 2, 3)], {"force": True})


@pytest.fixture(scope="module")
def fake():
    return FakeWeb(fleet(10000))


@pytest_twisted.ensureDeferred
async def test_ten_thousand_vms_scroll_with_a_bounded_dom(chromium, fake):
    b = chromium

    def open_table(browser):
        page = logged_in(b, browser, fake.url, "carol", PASSWORD)
        expect(page.locator("#vm-summary")).to_have_text("10000 VMs")
        grid = page.get_by_role("grid", name="Your VMs")
        expect(grid).to_have_attribute("aria-rowcount", "10001")
        counts = [page.locator(".vt-body .vt-row").count()]
        viewport = page.locator(".vt-viewport")
        for _ in range(20):
            viewport.hover()
            page.mouse.wheel(0, 4000)
            counts.append(page.locator(".vt-body .vt-row").count())
        grid.focus()
        page.keyboard.press("End")
        last = page.evaluate("window.usher.stream.vms.size")
        expect(page.locator(".vt-row.is-active")).to_have_attribute("aria-rowindex", str(last + 1))
        counts.append(page.locator(".vt-body .vt-row").count())
        assert max(counts) < 80, counts
        return page
    page = await b.run(open_table)
    # A change pushed by the server shows in the rows in view.
    name = await b.run(lambda browser: page.locator(".vt-row.is-active").get_attribute(
        "data-name"))
    fake.api.push(changed=[dict(fake.api.vms[name], state="paused")])
    await b.run(lambda browser: expect(row(page, name).locator(".c-state")).to_have_text(
        "paused", timeout=LIVE))

    def filters(browser):
        page.get_by_label("Cluster", exact=True).select_option("c3")
        page.get_by_label("State", exact=True).select_option("run")
        expect(page.locator("#vm-summary")).to_have_text("10000 VMs, 1000 shown")
        page.get_by_label("Host", exact=True).select_option("lnm2")
        expect(page.locator("#vm-summary")).to_have_text("10000 VMs, 250 shown")
        page.get_by_role("button", name="Select all matching").click()
        expect(page.locator("#selection-count")).to_have_text("250 selected")
        b.screenshot(page, "vms-10000")
        page.context.close()
    await b.run(filters)
    await fake.stop()
