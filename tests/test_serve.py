"""The Videos API against a real Serve app on 127.0.0.1 (tiny random-init conditional model, 2 sampling steps):
the openai SDK flows, bad requests, auth, the web page (headless Chromium), concurrent load and restart
durability. One app for the module; the durability test redeploys it last."""

from __future__ import annotations

import collections
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
KEY = "test-key-123"  # tenant acme
KEY2 = "test-key-acme-2"  # a second key of acme: the same videos
OTHER = "test-key-other"  # a tenant of its own (no name given)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    def __init__(self, base: str, args: dict):
        self.base, self.args = base, args
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    def store(self):
        from serve.jobs import JobStore, sqlite_url

        return JobStore(sqlite_url(os.path.join(self.args["data_dir"], "jobs.db")))

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def sdk(self, key: str = KEY):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=60)

    def wait(self, video_id: str, timeout: float = 90, key: str = KEY) -> dict:
        deadline = time.time() + timeout
        http = self.http if key == KEY else self.client(key)
        while time.time() < deadline:
            v = http.get(f"/v1/videos/{video_id}").json()
            if v["status"] in ("completed", "failed"):
                return v
            time.sleep(0.2)
        raise AssertionError(f"{video_id} not finished after {timeout}s: {v}")


def _deploy(args: dict) -> None:
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(args), name="lumiere", route_prefix="/")


@pytest.fixture(scope="module")
def server(ray_session):
    from ray import serve

    data = tempfile.mkdtemp(dir="/tmp", prefix="lsrv")
    port = _free_port()
    args = {"random_init": "tiny", "set": ["stunet.conditional=true"], "ssr_random_init": "tiny",
            "data_dir": data, "api_keys": [f"{KEY} acme", f"{KEY2} acme", OTHER],
            "default_steps": 2, "max_pending_jobs": 12, "max_active_jobs_per_tenant": 8, "stale_after_s": 3.0,
            "poll_after_ms": 100, "max_upload_bytes": 4 * 2**20, "claim_interval_s": 0.2,
            "webhook_secrets": ["acme whsec-test"], "webhook_allowed_hosts": ["127.0.0.1"],
            "deployments": {"Generator": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}}}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    _deploy(args)
    yield Server(f"http://127.0.0.1:{port}", args)
    serve.shutdown()
    shutil.rmtree(data, ignore_errors=True)


# --- the SDK flows -----------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_sdk_create_and_poll_then_download(server):
    from lumiere.video import decode_mp4_bytes

    client = server.sdk()
    video = client.videos.create_and_poll(prompt="a red square moving right", seconds="0.5", size="32x32",
                                          poll_interval_ms=100, extra_body={"seed": 3, "num_inference_steps": 2})
    assert video.status == "completed", video.error
    assert video.progress == 100 and video.model == "lumiere-tiny" and video.seconds == "0.5"
    frames = decode_mp4_bytes(client.videos.download_content(video.id).read())
    assert frames.shape == (8, 32, 32, 3)
    thumb = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="thumbnail").read()))
    assert thumb.size == (32, 32)
    sheet = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="spritesheet").read()))
    assert sheet.size == (32 * 3, 32 * 3)  # 8 frames on a 3x3 grid
    # two clip lengths: "1" second is 16 frames
    longer = client.videos.create_and_poll(prompt="a blue circle", seconds="1", poll_interval_ms=100)
    assert longer.status == "completed"
    assert decode_mp4_bytes(client.videos.download_content(longer.id).read()).shape[0] == 16


@pytest.mark.timeout(120)
def test_sdk_list_and_delete(server):
    import openai

    client = server.sdk()
    ids = [client.videos.create_and_poll(prompt=f"clip {i}", poll_interval_ms=100).id for i in range(2)]
    page = client.videos.list(limit=1, order="desc")
    assert [v.id for v in page.data] == [ids[1]] and page.has_more
    after = client.videos.list(limit=1, after=ids[1], order="desc")
    assert [v.id for v in after.data] == [ids[0]]
    assert ids[0] in {v.id for v in client.videos.list(limit=100)}
    deleted = client.videos.delete(ids[0])
    assert deleted.deleted and deleted.id == ids[0]
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(ids[0])
    assert ids[0] not in {v.id for v in client.videos.list(limit=100)}


@pytest.mark.timeout(60)
def test_sdk_models_list_and_retrieve(server):
    import time

    client = server.sdk()
    (listed,) = client.models.list().data
    got = client.models.retrieve(listed.id)
    assert listed.id == got.id == "lumiere-tiny" and got.owned_by == "lumiere"
    assert isinstance(got.created, int) and time.time() - 24 * 3600 < got.created <= time.time()


@pytest.mark.timeout(120)
def test_sdk_image_to_video(server):
    from lumiere.video import decode_mp4_bytes

    client = server.sdk()
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = (220, 30, 30)
    video = client.videos.create_and_poll(prompt="the square moves", input_reference=("ref.png", _png(image),
                                          "image/png"), poll_interval_ms=100)
    assert video.status == "completed", video.error
    assert video.model_extra["task"] == "i2v"
    frames = decode_mp4_bytes(client.videos.download_content(video.id).read())
    assert np.abs(frames[0].astype(int) - image).mean() < 12  # frame 0 is the reference (mp4-compressed)


@pytest.mark.timeout(180)
def test_sdk_edit_extend_remix(server):
    import openai

    from lumiere.video import decode_mp4_bytes, encode_mp4_bytes

    client = server.sdk()
    source = client.videos.create_and_poll(prompt="a red square", poll_interval_ms=100)
    upload = encode_mp4_bytes(np.full((8, 48, 48, 3), 128, np.uint8), 16)
    edited = client.videos.edit(prompt="a green square", video=("in.mp4", upload, "video/mp4"),
                                extra_body={"strength": 0.5})
    # a reference to a completed video: this SDK only sends files in `video`, so the {"id"} rides in extra_body
    by_id = client.videos.edit(prompt="a green square", video=openai.omit, extra_body={"video": {"id": source.id}})
    extended = client.videos.extend(prompt="it keeps moving", seconds="0.5", video=openai.omit,
                                    extra_body={"video": {"id": source.id}})
    uploaded = client.videos.extend(prompt="it keeps moving", seconds="0.5",
                                    video=("in.mp4", client.videos.download_content(source.id).read(), "video/mp4"))
    assert server.http.post("/v1/videos/extensions", json={"prompt": "json", "seconds": "0.5",
                                                           "video": {"id": source.id}}).status_code == 200
    remixed = client.videos.remix(source.id, prompt="a blue square")
    longer = client.videos.create_and_poll(prompt="a long red square", seconds="1", poll_interval_ms=100)
    remixed_longer = client.videos.remix(longer.id, prompt="a long blue square")
    assert (remixed_longer.seconds, remixed_longer.size) == (longer.seconds, longer.size) == ("1", "32x32")
    for job in (edited, by_id, extended, uploaded, remixed, remixed_longer):
        done = client.videos.poll(job.id, poll_interval_ms=100)
        assert done.status == "completed", (job.model_extra.get("task"), done.error)
    assert edited.model_extra["task"] == "v2v" and extended.model_extra["task"] == "extend"
    assert remixed.remixed_from_video_id == source.id
    frames = decode_mp4_bytes(client.videos.download_content(extended.id).read())
    # 8 new frames asked for; each extension round adds 6 (2 context frames): 2 rounds -> 8 + 12
    assert frames.shape == (20, 32, 32, 3)
    assert client.videos.retrieve(extended.id).seconds == "1.25"
    original = decode_mp4_bytes(client.videos.download_content(source.id).read())
    assert np.abs(frames[:8].astype(int) - original.astype(int)).mean() < 8  # the clip, then its continuation


@pytest.mark.timeout(120)
def test_lumiere_fields_cinemagraph_and_inpaint_over_http(server):
    from lumiere.video import encode_mp4_bytes

    image = np.full((32, 32, 3), 90, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    r = server.http.post("/v1/videos", data={"prompt": "water ripples", "task": "cinemagraph", "seed": "5",
                                             "guidance_scale": "2.0"},
                         files={"input_reference": ("i.png", _png(image)), "mask": ("m.png", _png(mask))})
    assert r.status_code == 200, r.text
    r2 = server.http.post("/v1/videos/edits", data={"prompt": "fill it", "task": "inpaint"},
                          files={"video": ("v.mp4", encode_mp4_bytes(np.full((8, 32, 32, 3), 60, np.uint8), 16)),
                                 "mask": ("m.png", _png(mask))})
    assert r2.status_code == 200, r2.text
    j = server.http.post("/v1/videos", json={"prompt": "json body", "seed": 7, "num_inference_steps": 1})
    assert j.status_code == 200, j.text
    for job in (r.json(), r2.json(), j.json()):
        done = server.wait(job["id"])
        assert done["status"] == "completed", done
    assert server.wait(r.json()["id"])["seed"] == 5


@pytest.mark.timeout(120)
def test_upsampled_size_runs_the_ssr(server):
    from lumiere.video import decode_mp4_bytes

    client = server.sdk()
    video = client.videos.create_and_poll(prompt="a red square", size="64x64", poll_interval_ms=100)
    assert video.status == "completed", video.error
    assert decode_mp4_bytes(client.videos.download_content(video.id).read()).shape == (8, 64, 64, 3)


# --- bad requests --------------------------------------------------------------------------------------------
BAD = [  # (method, path, kwargs, status, param, words in the message)
    ("post", "/v1/videos", {"data": {"seconds": "0.5"}}, 400, "prompt", "prompt is required"),
    ("post", "/v1/videos", {"data": {"prompt": "x", "model": "sora-2"}}, 400, "model", "lumiere-tiny"),
    ("post", "/v1/videos", {"data": {"prompt": "x", "size": "1280x720"}}, 400, "size", "32x32"),
    ("post", "/v1/videos", {"data": {"prompt": "x", "seconds": "4"}}, 400, "seconds", "0.5, 1"),
    ("post", "/v1/videos", {"data": {"prompt": "x"}, "files": {"input_reference": ("a.png", b"not an image")}},
     400, "input_reference", "does not decode"),
    ("post", "/v1/videos", {"data": {"prompt": "x", "task": "cinemagraph"},
                            "files": {"input_reference": ("a.png", _png(np.zeros((32, 32, 3), np.uint8))),
                                      "mask": ("m.png", _png(np.zeros((16, 16), np.uint8)))}},
     400, "mask", "same size"),
    ("post", "/v1/videos", {"data": {"prompt": "x", "task": "teleport"}}, 400, "task", "t2v, i2v"),
    ("post", "/v1/videos", {"data": {"prompt": "x", "task": "i2v"}}, 400, "input_reference", "needs"),
    ("post", "/v1/videos", {"data": {"prompt": "x", "num_inference_steps": "0"}}, 400, "num_inference_steps",
     "[1, 250]"),
    ("post", "/v1/videos", {"data": {"prompt": "x", "seed": "abc"}}, 400, "seed", "integer"),
    ("post", "/v1/videos", {"data": {"prompt": "x" * 3000}}, 400, "prompt", "at most 2000"),
    ("post", "/v1/videos", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None,
     "JSON"),
    ("post", "/v1/videos/edits", {"data": {"prompt": "x"}, "files": {"video": ("v.mp4", b"garbage")}}, 400,
     "video", "does not decode"),
    ("post", "/v1/videos/edits", {"data": {"prompt": "x", "video[id]": "video_nope"}}, 404, "video", "no video"),
    ("post", "/v1/videos/edits", {"data": {"prompt": "x"}}, 400, "video", "needs video"),
    ("post", "/v1/videos/x/remix", {"data": {"prompt": "x"}}, 404, "video_id", "no video"),
    ("get", "/v1/videos/video_unknown", {}, 404, "video_id", "no video"),
    ("get", "/v1/videos/video_unknown/content", {}, 404, "video_id", "no video"),
    ("delete", "/v1/videos/video_unknown", {}, 404, "video_id", "no video"),
    ("get", "/v1/videos", {"params": {"limit": 1000}}, 400, "limit", "[1, 100]"),
    ("get", "/v1/videos", {"params": {"order": "sideways"}}, 400, "order", "asc or desc"),
    ("get", "/v1/videos", {"params": {"after": "video_unknown"}}, 400, "after", "not a video id"),
    ("get", "/v1/models/sora-2", {}, 404, "model", "lumiere-tiny"),
    # wrong JSON types in the reference fields (a 500 before)
    ("post", "/v1/videos", {"json": {"prompt": "x", "input_reference": 5}}, 400, "input_reference", "got int"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "input_reference": [1, 2]}}, 400, "input_reference",
     "got list"),
    ("get", "/v1/nothing-here", {}, 404, None, "Not Found"),
]


@pytest.mark.timeout(120)
def test_bad_requests_are_4xx_with_openai_error_objects(server):
    for method, path, kwargs, status, param, words in BAD:
        r = getattr(server.http, method)(path, **kwargs)
        assert r.status_code == status, (path, kwargs.get("data"), r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["param"] == param and words in err["message"], (path, err)
    # a bad variant, and the content of a job that is not completed yet
    slow = server.http.post("/v1/videos", data={"prompt": "slow", "num_inference_steps": "60"}).json()
    r = server.http.get(f"/v1/videos/{slow['id']}/content")
    assert r.status_code == 409 and r.json()["error"]["code"] == "video_not_ready"
    r = server.http.get(f"/v1/videos/{slow['id']}/content", params={"variant": "gif"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "variant"
    cancelled = server.http.post(f"/v1/videos/{slow['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "failed"
    assert cancelled.json()["error"]["code"] == "cancelled"


@pytest.mark.timeout(60)
def test_auth_required(server):
    import openai

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        r = httpx.get(server.base + "/v1/videos", headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.sdk(key="not-the-key").videos.create(prompt="x")
    assert httpx.get(server.base + "/healthz").status_code == 200  # health and the page need no key
    assert httpx.get(server.base + "/v1/info").status_code == 401  # what the server runs does


@pytest.mark.timeout(60)
def test_page_docs_and_health(server):
    page = httpx.get(server.base + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for needle in ('id="prompt"', 'id="task"', 'id="image"', 'id="mask"', 'id="video"', '"/v1/videos"',
                   "/v1/videos/extensions", "/v1/videos/edits", "/content", "/healthz", "<video"):
        assert needle in page.text, needle
    assert httpx.get(server.base + "/healthz").json() == {"status": "ok"}  # nothing about the model or stores
    info = server.http.get("/v1/info").json()
    assert info["sizes"] == ["32x32", "64x64"] and info["seconds"] == ["0.5", "1"] and info["num_frames"] == [8, 16]
    assert info["tenant"] == "acme" and info["max_active_jobs"] == 8
    assert httpx.get(server.base + "/docs").status_code == 200
    paths = httpx.get(server.base + "/openapi.json").json()["paths"]
    assert {"/v1/videos", "/v1/videos/{video_id}/content", "/v1/videos/{video_id}/remix"} <= set(paths)


def _chromium() -> str | None:
    """Debian's chromium; the test setup installs it with apt-get when it is missing and we may (root)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or not shutil.which("apt-get") or os.geteuid() != 0:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True,
                       timeout=600, env=env)
    except subprocess.TimeoutExpired:
        return None
    return shutil.which("chromium")


@pytest.mark.timeout(900)
def test_web_page_in_headless_chromium(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium binary and it could not be installed with apt-get (needs root and Debian's repo)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True,
                                    args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page()
            page.goto(server.base + "/")
            page.fill("#apikey", KEY)
            page.dispatch_event("#apikey", "change")
            page.wait_for_function("document.querySelector('#size').options.length > 0")
            page.fill("#prompt", "a yellow square moving down")
            page.fill("#steps", "2")
            page.click("#submit")
            page.wait_for_function("document.querySelector('#status').textContent.includes('completed')",
                                   timeout=90_000)
            page.wait_for_function("(() => { const v = document.querySelector('#result');"
                                   " return !v.hidden && v.readyState >= 2 && v.currentTime > 0; })()",
                                   timeout=30_000)
            assert page.eval_on_selector("#result", "v => v.videoWidth") == 32
            assert "error" not in page.text_content("#status")
            # the history lists it with its thumbnail (fetched with the key), and its buttons
            page.wait_for_function("[...document.querySelectorAll('#history li')].some(li => "
                                   "li.textContent.includes('a yellow square moving down') && "
                                   "li.querySelector('img').src.startsWith('blob:'))", timeout=30_000)
            assert page.locator("#history li button", has_text="remix").count() >= 1
        finally:
            browser.close()


# --- tenants, idempotency, cancel, top-level generation fields -------------------------------------------------
@pytest.mark.timeout(180)
def test_tenants_see_only_their_own_videos_on_every_route(server):
    acme, acme2, other = server.client(KEY), server.client(KEY2), server.client(OTHER)
    mine = server.wait(acme.post("/v1/videos", data={"prompt": "acme's clip"}).json()["id"])
    assert mine["status"] == "completed"
    vid = mine["id"]
    assert acme2.get(f"/v1/videos/{vid}").status_code == 200  # a second key of the same tenant
    assert vid in {v["id"] for v in acme2.get("/v1/videos", params={"limit": 100}).json()["data"]}
    refused = {
        "retrieve": other.get(f"/v1/videos/{vid}"),
        "content": other.get(f"/v1/videos/{vid}/content"),
        "thumbnail": other.get(f"/v1/videos/{vid}/content", params={"variant": "thumbnail"}),
        "delete": other.delete(f"/v1/videos/{vid}"),
        "cancel": other.post(f"/v1/videos/{vid}/cancel"),
        "remix": other.post(f"/v1/videos/{vid}/remix", data={"prompt": "steal"}),
        "edit by id": other.post("/v1/videos/edits", json={"prompt": "steal", "video": {"id": vid}}),
        "extend by id": other.post("/v1/videos/extensions", json={"prompt": "steal", "video": vid}),
        "list cursor": other.get("/v1/videos", params={"after": vid}),
    }
    for route, r in refused.items():
        assert r.status_code in (404, 400), (route, r.status_code, r.text)
        assert r.json()["error"]["code"] in ("video_not_found", "invalid_cursor"), (route, r.json())
        assert "acme's clip" not in r.text and "completed" not in r.text, (route, r.text)  # nothing leaks
    assert vid not in {v["id"] for v in other.get("/v1/videos", params={"limit": 100}).json()["data"]}
    assert acme.get(f"/v1/videos/{vid}").json()["status"] == "completed"  # untouched by the attempts


@pytest.mark.timeout(180)
def test_idempotency_key_returns_the_same_job_for_a_retry(server):
    body = {"prompt": "retried", "num_inference_steps": 2, "seed": 9}
    first = server.http.post("/v1/videos", json=body, headers={"Idempotency-Key": "req-1"})
    again = server.http.post("/v1/videos", json=body, headers={"Idempotency-Key": "req-1"})
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"] and again.headers.get("idempotent-replayed") == "true"
    changed = server.http.post("/v1/videos", json={**body, "seed": 10}, headers={"Idempotency-Key": "req-1"})
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "idempotency_key_reused"
    theirs = server.client(OTHER).post("/v1/videos", json=body, headers={"Idempotency-Key": "req-1"})
    assert theirs.status_code == 200 and theirs.json()["id"] != first.json()["id"]  # keys are per tenant
    for job, key in ((first.json(), KEY), (theirs.json(), OTHER)):
        assert server.wait(job["id"], key=key)["status"] == "completed"
    rows = [j for j in server.store().list(limit=100)[0] if j.prompt == "retried"]
    assert len(rows) == 2  # one per tenant, however many retries


@pytest.mark.timeout(240)
def test_cancel_stops_the_sampler_at_the_next_step(server):
    from ray import serve

    gen = serve.get_deployment_handle("Generator", app_name="lumiere")
    before = gen.run_stats.remote().result()
    job = server.http.post("/v1/videos", data={"prompt": "cancel me", "num_inference_steps": "250",
                                               "seconds": "1"}).json()
    deadline = time.time() + 90
    while (v := server.http.get(f"/v1/videos/{job['id']}").json())["progress"] < 2:
        assert v["status"] in ("queued", "in_progress") and time.time() < deadline, v
        time.sleep(0.1)
    r = server.http.post(f"/v1/videos/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["error"]["code"] == "cancelled"
    deadline = time.time() + 30
    while (after := gen.run_stats.remote().result())["cancelled"] == before["cancelled"]:
        assert time.time() < deadline, after
        time.sleep(0.2)
    steps = after["steps"] - before["steps"]
    assert after["finished"] == before["finished"] and steps < 250, (before, after)  # it stopped partway
    time.sleep(1.0)
    final = server.http.get(f"/v1/videos/{job['id']}").json()
    assert final["status"] == "failed" and final["error"]["code"] == "cancelled"  # never flips to completed
    assert server.http.get(f"/v1/videos/{job['id']}/content").status_code == 409
    # DELETE of an active job cancels it too, and removes it
    job = server.http.post("/v1/videos", data={"prompt": "delete me", "num_inference_steps": "250"}).json()
    assert server.http.delete(f"/v1/videos/{job['id']}").json()["deleted"]
    assert server.http.get(f"/v1/videos/{job['id']}").status_code == 404


@pytest.mark.timeout(120)
def test_top_level_generation_fields_of_other_video_servers(server):
    from lumiere.video import decode_mp4_bytes

    r = server.http.post("/v1/videos", json={"prompt": "a red square", "num_frames": 16, "fps": 8,
                                             "negative_prompt": "blurry", "guidance_scale": 4.0,
                                             "num_inference_steps": 2, "seed": 11})
    assert r.status_code == 200, r.text
    done = server.wait(r.json()["id"])
    assert done["status"] == "completed", done
    assert done["seconds"] == "2" and done["num_frames"] == 16 and done["fps"] == 8 and done["seed"] == 11
    assert done["inference_time_s"] > 0 and done["peak_memory_mb"] > 0
    frames = decode_mp4_bytes(server.http.get(f"/v1/videos/{done['id']}/content").content)
    assert frames.shape == (16, 32, 32, 3)
    for body, param in (({"prompt": "x", "num_frames": 12}, "num_frames"),
                        ({"prompt": "x", "num_frames": 8, "seconds": "1"}, "num_frames"),
                        ({"prompt": "x", "fps": 0}, "fps"), ({"prompt": "x", "negative_prompt": 5}, "negative_prompt")):
        r = server.http.post("/v1/videos", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


class _WebhookReceiver:
    """A local HTTP endpoint that records every webhook delivery (headers, body) in order."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, HTTPServer

        self.received: list[tuple[dict, bytes]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass  # keep the receiver quiet in the test output

        self.http = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook"

    def wait_for(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while len(self.received) < n:
            assert time.time() < deadline, self.received
            time.sleep(0.2)

    def events(self) -> list[dict]:
        import json

        return [json.loads(body) for _, body in self.received]

    def close(self):
        self.http.shutdown()


@pytest.mark.timeout(180)
def test_webhooks_are_signed_per_tenant_on_completion_and_failure(server):
    import base64
    import hashlib
    import hmac
    import json

    hook = _WebhookReceiver()
    url, received = hook.url, hook.received
    try:
        ok = server.http.post("/v1/videos", json={"prompt": "notify me", "webhook_url": url}).json()
        # cancelled while running: the runner reports it; cancelled at once (queued, or just claimed): whoever
        # held it last reports it, exactly once. Both are cancelled before they can finish 250 steps.
        running = server.http.post("/v1/videos", json={"prompt": "cancel me", "webhook_url": url,
                                                        "num_inference_steps": 250}).json()
        at_once = server.http.post("/v1/videos", json={"prompt": "cancel me at once", "webhook_url": url,
                                                        "num_inference_steps": 250}).json()
        r = server.http.post(f"/v1/videos/{at_once['id']}/cancel").json()
        assert r["status"] == "failed" and r["error"]["code"] == "cancelled", r
        deadline = time.time() + 90
        while (v := server.http.get(f"/v1/videos/{running['id']}").json())["progress"] < 2:
            assert v["status"] in ("queued", "in_progress") and time.time() < deadline, v
            time.sleep(0.1)
        r = server.http.post(f"/v1/videos/{running['id']}/cancel").json()
        assert r["status"] == "failed" and r["error"]["code"] == "cancelled", r
        assert server.wait(ok["id"])["status"] == "completed"
        hook.wait_for(3)
        time.sleep(1.0)  # a second delivery for the same job would arrive by now
    finally:
        hook.close()
    events, deliveries = {}, collections.Counter()
    for headers, body in received:
        headers = {k.lower(): v for k, v in headers.items()}
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        expected = "v1," + base64.b64encode(hmac.new(b"whsec-test", signed, hashlib.sha256).digest()).decode()
        assert hmac.compare_digest(headers["webhook-signature"], expected)  # signed with acme's secret
        event = json.loads(body)
        events[event["data"]["id"]] = event
        deliveries[event["data"]["id"]] += 1
    assert deliveries == {ok["id"]: 1, running["id"]: 1, at_once["id"]: 1}, deliveries
    assert events[ok["id"]]["type"] == "video.completed" and events[ok["id"]]["data"]["status"] == "completed"
    for cancelled in (running, at_once):
        assert events[cancelled["id"]]["type"] == "video.failed"
        assert events[cancelled["id"]]["data"]["error"]["code"] == "cancelled"
    deadline = time.time() + 30
    while not server.http.get(f"/v1/videos/{ok['id']}").json().get("webhook"):
        assert time.time() < deadline
        time.sleep(0.2)
    assert server.http.get(f"/v1/videos/{ok['id']}").json()["webhook"]["delivered"] is True
    # a tenant without a secret cannot ask for (unsigned) webhooks; a private address is not a target
    r = server.client(OTHER).post("/v1/videos", json={"prompt": "x", "webhook_url": url})
    assert r.status_code == 400 and r.json()["error"]["code"] == "webhooks_not_configured"
    r = server.http.post("/v1/videos", json={"prompt": "x", "webhook_url": "http://10.1.2.3/hook"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_webhook_url"
    r = server.http.post("/v1/videos", json={"prompt": "x", "webhook_url": "file:///etc/passwd"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_webhook_url"


@pytest.mark.timeout(240)
def test_compatible_queued_jobs_share_one_sampler_call_with_their_own_seeds(server):
    """With every runner slot busy, queued t2v jobs of the same settings are claimed together and sampled in one
    Generator call; each gets the video it would have got alone (its own seed's noise, a deterministic sampler)."""
    from lumiere.video import decode_mp4_bytes

    c = server.client(OTHER)  # a tenant of its own: acme's limit is not in the way
    busy = [c.post("/v1/videos", json={"prompt": f"busy {i}", "num_inference_steps": 40 + i}).json()["id"]
            for i in range(4)]  # 4 sampler calls (steps differ: never one batch) fill the runner's 4 slots
    queued = [c.post("/v1/videos", json={"prompt": f"batched {i}", "seed": 100 + i, "num_inference_steps": 3}).json()
              for i in range(4)]
    done = [server.wait(j["id"], key=OTHER) for j in queued]
    assert all(d["status"] == "completed" for d in done), done
    sizes = [server.store().get(j["id"]).params["batch_size"] for j in queued]
    assert max(sizes) > 1, sizes  # at least two shared a call
    for i in busy:
        server.wait(i, key=OTHER)
    # the same prompt and seed alone (nothing queued now, so it is claimed by itself) gives the same video
    solo = c.post("/v1/videos", json={"prompt": "batched 2", "seed": 102, "num_inference_steps": 3}).json()
    assert server.wait(solo["id"], key=OTHER)["status"] == "completed"
    assert server.store().get(solo["id"]).params["batch_size"] == 1
    together = decode_mp4_bytes(c.get(f"/v1/videos/{queued[2]['id']}/content").content).astype(int)
    alone = decode_mp4_bytes(c.get(f"/v1/videos/{solo['id']}/content").content).astype(int)
    other = decode_mp4_bytes(c.get(f"/v1/videos/{queued[1]['id']}/content").content).astype(int)
    assert np.abs(together - alone).mean() < 1.0 < np.abs(together - other).mean()


# --- bounded input and fuzzing -------------------------------------------------------------------------------------
def _chunks(total: int, chunk: int = 256 * 1024):
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        sent += n
        yield b"x" * n


@pytest.mark.timeout(240)
def test_bodies_are_bounded_while_streaming_and_fuzzed_fields_are_4xx(server):
    from lumiere.video import encode_mp4_bytes

    limit = server.args["max_upload_bytes"]
    # chunked (no Content-Length): refused once the count passes the limit, not after spooling it all
    r = server.http.post("/v1/videos", content=_chunks(limit * 4), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    r = server.http.post("/v1/videos", content=_chunks(limit + 1),
                         headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413, r.text
    # a video with more frames than allowed is refused from its header (600 tiny frames: a small file)
    many = encode_mp4_bytes(np.zeros((600, 16, 16, 3), np.uint8), 16)
    r = server.http.post("/v1/videos/edits", data={"prompt": "x"}, files={"video": ("v.mp4", many)})
    assert r.status_code == 400 and "600 frames; at most 512" in r.json()["error"]["message"], r.text
    # a truncated multipart body
    good = httpx.Request("POST", server.base + "/v1/videos", data={"prompt": "x"},
                         files={"input_reference": ("a.png", _png(np.zeros((32, 32, 3), np.uint8)))})
    raw = good.read()
    r = server.http.post("/v1/videos", content=raw[: len(raw) // 2],
                         headers={"content-type": good.headers["content-type"]})
    assert 400 <= r.status_code < 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    # wrong types and odd values in every field, as JSON and as form fields: 4xx with the error object, never 5xx
    fields = ["prompt", "model", "seconds", "size", "task", "seed", "num_inference_steps", "guidance_scale",
              "strength", "style", "style_strength", "num_frames", "fps", "negative_prompt", "input_reference",
              "video", "mask", "image", "webhook_url"]
    values = [5, -1, 1.5, True, None, [1, 2], {"a": 1}, "", "\x00", "1e400", "nan", "x" * 5000, 2**70]
    tried = 0
    for endpoint in ("/v1/videos", "/v1/videos/edits"):
        for name in fields:
            for value in values:
                body = {"prompt": "fuzz", name: value} if name != "prompt" else {name: value}
                r = server.client(OTHER).post(endpoint, json=body)
                tried += 1
                assert r.status_code < 500, (endpoint, name, value, r.status_code, r.text[:300])
                if r.status_code >= 400:
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
                else:  # a value that happens to be valid: cancel it so the tenant's limit is not the answer
                    server.client(OTHER).post(f"/v1/videos/{r.json()['id']}/cancel")
            for value in ("5", "", "\x00", "1e400", "nan"):
                r = server.client(OTHER).post(endpoint, data={"prompt": "fuzz", name: value})
                tried += 1
                assert r.status_code < 500, (endpoint, name, value, r.status_code, r.text[:300])
                if r.status_code == 200:
                    server.client(OTHER).post(f"/v1/videos/{r.json()['id']}/cancel")
    # odd files in every file field
    mp4 = encode_mp4_bytes(np.zeros((8, 32, 32, 3), np.uint8), 16)
    png = _png(np.zeros((32, 32, 3), np.uint8))
    targets = (("/v1/videos", "input_reference"), ("/v1/videos/edits", "video"), ("/v1/videos/edits", "mask"))
    odd = [(what, data, target) for what, data in (("empty", b""), ("one byte", b"\x00"), ("truncated mp4", mp4[:300]))
           for target in targets]
    odd += [("png as video", png, targets[1]), ("mp4 as image", mp4, targets[0])]
    for what, data, (endpoint, field_name) in odd:
        form = {"prompt": "x", "task": "inpaint"} if field_name == "mask" else {"prompt": "x"}
        files = {field_name: ("f", data)}
        if field_name == "mask":
            files["video"] = ("v.mp4", mp4)
        r = server.client(OTHER).post(endpoint, data=form, files=files)
        tried += 1
        assert 400 <= r.status_code < 500, (what, endpoint, field_name, r.status_code, r.text[:300])
        assert r.json()["error"]["param"] == field_name, (what, field_name, r.json())
    assert tried > 500


# --- load and durability -------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_concurrent_load_refusals_are_429_with_retry_after_and_limits_hold(server):
    """16 clients of two tenants for 20 s against max_pending_jobs=12 and 8 active jobs per tenant: every request
    is accepted (and completes) or refused with 429 + Retry-After + the error code of the limit it hit; a sampler
    watching the job store never sees a tenant over 8 or the server over 12 active jobs; nothing answers 5xx."""
    results = {"accepted": [], "refused": [], "other": []}
    lock = threading.Lock()
    stop = time.time() + 20
    store = server.store()
    seen = {"server": 0, "acme": 0, "other": 0}

    def watch():
        from serve.tenants import tenant_of_key

        while time.time() < stop + 2:
            seen["server"] = max(seen["server"], store.count_active())
            seen["acme"] = max(seen["acme"], store.count_active("acme"))
            seen["other"] = max(seen["other"], store.count_active(tenant_of_key(OTHER)))
            time.sleep(0.05)

    def client(i):
        key = (KEY, KEY2, OTHER)[i % 3]
        with server.client(key) as c:
            while time.time() < stop:
                r = c.post("/v1/videos", json={"prompt": f"client {i}", "num_inference_steps": 2})
                with lock:
                    if r.status_code == 200:
                        results["accepted"].append(r.json()["id"])
                    elif r.status_code == 429:
                        results["refused"].append((r.json()["error"]["code"], r.headers.get("retry-after")))
                    else:
                        results["other"].append((r.status_code, r.text[:200]))
                time.sleep(0.5 if r.status_code != 200 else 0.1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not results["other"], results["other"][:3]
    assert results["accepted"] and results["refused"], (len(results["accepted"]), len(results["refused"]))
    codes = {code for code, _ in results["refused"]}
    assert codes <= {"tenant_limit_reached", "queue_full"} and "tenant_limit_reached" in codes, codes
    assert all(after is not None and int(after) > 0 for _, after in results["refused"])
    assert seen["acme"] <= 8 and seen["other"] <= 8 and seen["server"] <= 12, seen
    assert seen["acme"] >= 1 and seen["other"] >= 1, seen  # the watcher did see the load
    statuses = [store.get(i).status for i in results["accepted"]]
    deadline = time.time() + 180
    while any(st in ("queued", "in_progress") for st in statuses) and time.time() < deadline:
        time.sleep(0.5)
        statuses = [store.get(i).status for i in results["accepted"]]
    assert statuses.count("completed") == len(statuses), statuses
    ids, after = [], None  # every job in the store, page by page: on a fast machine more than one page is accepted
    while True:
        page, more = store.list(limit=100, after=after)
        ids += [j.id for j in page]
        if not more:
            break
        after = page[-1].id
    assert all(ids.count(i) == 1 for i in results["accepted"]), (len(ids), len(results["accepted"]))


def _replicas(cls: str) -> list[str]:
    """The live replica actors of a deployment of the app (their names are new for every replica started)."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::lumiere#{cls}#")]


def _kill_replica(name: str) -> None:
    """Force-kill the replica's worker process (ray.kill: no graceful shutdown, no __del__), as a crash or an
    OOM kill would."""
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


@pytest.mark.timeout(300)
def test_killed_ingress_replica_its_job_is_taken_over_and_completes_once(server):
    """Kill the Ingress replica while it runs a job: Serve starts a new replica, whose sweep sees the dead
    owner's heartbeat stop and re-queues the job; it then runs again and completes, once."""
    from lumiere.video import decode_mp4_bytes

    job = server.http.post("/v1/videos", data={"prompt": "survive", "num_inference_steps": "120"}).json()
    deadline = time.time() + 60
    while (v := server.http.get(f"/v1/videos/{job['id']}").json())["progress"] < 2:
        assert time.time() < deadline, v
        time.sleep(0.1)
    (replica,) = _replicas("Ingress")
    owner = server.store().get(job["id"]).owner
    _kill_replica(replica)
    deadline = time.time() + 120
    while not ((now := _replicas("Ingress")) and replica not in now):  # it died and another one took its place
        assert time.time() < deadline, now
        time.sleep(0.5)
    done = server.wait(job["id"], timeout=150)
    assert done["status"] == "completed", done
    row = server.store().get(job["id"])
    assert row.attempts == 2 and row.owner != owner, (row.attempts, row.owner, owner)  # it was really re-run
    assert decode_mp4_bytes(server.http.get(f"/v1/videos/{job['id']}/content").content).shape == (8, 32, 32, 3)
    assert [j.id for j in server.store().list(limit=100)[0]].count(job["id"]) == 1


@pytest.mark.timeout(300)
def test_restart_keeps_completed_videos_and_resumes_interrupted_jobs(server):
    from ray import serve

    from lumiere.video import decode_mp4_bytes

    done = server.wait(server.http.post("/v1/videos", data={"prompt": "keep me"}).json()["id"])
    assert done["status"] == "completed"
    running = server.http.post("/v1/videos", data={"prompt": "interrupted", "num_inference_steps": "120"}).json()
    deadline = time.time() + 60
    while server.http.get(f"/v1/videos/{running['id']}").json()["status"] != "in_progress":
        assert time.time() < deadline
        time.sleep(0.2)
    serve.delete("lumiere")  # the app goes away mid-job (its replicas are stopped)
    _deploy(server.args)
    ids = {v["id"] for v in server.http.get("/v1/videos", params={"limit": 100}).json()["data"]}
    assert {done["id"], running["id"]} <= ids
    frames = decode_mp4_bytes(server.http.get(f"/v1/videos/{done['id']}/content").content)
    assert frames.shape == (8, 32, 32, 3)
    resumed = server.wait(running["id"], timeout=150)
    assert resumed["status"] == "completed", resumed  # handed back (or swept) and run by the new deployment
    assert server.store().get(running["id"]).attempts == 2


@pytest.mark.timeout(300)
def test_a_job_whose_attempts_are_used_up_fails_cleanly_with_a_reason(server):
    """With max_attempts=1 an interrupted job is not retried: it fails `interrupted` promptly, never stays
    in_progress (so a client's poll() ends)."""
    from ray import serve

    args = dict(server.args, max_attempts=1)
    serve.delete("lumiere")
    _deploy(args)
    hook = _WebhookReceiver()
    try:
        running = server.http.post("/v1/videos", data={"prompt": "interrupted", "num_inference_steps": "120",
                                                       "webhook_url": hook.url}).json()
        deadline = time.time() + 60
        while server.http.get(f"/v1/videos/{running['id']}").json()["status"] != "in_progress":
            assert time.time() < deadline
            time.sleep(0.2)
        (replica,) = _replicas("Ingress")
        _kill_replica(replica)
        failed = server.wait(running["id"], timeout=120)
        assert failed["status"] == "failed" and failed["error"]["code"] == "interrupted", failed
        assert "restarted or crashed" in failed["error"]["message"]
        # the replica whose sweep failed the job sends its webhook (the one that ran it is dead), exactly once
        hook.wait_for(1)
        time.sleep(2 * server.args.get("stale_after_s", 2) + 1)  # a few more sweeps: none may send it again
        ids = [e["data"]["id"] for e in hook.events()]
        assert ids.count(running["id"]) == 1, ids
        (event,) = hook.events()
        assert event["type"] == "video.failed" and event["data"]["error"]["code"] == "interrupted"
    finally:
        hook.close()
    serve.delete("lumiere")
    _deploy(server.args)


def test_cli_serve_bad_input_is_one_line_exit_2(tmp_path):
    proc = run_cli("serve", "--no-auth", timeout=60)
    assert proc.returncode == 2 and "error: no model" in proc.stderr
    proc = run_cli("serve", "--random-init", "tiny", timeout=60, env={k: v for k, v in os.environ.items()
                                                                         if not k.startswith("LUMIERE_API_KEYS")})
    assert proc.returncode == 2 and "LUMIERE_API_KEYS" in proc.stderr and "--no-auth" in proc.stderr
    proc = run_cli("serve", "--checkpoint", str(tmp_path), "--no-auth", timeout=60)
    assert proc.returncode == 2 and "not a checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    # a job store that cannot be used is one line before anything deploys (not a replica crash loop)
    for url, says in (("postgresql://lumiere:pw123@127.0.0.1:1/jobs", "cannot use the job store at"),
                      ("postgresql+psycopg2://lumiere:pw123@127.0.0.1:1/jobs", "driver is not installed")):
        proc = run_cli("serve", "--random-init", "tiny", "--no-auth", "--db-url", url, timeout=60)
        assert proc.returncode == 2 and says in proc.stderr and "pw123" not in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr



def _start_lumiere_serve(port: int, db_url: str, data: str, log) -> subprocess.Popen:
    env = dict(os.environ, LUMIERE_API_KEYS=f"{KEY} acme", RAY_ADDRESS="local",  # a Ray of its own, not the suite's
               PYTHONPATH=os.getcwd())
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--random-init", "tiny", "--set", "stunet.conditional=true",
         "--port", str(port), "--db-url", db_url, "--artifacts", os.path.join(data, "artifacts"),
         "--data-dir", data], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_up(base: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "lumiere serve exited"
        try:
            if httpx.get(base + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet: poll again
        time.sleep(1)
    raise AssertionError("lumiere serve did not come up")


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything in its session (its Ray): what a lost pod or node looks like."""
    import signal

    sid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)
    proc.wait(timeout=30)
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split("\n")
    for line in out:  # Ray daemons that left the process group but stayed in the session
        parts = line.split()
        if len(parts) == 2 and int(parts[1]) == sid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(parts[0]), signal.SIGKILL)


@pytest.mark.timeout(900)
def test_sigkilled_lumiere_serve_restarted_on_the_same_postgres_resumes_its_job(postgres_server, tmp_path):
    """`lumiere serve` on PostgreSQL, SIGKILLed (with its Ray) mid-job and started again on the same database: the
    completed video is still served, and the interrupted job is re-queued by the new server and completes."""
    url = postgres_server.create_database(f"serve_{os.urandom(4).hex()}")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    with open(tmp_path / "serve-1.log", "wb") as log:
        proc = _start_lumiere_serve(port, url, str(tmp_path), log)
        try:
            _wait_up(base, proc)
            done = http.post("/v1/videos", data={"prompt": "kept", "num_inference_steps": "2"}).json()
            deadline = time.time() + 120
            while http.get(f"/v1/videos/{done['id']}").json()["status"] != "completed":
                assert time.time() < deadline
                time.sleep(0.3)
            running = http.post("/v1/videos", data={"prompt": "interrupted", "num_inference_steps": "200"}).json()
            while http.get(f"/v1/videos/{running['id']}").json()["progress"] < 2:
                assert time.time() < deadline
                time.sleep(0.2)
        finally:
            _kill_session(proc)
    assert proc.returncode == -9  # it was really killed, not shut down
    from serve.jobs import JobStore

    assert JobStore(url).get(running["id"]).status == "in_progress"  # left behind by the dead server
    with open(tmp_path / "serve-2.log", "wb") as log:
        proc = _start_lumiere_serve(port, url, str(tmp_path), log)
        try:
            _wait_up(base, proc)
            assert http.get(f"/v1/videos/{done['id']}/content").status_code == 200
            deadline = time.time() + 300
            while (v := http.get(f"/v1/videos/{running['id']}").json())["status"] != "completed":
                assert v["status"] in ("queued", "in_progress") and time.time() < deadline, v
                time.sleep(0.5)
            assert JobStore(url).get(running["id"]).attempts == 2
        finally:
            _kill_session(proc)
