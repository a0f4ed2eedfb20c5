"""``make bench-web-browser`` (``python -m bench.web_browser``): the browser
interface's own figures, in a real headless Chromium (tests/browser.py).

1. Against the real system of ``bench.web`` (a controller process, a fleet
   of real LNMs, ``vms`` VMs of one user running, usherweb as its own
   process over HTTPS serving clients/web/static/):
   - the time to show the 10,000-VM table: from the login click, and from a
     reload of #/vms (the session kept; median of 3), until the summary
     counts every VM and the first rows are drawn;
   - the time to reflect one change made by another client (an UsherClient
     pausing or resuming a VM in view): from the request sent to the row's
     state changing in the page (a MutationObserver stamps it; median and
     worst of ``repeats``), beside the request's own round trip.
2. Against tests/webfake.py (the same static files and headers, a fake API),
   with ``fake_vms`` VMs: the same two figures with the browser alone (the
   change pushed by the fake's stream), and the DOM rows after scrolling.

Prints the figures; ``--quick`` runs it at toy scale (the test suite does);
its numbers mean nothing. No assertion on time.
"""

import dataclasses
import os
import statistics
import sys
import time

from bench import cli as bench_cli
from bench import web as web_bench
from bench.run import full_name
from bench.system import sleep
from usher import states

STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "clients", "web", "static")
# Stamps when the row of window.benchName shows window.benchState.
WATCH = """([name, state]) => {
  window.benchChangedAt = null;
  const check = () => {
    const row = document.querySelector(`.vt-body .vt-row[data-name="${name}"]`);
    if (row && row.dataset.state === state && window.benchChangedAt === null) {
      window.benchChangedAt = performance.timeOrigin + performance.now();
      observer.disconnect();
    }
  };
  const observer = new MutationObserver(check);
  observer.observe(document.querySelector('.vt-body'), {subtree: true, attributes: true,
                                                       attributeFilter: ['data-state']});
  check();
}"""


def table_shown(page, count, timeout):
    page.wait_for_function(
        """(n) => { const s = document.querySelector('#vm-summary');
                    return s && s.textContent.startsWith(n + ' VM') &&
                           document.querySelectorAll('.vt-body .vt-row').length > 0; }""",
        arg=count, timeout=timeout * 1000, polling="raf")


def open_table(b, browser, url, user, password, count, timeout):
    """-> (page, seconds from the login click, [seconds of 3 reloads])."""
    page = b.new_page(browser, url)
    page.goto("/#/login")
    page.fill("#login-user", user)
    page.fill("#login-password", password)
    started = time.monotonic()
    page.click("form button[type=submit]")
    table_shown(page, count, timeout)
    first = time.monotonic() - started
    reloads = []
    for _ in range(3):
        started = time.monotonic()
        page.reload()
        table_shown(page, count, timeout)
        reloads.append(time.monotonic() - started)
    return page, first, reloads


def watch(page, name, state):
    page.evaluate(WATCH, [name, state])


def changed_at(page, timeout):
    page.wait_for_function("() => window.benchChangedAt !== null", timeout=timeout * 1000,
                           polling="raf")
    return page.evaluate("window.benchChangedAt") / 1000.0


def scroll_rows(page):
    counts = []
    page.locator(".vt-viewport").hover()
    for _ in range(30):
        page.mouse.wheel(0, 5000)
        counts.append(page.locator(".vt-body .vt-row").count())
    return max(counts)


class BrowserBench(web_bench.WebBench):
    """bench.web's system, measured from a browser instead of an HTTP client."""

    def __init__(self, reactor, scale, directory, progress, fake_vms):
        super().__init__(reactor, scale, directory, progress)
        self.fake_vms = fake_vms
        self.browser = None

    def _start_web(self):
        # bench.web serves an empty static directory (it measures the API);
        # the browser needs the interface: point that directory at it.
        os.symlink(STATIC, os.path.join(self.dir, "static"))
        super()._start_web()

    async def run(self):
        from tests.browser import BrowserThread
        self.browser = BrowserThread(self.dir)
        await self.browser.start()
        try:
            await super().run()
            await self._measure_fake()
        finally:
            self.browser.stop()

    async def _measure(self):
        b, scale, r = self.browser, self.scale, self.results
        r["vms"] = scale.vms
        page, first, reloads = await b.run(lambda browser: open_table(
            b, browser, self.url, web_bench.USER, self.system.password, scale.vms,
            scale.patience))
        r["table_after_login_s"], r["table_reload_s"] = first, statistics.median(reloads)
        self.progress(f"  {scale.vms:,}-VM table: {first:.3f} s after the login click, "
                      f"{r['table_reload_s']:.3f} s after a reload")
        shown, trips = [], []
        for i in range(scale.repeats):
            await sleep(self.reactor, 0.3)
            name = full_name(f"{i + 1}.web")
            operation = "pause" if self.client.vms[name]["state"] == states.RUN else "resume"
            wanted = states.PAUSED if operation == "pause" else states.RUN
            await b.run(lambda browser, n=name, w=wanted: watch(page, n, w))
            started = time.time()
            await self.client.op_on(operation, [name])
            trips.append(time.time() - started)
            shown.append(await b.run(lambda browser: changed_at(page, scale.patience)) - started)
        r["change_shown_median_s"], r["change_shown_max_s"] = statistics.median(shown), max(shown)
        r["change_request_median_s"] = statistics.median(trips)
        self.progress(f"  change by another client -> row in the page: median "
                      f"{r['change_shown_median_s']:.3f} s, worst {r['change_shown_max_s']:.3f} s "
                      f"(the request itself: {r['change_request_median_s']:.3f} s)")
        await b.run(lambda browser: page.context.close())

    async def _measure_fake(self):
        from tests.webfake import PASSWORD, FakeWeb, fleet
        b, r = self.browser, self.results
        fake = FakeWeb(fleet(self.fake_vms))
        try:
            r["fake_vms"] = self.fake_vms
            page, first, reloads = await b.run(lambda browser: open_table(
                b, browser, fake.url, "carol", PASSWORD, self.fake_vms, self.scale.patience))
            r["fake_table_after_login_s"] = first
            r["fake_table_reload_s"] = statistics.median(reloads)
            shown = []
            names = sorted(fake.api.vms)[:self.scale.repeats]
            for i, name in enumerate(names):
                await sleep(self.reactor, 0.05)
                wanted = "paused" if i % 2 == 0 else "run"
                await b.run(lambda browser, n=name, w=wanted: watch(page, n, w))
                started = time.time()
                fake.api.push(changed=[dict(fake.api.vms[name], state=wanted)])
                shown.append(await b.run(lambda browser: changed_at(page, 60)) - started)
            r["fake_change_shown_median_s"] = statistics.median(shown)
            r["fake_change_shown_max_s"] = max(shown)
            r["fake_rows_in_dom"] = await b.run(lambda browser: scroll_rows(page))
            self.progress(f"  browser alone ({self.fake_vms:,} VMs, fake API): table "
                          f"{first:.3f} s after login, {r['fake_table_reload_s']:.3f} s after a "
                          f"reload; a pushed change shown in median "
                          f"{r['fake_change_shown_median_s'] * 1000:.0f} ms; at most "
                          f"{r['fake_rows_in_dom']} rows in the DOM while scrolling")
            await b.run(lambda browser: page.context.close())
        finally:
            await fake.stop()

    def summary(self):
        r = self.results
        if "fake_rows_in_dom" not in r:
            return f"not measured: {self.errors}"
        return (f"The browser interface (headless Chromium):\n"
                f"  {r['vms']:,}-VM table shown: {r['table_after_login_s']:.3f} s after the "
                f"login click, {r['table_reload_s']:.3f} s after a reload (median of 3)\n"
                f"  change by another client -> row in the page: median "
                f"{r['change_shown_median_s']:.3f} s, worst {r['change_shown_max_s']:.3f} s "
                f"(the request's round trip {r['change_request_median_s']:.3f} s)\n"
                f"  browser alone, {r['fake_vms']:,} VMs (fake API): table "
                f"{r['fake_table_after_login_s']:.3f} s after login, "
                f"{r['fake_table_reload_s']:.3f} s after a reload; pushed change -> row "
                f"median {r['fake_change_shown_median_s'] * 1000:.0f} ms, worst "
                f"{r['fake_change_shown_max_s'] * 1000:.0f} ms; "
                f"{r['fake_rows_in_dom']} rows in the DOM at most while scrolling")


def main(argv=None):
    options = bench_cli.parser("python -m bench.web_browser", __doc__, "VMs of the real system (default 10000)").parse_args(argv)
    scale = web_bench.QUICK if options.quick else web_bench.FULL
    if options.vms:
        scale = dataclasses.replace(scale, vms=options.vms)
    fake_vms = 1000 if options.quick else 10000
    return bench_cli.run(options, lambda reactor, directory, progress: BrowserBench(reactor, scale, directory, progress, fake_vms), "usher-bench-web-browser-")

if __name__ == "__main__":
    sys.exit(main())
