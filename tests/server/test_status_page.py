"""The server's status: `GET /v1/status` (JSON for scripts) and the status page (`GET /status`),
the latter in a real headless Chromium against a real `interlace serve` with a real model.

The truth is what each test did itself: the jobs it submitted and held (a `Gate`, or a local
block nobody has run yet), the keys it made, the limits it configured; never the status code.
The browser test saves screenshots under the directory it prints (and copies them to
`$INTERLACE_ARTIFACTS` when that is set).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import interlace
from interlace._version import PROTOCOL_VERSION, __version__
from interlace.contract.http import KEY_HEADER
from interlace.contract.policy import Policy
from interlace.testing import Gate, ServerProcess, ThreadedServer, fake_payload

PROMPT = "The Eiffel Tower is in the city of"
WAIT_S = 90  # bound of every wait for a state (a loaded CI machine); the states decide, not time


def _headers(key: str) -> dict[str, str]:
    return {KEY_HEADER: key, "X-Interlace-Version": __version__}


def _wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- GET /v1/status: the JSON ------------------------------------------------------------------


@pytest.fixture
def fake_server(tmp_path: Path):
    policy = Policy(max_queued_per_key=7, requests_per_minute=4321, timeout_seconds=55.0)
    with ThreadedServer(tmp_path / "data", models=["fake", "other"], policy=policy, result_ttl=3600) as server:
        yield server


def test_status_needs_a_key(fake_server):
    with httpx.Client(base_url=fake_server.url, timeout=30) as http:
        missing = http.get("/v1/status")
        unknown = http.get("/v1/status", headers=_headers("il_0000_not-a-key"))
        page = http.get("/status")
        root = http.get("/")
    assert missing.status_code == 401 and KEY_HEADER in missing.json()["detail"]
    assert unknown.status_code == 401 and "unknown or revoked" in unknown.json()["detail"]
    # The page needs no key and holds no data: it asks for the key, then reads /v1/status.
    for answer in (page, root):
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in answer.headers["content-security-policy"]
        assert 'id="signin-form"' in answer.text


def test_status_shows_models_queues_and_only_the_keys_own_jobs(fake_server, tmp_path):
    alice, bob = fake_server.create_key("alice"), fake_server.create_key("bob")
    gate = Gate(tmp_path)
    with httpx.Client(base_url=fake_server.url, timeout=30) as http:
        def submit(key: str, model: str, **spec: Any) -> str:
            answer = http.post("/v1/jobs", content=fake_payload(model, **spec), headers=_headers(key))
            assert answer.status_code == 202, answer.text
            return answer.json()["id"]

        def status_of(key: str, job_id: str) -> str:
            return http.get(f"/v1/jobs/{job_id}", headers=_headers(key)).json()["status"]

        held = submit(alice, "fake", hold=gate.path, log=["one", "two"])
        _wait_for(lambda: status_of(alice, held) == "RUNNING", "alice's first job to run")
        waiting = [submit(alice, "fake", echo=n) for n in range(2)]
        bobs = submit(bob, "other", hold=gate.path)
        _wait_for(lambda: status_of(bob, bobs) == "RUNNING", "bob's job to run")

        answer = http.get("/v1/status", headers=_headers(alice))
        assert answer.status_code == 200, answer.text
        status = answer.json()
        policy = http.get("/v1/policy").json()

        assert (status["server"], status["version"], status["protocol_version"]) == \
            ("interlace", __version__, PROTOCOL_VERSION)
        assert status["user"] == "alice" and alice.startswith(f"il_{status['key_id']}_")
        models = {m["key"]: m for m in status["models"]}
        assert set(models) == {"fake", "other"}
        assert (models["fake"]["state"], models["fake"]["queue_length"], models["fake"]["running"]) == ("ready", 2, True)
        assert (models["other"]["queue_length"], models["other"]["running"]) == (0, True)
        # Only alice's jobs, newest first; bob's job is counted in a queue but never named.
        assert [job["id"] for job in status["jobs"]] == [*reversed(waiting), held]
        assert bobs not in answer.text
        jobs = {job["id"]: job for job in status["jobs"]}
        assert [jobs[w]["queue_position"] for w in waiting] == [1, 2]
        assert [e["status"] for e in jobs[held]["events"]] == ["RECEIVED", "QUEUED", "RUNNING"]
        assert jobs[held]["log_lines"] == 2  # the printed lines are counted, not listed
        assert all(jobs[w]["status"] == "QUEUED" and jobs[w]["started"] is None for w in waiting)
        # The limits are the ones this server was started with, and the policy is the served one.
        assert status["limits"]["per_key"] == {"max_queued_per_key": 7, "in_flight": 3, "requests_per_minute": 4321}
        assert status["limits"]["per_job"]["timeout_seconds"] == 55.0
        assert status["limits"]["result_ttl"] == 3600
        assert status["policy"] == policy

        bob_sees = http.get("/v1/status", headers=_headers(bob)).json()
        assert [job["id"] for job in bob_sees["jobs"]] == [bobs]
        assert held not in str(bob_sees) and bob_sees["limits"]["per_key"]["in_flight"] == 1

        gate.open()
        for job_id in (held, *waiting):
            _wait_for(lambda job_id=job_id: status_of(alice, job_id) == "COMPLETED", f"job {job_id} to complete")
        done = http.get("/v1/status", headers=_headers(alice)).json()
        assert [e["status"] for e in {j["id"]: j for j in done["jobs"]}[held]["events"]] == \
            ["RECEIVED", "QUEUED", "RUNNING", "COMPLETED"]
        assert {m["key"]: m["queue_length"] for m in done["models"]}["fake"] == 0
        assert done["limits"]["per_key"]["in_flight"] == 0
        newest = http.get("/v1/status", params={"limit": 1}, headers=_headers(alice)).json()
        assert [job["id"] for job in newest["jobs"]] == [waiting[-1]]


# -- the page, in a real browser ---------------------------------------------------------------


def _chromium() -> tuple[str, str]:
    """Debian's chromium and its WebDriver; skips (fails on CI) with the fix when missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.path.exists(p)), None)
    problem = None
    if browser is None or driver is None:
        problem = ("The status page's browser test needs Debian's chromium and its WebDriver: "
                   "`apt-get install chromium chromium-driver` (scripts/setup.sh installs them).")
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            problem = "The status page's browser test needs selenium: `pip install -e '.[test]'`."
    if problem:
        if os.environ.get("CI"):  # CI runs setup.sh, which installs them: missing is a failure there
            pytest.fail(problem)
        pytest.skip(problem)
    return browser, driver


@pytest.fixture
def browser():
    binary, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --no-sandbox: Chromium's own sandbox cannot start as root (CI and this machine run as root).
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def model_server(tmp_path: Path, tiny_gpt2_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A long grace: the test's held job waits for its local block until the test runs it.
    proc = ServerProcess(tmp_path / "data", models=[str(tiny_gpt2_path)], fake=False,
                         args=["--local-grace", "600", "--local-block-timeout", "600"]).start()
    try:
        # A user name with markup: the page must show it as text.
        proc.key = proc.create_key("alice<b>bold</b>")
        monkeypatch.setattr(interlace.CONFIG.API, "HOST", proc.url)
        monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", proc.key)
        monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)
        yield proc
    finally:
        proc.stop()


# What the page shows, read in one call (the page re-renders: no element is held across calls).
SNAPSHOT = """
const text = (node, sel) => { const n = sel ? node.querySelector(sel) : node; return n ? n.textContent : null; };
const jobs = {}, models = {};
for (const n of document.querySelectorAll('[data-job]'))
  jobs[n.getAttribute('data-job')] = {status: n.getAttribute('data-status'), live: n.getAttribute('data-live'),
                                      text: n.textContent};
for (const n of document.querySelectorAll('[data-model]'))
  models[n.getAttribute('data-model')] = {state: text(n, '.badge'), queue: text(n, '.queue')};
return {signin: !document.getElementById('signin').hidden, dashboard: !document.getElementById('dashboard').hidden,
        signinProblem: text(document.getElementById('signin-problem')),
        whoami: text(document.getElementById('whoami')),
        markupInWhoami: document.querySelectorAll('#whoami *').length,
        notReloaded: window.__notReloaded === true, jobs, models};
"""


def test_the_status_page_in_a_browser(browser, model_server, tiny_gpt2_path, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    print(f"\nstatus page screenshots: {artifacts}")
    model_key = str(tiny_gpt2_path)
    shots: list[Path] = []

    def snapshot() -> dict[str, Any]:
        return browser.execute_script(SNAPSHOT)

    def until(condition: Callable[[dict[str, Any]], Any], what: str) -> dict[str, Any]:
        try:
            WebDriverWait(browser, WAIT_S, poll_frequency=0.05).until(lambda _: condition(snapshot()))
        except TimeoutException:
            shot(f"failed-{len(shots)}")
            raise AssertionError(f"the page did not show {what}: {snapshot()}") from None
        return snapshot()

    def shot(name: str) -> None:
        path = artifacts / f"status-page-{name}.png"
        browser.save_screenshot(str(path))
        shots.append(path)
        if os.environ.get("INTERLACE_ARTIFACTS"):
            target = Path(os.environ["INTERLACE_ARTIFACTS"])
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / path.name)

    # Without a key: the JSON is refused, and the page asks for one and shows no data.
    refused = httpx.get(f"{model_server.url}/v1/status", timeout=30)
    assert refused.status_code == 401 and KEY_HEADER in refused.json()["detail"]
    # `refresh=600`: no timer fires during the test, so what changes later came over the job streams.
    browser.get(f"{model_server.url}/status?refresh=600")
    page = until(lambda s: s["signin"], "the sign-in prompt")
    assert browser.find_element(By.ID, "signin-form").is_displayed()
    assert not page["dashboard"] and page["jobs"] == {} and page["models"] == {}
    shot("signed-out")

    def sign_in(key: str) -> None:
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.CSS_SELECTOR, "#signin-form button[type=submit]").click()

    sign_in("il_0000_wrong")
    page = until(lambda s: s["signin"] and "unknown or revoked" in (s["signinProblem"] or ""), "the refusal")
    assert page["jobs"] == {} and page["models"] == {}

    sign_in(model_server.key)
    page = until(lambda s: s["models"].get(model_key, {}).get("state") == "ready", "the model, ready")
    assert page["models"][model_key]["queue"] == "0" and page["jobs"] == {}
    assert "alice<b>bold</b>" in page["whoami"] and page["markupInWhoami"] == 0  # text, not markup
    browser.execute_script("window.__notReloaded = true")

    # Two jobs from Python: the first waits on the server for its local block, which runs here
    # only when the test asks for its result; the second queues behind it.
    model = interlace.LanguageModel(model_key)
    ran_here: list[int] = []
    with model.trace(PROMPT, remote=True, blocking=False) as first:
        hidden = model.transformer.h[0].output
        with interlace.local():
            ran_here.append(1)
            scaled = hidden * 2
        model.transformer.h[0].output[:] = scaled
        held = model.lm_head.output.save()
    with model.trace(PROMPT, remote=True, blocking=False) as second:
        queued = model.lm_head.output.save()
    first_id, second_id = first.job.id, second.job.id

    browser.find_element(By.ID, "refresh").click()  # a read, not a reload
    page = until(lambda s: s["jobs"].get(first_id, {}).get("status") == "RUNNING"
                 and "waiting for your local block" in s["jobs"][first_id]["text"]
                 and s["jobs"].get(second_id, {}).get("status") == "QUEUED"
                 and s["models"][model_key]["queue"] == "1"
                 and s["jobs"][first_id]["live"] == "1" and s["jobs"][second_id]["live"] == "1",
                 "the running job, the queued one behind it, and both followed live")
    shot("jobs-running")

    first_values = first.job.result(timeout=WAIT_S)  # runs the local block; the job completes
    second_values = second.job.result(timeout=WAIT_S)
    assert ran_here == [1]
    assert first_values["held"].shape == second_values["queued"].shape
    assert not first_values["held"].allclose(second_values["queued"])  # the block doubled layer 0's output

    page = until(lambda s: s["jobs"][first_id]["status"] == "COMPLETED" and s["jobs"][second_id]["status"] == "COMPLETED"
                 and s["models"][model_key]["queue"] == "0", "both jobs COMPLETED")
    assert page["notReloaded"], "the page reloaded; it must update in place"
    timeline = page["jobs"][first_id]["text"]
    assert all(state in timeline for state in ("RECEIVED", "QUEUED", "RUNNING", "COMPLETED"))
    shot("jobs-completed")

    browser.find_element(By.ID, "signout").click()
    page = until(lambda s: s["signin"], "the sign-in prompt after signing out")
    assert page["jobs"] == {} and page["models"] == {}
    assert browser.execute_script("return sessionStorage.length") == 0
    assert all(path.stat().st_size > 0 for path in shots)
