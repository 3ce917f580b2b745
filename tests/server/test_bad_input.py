"""Bad uploads get a clear 4xx and leave the server healthy."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from interlace._version import __version__
from interlace.testing import decode_fake_result, fake_payload

@pytest.fixture(scope="module")
def server(shared_server):
    shared_server.key = shared_server.alice
    return shared_server


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, timeout=10,
                      headers={"X-Interlace-Key": server.key, "X-Interlace-Version": __version__}) as client:
        yield client


def good_job_still_works(api):
    response = api.post("/v1/jobs", content=fake_payload(echo="ok"))
    assert response.status_code == 202
    job_id = response.json()["id"]
    # Wait on the state, with a limit only a hung server reaches (the machine may be loaded).
    deadline = time.monotonic() + 60
    while (status := api.get(f"/v1/jobs/{job_id}").json()["status"]) != "COMPLETED":
        assert status in {"RECEIVED", "QUEUED", "RUNNING"} and time.monotonic() < deadline, status
        time.sleep(0.02)
    assert decode_fake_result(api.get(f"/v1/jobs/{job_id}/result").content)["echo"] == "ok"


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"\x00\xff garbage \x13\x37", 400, "not a valid"),
        (fake_payload(echo="x" * 50)[:20], 400, "not a valid"),  # truncated
        (fake_payload("no-such-model"), 404, "not hosted"),
        (b'{"sleep": "long"}', 422, "problem"),
        (b"", 400, "empty"),
    ],
    ids=["garbage", "truncated", "unknown-model", "invalid", "empty"],
)
def test_bad_payload_is_refused_and_server_stays_healthy(api, body, status, words):
    response = api.post("/v1/jobs", content=body)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    if status == 422:
        assert {p["message"] for p in response.json()["problems"]} == {
            "model_key must be a string", "sleep must be a number"}
    good_job_still_works(api)


def test_oversize_upload_is_refused_early(api, server):
    response = api.post("/v1/jobs", content=b"x" * 20_000)
    assert response.status_code == 413
    assert "at most" in response.json()["detail"] and "--max-upload-mb" in response.json()["detail"]
    good_job_still_works(api)


def test_oversize_chunked_upload_is_refused_while_streaming(api, server):
    # No Content-Length: the limit must be enforced while reading the stream.
    def chunks():
        for _ in range(30):
            yield b"y" * 1000

    response = api.post("/v1/jobs", content=chunks())
    assert response.status_code == 413
    good_job_still_works(api)


def test_unknown_model_names_hosted_models(api):
    detail = api.post("/v1/jobs", content=fake_payload("gpt-99")).json()["detail"]
    assert "gpt-99" in detail and "fake" in detail


def test_half_sent_request_does_not_hurt(api, server):
    # A client that dies mid-upload: the server must drop it and carry on.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                     + f"X-Interlace-Key: {server.key}\r\n\r\n".encode() + b"{\"model")
    good_job_still_works(api)
