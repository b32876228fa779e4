"""The run inspector over HTTP (Starlette's test client) and its command: safe by default.

A bind other machines could reach is refused without a token; with a token every request must
carry it; there is no route that writes; every response carries a strict CSP; pages never show
the database URL; the command without the ``ui`` extra says how to install it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from agentkit_common import close_engines as close_engines
from starlette.testclient import TestClient
from typer.testing import CliRunner
from ui_support import PAYLOAD, free_port
from wk_support import CLI, child_env

from tidebase_agents import Run, Tidebase
from tidebase_agents._cli import app as cli_app
from tidebase_agents._ui.app import CSP, create_app
from tidebase_agents._ui.server import BindRefused, check_bind

TOKEN = "s3cret-inspector-token"
LOCAL = "http://127.0.0.1"
PAGES = ("/", "/runs", "/run?id=r-1", "/usage", "/static/inspector.css", "/no-such-page")


async def _body(run: Run, value: Any) -> Any:
    await run.step("echo <b>step</b>", lambda: value)
    await run.state_set({"seen": value})
    return value


@pytest.fixture
async def seeded(db_url: str) -> str:
    tide = Tidebase(db_url)
    await tide.run("plain", _body, run_id="r-1", input=PAYLOAD)
    await tide.close()
    return db_url


@pytest.fixture
def client(seeded: str) -> Iterator[TestClient]:
    with TestClient(create_app(seeded), base_url=LOCAL) as c:
        yield c


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "inspector.example"])
def test_a_bind_other_machines_reach_is_refused_at_start_without_a_token(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIDEBASE_UI_TOKEN", raising=False)
    result = CliRunner().invoke(cli_app, ["ui", "--host", host, "--port", "1"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to serve on"), lines
    assert "--token" in lines[0] and "TIDEBASE_UI_TOKEN" in lines[0]
    with pytest.raises(BindRefused):
        check_bind(host, None)
    check_bind(host, TOKEN)  # a token makes it acceptable


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]"])
def test_loopback_binds_need_no_token(host: str) -> None:
    check_bind(host, None)


def test_without_the_ui_extra_the_command_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['starlette'] = None; "  # as if Starlette were not installed
        "from tidebase_agents._cli import main; sys.argv = ['tidebase-agents', 'ui']; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc
    assert proc.stderr.strip().splitlines() == [
        "error: the inspector needs the ui extra: pip install 'tidebase-agents[ui]'"
    ]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_the_ui_command_is_listed_by_the_cli() -> None:
    proc = subprocess.run([*CLI, "ui", "--help"], env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and "--token" in proc.stdout and "8321" in proc.stdout


def test_the_command_serves_the_inspector_and_guards_it_with_the_token(seeded: str) -> None:
    port = free_port()
    env = child_env(seeded, TIDEBASE_UI_TOKEN=TOKEN)
    server = subprocess.Popen([*CLI, "ui", "--port", str(port)], env=env, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        banner = server.stdout.readline().decode()
        assert banner.strip() == f"tidebase inspector (read-only) on http://127.0.0.1:{port}/"
        assert seeded.rpartition("@")[-1] not in banner  # the database is not named
        url = f"http://127.0.0.1:{port}/runs"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
            except urllib.error.HTTPError as exc:
                assert exc.code == 401  # up, and refusing a request without the token
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "did not start"
                time.sleep(0.1)
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200 and "r-1" in response.read().decode()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_with_a_token_every_request_must_carry_it(seeded: str) -> None:
    with TestClient(create_app(seeded, token=TOKEN), base_url="http://inspector.example") as c:
        for path in PAGES:
            refused = c.get(path, follow_redirects=False)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in refused.text
            wrong = c.get(path, headers={"Authorization": "Bearer nope"}, follow_redirects=False)
            assert wrong.status_code == 401, path
            assert c.get(path + ("&" if "?" in path else "?") + "token=nope").status_code == 401
        bearer = c.get("/runs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200 and "r-1" in bearer.text

        # ?token= once: exchanged for an HttpOnly cookie, and dropped from the address.
        first = c.get(f"/run?id=r-1&token={TOKEN}", follow_redirects=False)
        assert first.status_code == 303
        assert first.headers["location"] == "/run?id=r-1"
        cookie = first.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert TOKEN not in cookie  # the cookie proves the token without being it
        page = c.get("/run?id=r-1")  # the client now sends the cookie
        assert page.status_code == 200 and "echo &lt;b&gt;step&lt;/b&gt;" in page.text
        c.cookies.clear()
        assert c.get("/run?id=r-1").status_code == 401


def test_there_is_no_route_that_writes(seeded: str) -> None:
    with TestClient(create_app(seeded, token=TOKEN), base_url=LOCAL) as c:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/", "/runs", "/run?id=r-1", "/usage"):
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                assert c.request(method, path, headers=auth).status_code == 405, (method, path)


def test_without_a_token_only_requests_to_a_loopback_name_are_served(seeded: str) -> None:
    with TestClient(create_app(seeded), base_url="http://attacker.example") as c:
        # A page on another site whose name was rebound to 127.0.0.1 reads nothing.
        assert c.get("/runs").status_code == 400
    for base in ("http://localhost:8321", "http://127.0.0.1:8321", "http://[::1]:8321"):
        with TestClient(create_app(seeded), base_url=base) as c:
            assert c.get("/runs").status_code == 200, base


def test_every_response_carries_a_strict_content_security_policy(client: TestClient) -> None:
    for path in PAGES:
        response = client.get(path, follow_redirects=False)
        assert response.headers["content-security-policy"] == CSP, path
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
    assert "default-src 'none'" in CSP


def test_stored_markup_is_escaped_everywhere_it_is_shown(client: TestClient) -> None:
    html = client.get("/run?id=r-1").text
    assert "<script>window.__pwned" not in html and "<img src=x" not in html
    assert "&lt;script&gt;window.__pwned = 1" in html
    # The step name inside the SVG timeline is escaped too.
    assert re.search(r'<text class="step-label"[^>]*>echo &lt;b&gt;step&lt;/b&gt;', html)
    # Our own script tag is the only one, and it is not inline.
    assert re.findall(r"<script[^>]*>", html) == [
        '<script src="http://127.0.0.1/static/inspector.js" defer>'
    ]
    runs = client.get("/runs").text
    assert "<script>window" not in runs


def test_pages_never_show_the_database_url(client: TestClient, seeded: str) -> None:
    where = seeded.split("///")[-1] if seeded.startswith("sqlite") else seeded.split("@")[-1]
    for path in ("/runs", "/run?id=r-1", "/usage", "/run?id=missing", "/runs?since=nonsense"):
        assert where not in client.get(path).text, path


def test_an_unreachable_database_is_reported_without_its_url_or_password() -> None:
    url = "postgresql://inspector:hunter2@127.0.0.1:1/secretdb"
    with TestClient(create_app(url), base_url=LOCAL) as c:
        page = c.get("/runs")
    assert page.status_code == 503
    assert "The database is unreachable." in page.text
    for secret in ("hunter2", "secretdb", "inspector:", "127.0.0.1:1"):
        assert secret not in page.text


def test_bad_filters_and_unknown_runs_are_clear_errors(client: TestClient) -> None:
    assert client.get("/run?id=nope").status_code == 404
    assert client.get("/run?id=").status_code == 400
    assert client.get("/runs?status=sleeping").status_code == 400
    assert client.get("/runs?before=garbage").status_code == 400
    assert client.get("/usage?bucket=minute").status_code == 400
    page = client.get("/runs?since=yesterday")
    assert page.status_code == 400 and "neither a duration" in page.text
