"""The Videos API against a real Serve app on 127.0.0.1 (tiny random-init conditional model, 2 sampling steps):
the openai SDK flows, bad requests, auth, the web page (headless Chromium), concurrent load and restart
durability. One app for the module; the durability test redeploys it last."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
KEY = "test-key-123"


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

    def sdk(self, key: str = KEY):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=60)

    def wait(self, video_id: str, timeout: float = 90) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = self.http.get(f"/v1/videos/{video_id}").json()
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
            "data_dir": data, "api_keys": [KEY],
            "default_steps": 2, "max_pending_jobs": 6, "stale_after_s": 3.0, "poll_after_ms": 100,
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
    assert server.http.delete(f"/v1/videos/{slow['id']}").status_code in (200, 409)
    assert server.wait(slow["id"])["status"] == "completed"


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


@pytest.mark.timeout(60)
def test_page_docs_and_health(server):
    page = httpx.get(server.base + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for needle in ('id="prompt"', 'id="task"', 'id="image"', 'id="mask"', 'id="video"', '"/v1/videos"',
                   "/v1/videos/extensions", "/v1/videos/edits", "/content", "/healthz", "<video"):
        assert needle in page.text, needle
    health = httpx.get(server.base + "/healthz").json()
    assert health["status"] == "ok" and health["sizes"] == ["32x32", "64x64"] and health["seconds"] == ["0.5", "1"]
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
            page.wait_for_function("document.querySelector('#size').options.length > 0")
            page.fill("#prompt", "a yellow square moving down")
            page.fill("#steps", "2")
            page.fill("#apikey", KEY)
            page.click("#submit")
            page.wait_for_function("document.querySelector('#status').textContent.includes('completed')",
                                   timeout=90_000)
            page.wait_for_function("(() => { const v = document.querySelector('#result');"
                                   " return !v.hidden && v.readyState >= 2 && v.currentTime > 0; })()",
                                   timeout=30_000)
            assert page.eval_on_selector("#result", "v => v.videoWidth") == 32
            assert "error" not in page.text_content("#status")
        finally:
            browser.close()


# --- load and durability -------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_concurrent_load_no_5xx(server):
    """16 clients for 20 s against max_pending_jobs=6: every request is accepted (and completes) or refused
    with 429/503; nothing answers 5xx otherwise."""
    results = {"accepted": [], "refused": 0, "other": []}
    lock = threading.Lock()
    stop = time.time() + 20

    def client(i):
        with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            while time.time() < stop:
                r = c.post("/v1/videos", json={"prompt": f"client {i}", "num_inference_steps": 2})
                with lock:
                    if r.status_code == 200:
                        results["accepted"].append(r.json()["id"])
                    elif r.status_code in (429, 503):
                        results["refused"] += 1
                    else:
                        results["other"].append((r.status_code, r.text[:200]))
                time.sleep(0.5 if r.status_code != 200 else 0.1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not results["other"], results["other"][:3]
    assert results["accepted"] and results["refused"] > 0, (len(results["accepted"]), results["refused"])
    statuses = [server.wait(i, timeout=120)["status"] for i in results["accepted"]]
    assert statuses.count("completed") == len(statuses), statuses


@pytest.mark.timeout(240)
def test_restart_keeps_completed_videos_and_fails_interrupted_jobs(server):
    from ray import serve

    from lumiere.video import decode_mp4_bytes

    done = server.wait(server.http.post("/v1/videos", data={"prompt": "keep me"}).json()["id"])
    assert done["status"] == "completed"
    running = server.http.post("/v1/videos", data={"prompt": "interrupted", "num_inference_steps": "250"}).json()
    deadline = time.time() + 60
    while server.http.get(f"/v1/videos/{running['id']}").json()["status"] != "in_progress":
        assert time.time() < deadline
        time.sleep(0.2)
    serve.delete("lumiere")  # the app goes away mid-job (its replicas are killed)
    _deploy(server.args)
    ids = {v["id"] for v in server.http.get("/v1/videos", params={"limit": 100}).json()["data"]}
    assert {done["id"], running["id"]} <= ids
    frames = decode_mp4_bytes(server.http.get(f"/v1/videos/{done['id']}/content").content)
    assert frames.shape == (8, 32, 32, 3)
    failed = server.wait(running["id"], timeout=60)
    assert failed["status"] == "failed" and failed["error"]["code"] == "interrupted", failed
    assert "restarted" in failed["error"]["message"]


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

