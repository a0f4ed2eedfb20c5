"""A real headless Chromium (Debian's ``chromium``) driven through
Playwright's sync API in a thread of its own, so that the test reactor
keeps serving the controller, the LNMs' links and usherweb meanwhile.

``BrowserThread.run(fn, *args)`` -> Deferred firing with ``fn(browser,
*args)`` run in the browser's thread (Playwright objects stay there:
pages are handed back to the reactor only as opaque handles). Waits are
Playwright's own (``expect(...)``), which fire on the DOM changing."""

import os
import queue
import shutil
import threading

from twisted.internet import defer, reactor
from twisted.python.failure import Failure

CHROMIUM = "/usr/bin/chromium"


class BrowserUnavailable(RuntimeError):
    pass


class BrowserThread:
    def __init__(self, screenshot_dir):
        self.jobs = queue.Queue()
        self.screenshot_dir = str(screenshot_dir)
        self.thread = None
        self.browser = None

    def start(self):
        if not os.path.exists(CHROMIUM):
            raise BrowserUnavailable(f"{CHROMIUM} is missing: install the Debian package chromium "
                                     "(make setup does)")
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError as e:
            raise BrowserUnavailable(f"Playwright for Python is missing ({e}): pip install "
                                     "playwright (setup.py's test extras)") from e
        ready = defer.Deferred()
        self.thread = threading.Thread(target=self._main, args=(ready,), name="chromium",
                                       daemon=True)
        self.thread.start()
        return ready

    def _main(self, ready):
        from playwright.sync_api import sync_playwright
        try:
            with sync_playwright() as p:
                self.browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                reactor.callFromThread(ready.callback, self)
                while True:
                    job = self.jobs.get()
                    if job is None:
                        break
                    fn, args, d = job
                    try:
                        result = fn(self.browser, *args)
                    except BaseException:
                        failure = Failure()
                        reactor.callFromThread(d.errback, failure)
                    else:
                        reactor.callFromThread(d.callback, result)
                self.browser.close()
        except BaseException:
            failure = Failure()
            if not ready.called:
                reactor.callFromThread(ready.errback, failure)
            else:
                raise

    def run(self, fn, *args):
        d = defer.Deferred()
        self.jobs.put((fn, args, d))
        return d

    def stop(self):
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join(30)
            self.thread = None

    # --- helpers run in the browser's thread ------------------------------------

    def new_page(self, browser, base_url, width=1280, height=860):
        context = browser.new_context(base_url=base_url, ignore_https_errors=True,
                                      viewport={"width": width, "height": height})
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        # A script error, or anything the page's CSP refused, fails the tests
        # that check page.errors (the boot's 401 for GET /session is expected).
        page.on("console", lambda message: page.errors.append(message.text)
                if message.type == "error" and "Content Security Policy" in message.text
                else None)
        return page

    def screenshot(self, page, name):
        """Save the page under the test's directory, and USHER_SCREENSHOTS if set."""
        path = os.path.join(self.screenshot_dir, f"{name}.png")
        page.screenshot(path=path, full_page=True)
        extra = os.environ.get("USHER_SCREENSHOTS")
        if extra:
            os.makedirs(extra, exist_ok=True)
            shutil.copy(path, os.path.join(extra, f"{name}.png"))
        return path
