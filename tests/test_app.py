"""`ei2 serve` in a real browser: Playwright driving Debian's Chromium, headless, on loopback.

The app runs as `python -m ei2 serve` in a subprocess with the bundled Shapes model and tiny settings
(a few tuning and DDIM steps, 8 frames of 64x64), so an edit takes seconds on a CPU. Skipped only where
the app extra (gradio, playwright) or a Chromium is not installed; `.ci/run` installs both.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

try:
    from playwright import sync_api
except ImportError:
    sync_api = None
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
MAX_UPLOAD_MB = 1
JOB_TIMEOUT_MS = 150_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _needs_the_app() -> None:
    pytest.importorskip("gradio", reason='the app extra is not installed: pip install -e ".[app]"')
    if sync_api is None:
        pytest.skip('playwright is not installed: pip install -e ".[app]"')
    if CHROMIUM is None:
        pytest.skip("no Chromium on PATH (apt-get install -y chromium)")


def test_serve_without_gradio_is_a_one_line_error(monkeypatch, capsys):
    import importlib.util

    from ei2.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a))
    assert main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['ei2: error: `ei2 serve` needs gradio, which is not installed; install the app extra: '
                   'pip install -e ".[app]"']


def test_the_library_and_the_cli_do_not_import_gradio():
    code = "import sys, ei2.cli, ei2.runs, ei2.app; ei2.cli.build_parser(); print('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _needs_the_app()
    root = tmp_path_factory.mktemp("app")
    out, port = root / "out", _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", EI2_CACHE_DIR=str(root / "cache"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "ei2", "serve", "--port", str(port), "--out", str(out), "--device", "cpu",
         "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-frames", "8"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            pytest.fail(f"ei2 serve exited with {process.returncode}:\n{(root / 'server.log').read_text()}")
        try:
            if _get(url) == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"ei2 serve did not answer in 90 s:\n{(root / 'server.log').read_text()}")
        time.sleep(0.5)
    yield {"url": url, "out": out, "root": root, "process": process}
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    _needs_the_app()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _open(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.goto(server["url"])
    page.wait_for_selector("#ei2-run")
    return page


def _tiny(page, targets: str | None = None) -> None:
    page.locator("#ei2-steps input").fill("2")
    page.locator("#ei2-inference-steps input").fill("3")
    if targets is not None:
        page.locator("#ei2-targets textarea").fill(targets)


def _pick_sample(page, label: str) -> None:
    page.locator("#ei2-source input").click()
    page.get_by_role("option", name=label, exact=True).click()


def _duration(page, selector: str) -> float:
    return page.evaluate(
        """(selector) => new Promise((resolve) => {
            const v = document.querySelector(selector);
            if (v.readyState >= 1) resolve(v.duration);
            else v.addEventListener('loadedmetadata', () => resolve(v.duration));
        })""",
        selector,
    )


def _run_folders(server) -> list[Path]:
    return sorted(p for p in (server["out"] / "runs").iterdir() if (p / "run.json").is_file())


def test_edit_of_the_shapes_sample_plays_and_downloads_its_mp4(server, browser, tmp_path):
    from ei2.video import read_video

    page = _open(browser, server)
    _pick_sample(page, "red circle right")
    sync_api.expect(page.locator("#ei2-source-prompt textarea")).to_have_value(
        "a red circle moving right on a gray background")  # the sample's caption
    _tiny(page, "a blue square moving right on a gray background")
    page.locator("#ei2-run").click()
    sync_api.expect(page.locator("#ei2-status")).to_contain_text("tuning", timeout=JOB_TIMEOUT_MS)
    page.wait_for_selector("#ei2-grid video", timeout=JOB_TIMEOUT_MS)
    status = page.locator("#ei2-status").inner_text()
    assert "inversion" in status and "edit 1/1" in status and "done:" in status, status
    assert _duration(page, "#ei2-grid video") > 0
    page.wait_for_selector("#ei2-edits video")
    assert _duration(page, "#ei2-edits video") > 0

    link = page.locator('#ei2-downloads a[download^="01-a-blue-square"][download$=".mp4"]')
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "edit.mp4"
    download.value.save_as(saved)
    assert saved.read_bytes()[4:8] == b"ftyp"
    assert read_video(saved, 8, 1, 0, (64, 64)).num_frames == 8

    (folder,) = _run_folders(server)  # an ordinary run folder, as `ei2 edit` writes it
    record = json.loads((folder / "run.json").read_text())
    assert record["command"] == "edit" and record["settings"]["steps"] == 2
    assert record["outputs"]["edits"][0]["prompt"] == "a blue square moving right on a gray background"
    assert (folder / "adapter").is_dir() and (folder / "grid.mp4").is_file()
    if os.environ.get("EI2_APP_SCREENSHOT"):
        page.screenshot(path=os.environ["EI2_APP_SCREENSHOT"], full_page=True)
    page.close()


def test_two_pages_submitting_at_once_both_finish_one_after_the_other(server, browser):
    before = set(_run_folders(server))
    pages = [_open(browser, server) for _ in range(2)]
    for page, target in zip(pages, ("a red circle moving down on a black background",
                                    "a green square moving down on a black background")):
        _pick_sample(page, "blue square down")  # a sample no other test tunes, so no adapter exists yet
        _tiny(page, target)
    for page in pages:
        page.locator("#ei2-run").click()
    for page in pages:
        page.wait_for_selector("#ei2-grid video", timeout=JOB_TIMEOUT_MS)
        assert _duration(page, "#ei2-grid video") > 0
    statuses = [page.locator("#ei2-status").inner_text() for page in pages]
    assert all("done:" in s for s in statuses), statuses
    # one job at a time: the second starts after the first has written its adapter, and reuses it
    assert sum("reusing the adapter" in s for s in statuses) == 1, statuses
    new = [json.loads((p / "run.json").read_text()) for p in set(_run_folders(server)) - before]
    assert sorted(r["outputs"]["edits"][0]["prompt"] for r in new) == sorted(
        ["a red circle moving down on a black background", "a green square moving down on a black background"])
    assert sorted(r["adapter"]["reused"] for r in new) == [False, True]
    for page in pages:
        page.close()


def test_a_failing_job_shows_the_cli_error_and_the_app_stays_up(server, browser):
    page = _open(browser, server)
    _tiny(page, "")
    page.locator("#ei2-run").click()
    sync_api.expect(page.locator("#ei2-status")).to_contain_text(
        "ei2: error: no --target-prompt given", timeout=30_000)
    assert _get(server["url"]) == 200 and server["process"].poll() is None
    page.close()


def test_oversized_uploads_and_files_outside_the_output_folder_are_refused(server, browser, tmp_path):
    big = tmp_path / "big.mp4"
    big.write_bytes(b"\0" * (MAX_UPLOAD_MB * 2**20 + 4096))
    page = _open(browser, server)
    page.locator("#ei2-upload input[type=file]").set_input_files(str(big))
    sync_api.expect(page.get_by_text("exceed", exact=False).first).to_be_visible(timeout=15_000)
    page.close()

    # the server refuses it too, whatever the page does
    boundary = "ei2boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.mp4\"\r\n"
            "Content-Type: video/mp4\r\n\r\n").encode() + big.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(server["url"] + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            code = response.status
    except urllib.error.HTTPError as e:
        code = e.code
    assert code == 413

    out = server["out"]
    inside = out / "samples" / "blue_square_down.mp4"
    assert _get(server["url"] + f"gradio_api/file={inside}") == 200  # the app's own files are served
    outside = [Path("/etc/passwd"), Path(__file__).resolve(), server["root"] / "server.log"]
    for path in outside:
        for route in ("gradio_api/file=", "file=", "gradio_api/file/"):
            assert _get(server["url"] + f"{route}{path}") in (403, 404), (route, path)
        assert _get(server["url"] + f"gradio_api/file={out}/../{path.name}") in (403, 404)
    assert _get(server["url"] + "gradio_api/file=../../../../../../etc/passwd") in (403, 404)
