"""The sandbox starts usherweb too (HTTPS with a certificate of its own CA)
and says where: the user it prints logs in there."""

import pytest
import pytest_twisted

from tests.e2e import RunningSandbox
from tests.webclient import WebClient

pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")


@pytest_twisted.ensureDeferred
async def test_sandbox_serves_the_web_interface(tmp_path):
    box = RunningSandbox(tmp_path / "box", lnms=1, web=True)
    await box.start()
    try:
        d = box.description
        assert d["web_url"].startswith("https://localhost:")
        client = WebClient(d["web_url"], d["ca_file"])
        response = await client.login(d["user"], d["password"])
        assert response.code == 200 and response.json["admin"] is True
        started = await client.post("/api/v1/vms/start", {"cluster": "demo", "count": 2})
        assert started.code == 200 and len(started.json["started"]) == 2
        listing = await client.get("/api/v1/vms?cluster=demo")
        assert listing.json["total"] == 2
    finally:
        await box.stop()
