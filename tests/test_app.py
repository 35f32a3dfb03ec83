"""`ei2 serve` in a real browser: Playwright driving Debian's Chromium, headless, on loopback.

The app runs as `python -m ei2 serve` in a subprocess with the bundled Shapes model and tiny settings
(a few tuning and DDIM steps, 8 frames of 64x64), so an edit takes seconds on a CPU. Skipped only where
the app extra (gradio, playwright) or a Chromium is not installed; `.ci/run` installs both.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
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
MAX_STEPS, MAX_INFERENCE_STEPS, MAX_PROMPTS, KEEP_RUNS = 300, 12, 3, 4
JOB_TIMEOUT_MS = 150_000
SAMPLES = Path(__file__).resolve().parents[1] / "assets" / "samples"


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
         "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-frames", "8", "--max-steps", str(MAX_STEPS),
         "--max-inference-steps", str(MAX_INFERENCE_STEPS), "--max-prompts", str(MAX_PROMPTS),
         "--keep-runs", str(KEEP_RUNS)],
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
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)  # the window
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
    # the sample fills the prompts and the preview in one answer: wait for it, so that it cannot overwrite
    # prompts typed after this
    page.wait_for_selector(f"#ei2-preview video[src*='{label.replace(' ', '_')}']", timeout=15_000)


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


def _log(server) -> str:
    return (server["root"] / "server.log").read_text()


def _wait_for_log(server, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while text not in _log(server):
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not in the server's log after {timeout} s:\n{_log(server)[-3000:]}")
        time.sleep(0.25)
    return _log(server)


def _run_and_wait(page, server) -> dict:
    """Press Edit, wait for the job's end; the run.json of its run folder (from the "done: runs/..." line)."""
    status = page.locator("#ei2-status")

    def done() -> str | None:
        text = status.inner_text()
        if "Error:" in text:
            pytest.fail(text)
        return text.split("done:")[1].split()[0] if "done:" in text else None

    before = done()
    page.locator("#ei2-run").click()
    deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
    while done() in (None, before):  # the run folder of this job, not the one the last job left on the page
        assert time.monotonic() < deadline, status.inner_text()
        time.sleep(0.2)
    return json.loads((server["out"] / done() / "run.json").read_text())


def _open_accordion(page, label: str) -> None:
    page.get_by_role("button", name=label).first.click()


def _set_number(page, selector: str, value: str) -> None:
    box = page.locator(f"{selector} input[type=number]").first
    box.fill(value)
    box.press("Tab")


def _in_view(page, selector: str) -> dict:
    """Assert that the element is wholly inside the window as it is now (no scrolling); its box."""
    box = page.locator(selector).first.evaluate(
        "(e) => { const r = e.getBoundingClientRect(); return {top: r.top, bottom: r.bottom, left: r.left, "
        "right: r.right, height: window.innerHeight, width: window.innerWidth}; }")
    assert box["bottom"] > box["top"], (selector, box)
    assert 0 <= box["top"] and box["bottom"] <= box["height"] and 0 <= box["left"] and box["right"] <= box["width"], \
        (selector, "not in the window", box)
    return box


def _served_url(page, server, selector: str) -> str:
    src = page.locator(selector).first.get_attribute("src")
    return src if src.startswith("http") else server["url"].rstrip("/") + "/" + src.lstrip("/")


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
    edit = page.wait_for_selector("#ei2-edits img[src$='.gif']")  # the edit plays at once, as a gif
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=edit)
    assert edit.evaluate("(img) => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    assert edit.bounding_box()["width"] >= 4 * 64  # shown large enough to see

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
    # large enough to see: the 64x64 frames as 256x256 tiles (nearest), under a caption block shorter than them
    grid = read_video(folder / "grid.mp4").frames
    assert grid.shape[2] == 2 * 256 + 4 and 256 < grid.shape[1] <= 256 + 256 // 3, grid.shape
    shown = page.locator("#ei2-grid video").bounding_box()
    assert shown["width"] >= 500, shown  # and shown at (at least) that size on the page
    if os.environ.get("EI2_APP_SCREENSHOT"):
        from PIL import Image

        page.screenshot(path=os.environ["EI2_APP_SCREENSHOT"], full_page=True)
        Image.fromarray(grid[len(grid) // 2]).save(Path(os.environ["EI2_APP_SCREENSHOT"]).with_suffix(".grid.png"))
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
        'Error: no Target prompts given; type one or more, e.g. "a panda is skiing" in Target prompts', timeout=30_000)
    assert "--" not in page.locator("#ei2-status .ei2-error").inner_text()  # the page's words, not the CLI's
    _in_view(page, "#ei2-status .ei2-error")  # where the person who pressed Edit looks
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
    inside = out / ".gradio" / "files" / "samples" / "blue_square_down.mp4"
    assert _get(server["url"] + f"gradio_api/file={inside}") == 200  # the app's own files are served
    outside = [Path("/etc/passwd"), Path(__file__).resolve(), server["root"] / "server.log"]
    for path in outside:
        for route in ("gradio_api/file=", "file=", "gradio_api/file/"):
            assert _get(server["url"] + f"{route}{path}") in (403, 404), (route, path)
        assert _get(server["url"] + f"gradio_api/file={out}/../{path.name}") in (403, 404)
    assert _get(server["url"] + "gradio_api/file=../../../../../../etc/passwd") in (403, 404)


# ---------------------------------------------------------------------------------------------- issue 17
def test_a_p2p_job_does_not_inject_unless_the_sliders_are_moved(server, browser):
    """Defect 1: the app marked every form value as given, so the model's injection (0.5/0.5, for plain edits
    only) was on in every P2P job of the app, which `ei2 edit --p2p` keeps off."""
    page = _open(browser, server)
    _pick_sample(page, "red circle right")
    _tiny(page, "a blue square moving right on a gray background")
    _open_accordion(page, "Structure")
    features = page.locator("#ei2-inject-features input[type=number]").first
    assert float(features.input_value()) == 0.5  # a plain edit: the model's default
    _open_accordion(page, "Prompt-to-Prompt")
    page.locator("#ei2-p2p input").click()
    page.get_by_role("option", name="replace", exact=True).click()
    sync_api.expect(features).to_have_value("0")  # with P2P the model's injection is off, and the page says so
    untouched = _run_and_wait(page, server)
    assert untouched["p2p"]["mode"] == "replace"
    assert "injection" not in untouched, untouched.get("injection")
    assert untouched["settings"]["inject_features"] == 0 and untouched["settings"]["inject_attention"] == 0
    assert not any(a.startswith("--inject") for a in untouched["argv"]), untouched["argv"]

    _set_number(page, "#ei2-inject-features", "0.5")  # moved: injection is asked for, as --inject-features 0.5
    moved = _run_and_wait(page, server)
    assert moved["p2p"]["mode"] == "replace" and moved["injection"]["features"] == 0.5, moved.get("injection")
    assert moved["settings"]["inject_attention"] == 0
    assert moved["argv"][moved["argv"].index("--inject-features") + 1] == "0.5"
    page.close()


def test_caps_and_an_emptied_number_box_give_the_one_line_error(server, browser):
    """Defect 5: tuning steps, inference steps and target prompts had no cap; an emptied box raised a TypeError."""
    page = _open(browser, server)
    _pick_sample(page, "red circle right")
    cases = [
        ("#ei2-steps", str(MAX_STEPS + 1), f"Error: Tuning steps {MAX_STEPS + 1} is over this app's limit of "
                                           f"{MAX_STEPS} (ei2 serve --max-steps)"),
        ("#ei2-inference-steps", str(MAX_INFERENCE_STEPS + 1),
         f"Error: Inference steps {MAX_INFERENCE_STEPS + 1} is over this app's limit of {MAX_INFERENCE_STEPS} "
         "(ei2 serve --max-inference-steps)"),
        ("#ei2-steps", "", "Error: Tuning steps is empty; type a number"),
        ("#ei2-guidance", "", "Error: Guidance scale is empty; type a number"),
    ]
    for selector, value, message in cases:
        _tiny(page, "a blue square moving right on a gray background")
        page.locator(f"{selector} input").fill(value)
        page.locator("#ei2-run").click()
        sync_api.expect(page.locator("#ei2-status")).to_contain_text(message, timeout=30_000)
        assert page.locator("#ei2-status .ei2-error").inner_text().count("\n") == 0
        page.locator("#ei2-guidance input").fill("7.5")
    _tiny(page, "\n".join(f"a {c} square moving right on a gray background" for c in
                          ("blue", "green", "yellow", "purple")[: MAX_PROMPTS + 1]))
    page.locator("#ei2-run").click()
    sync_api.expect(page.locator("#ei2-status")).to_contain_text(
        f"Error: {MAX_PROMPTS + 1} target prompts are over this app's limit of {MAX_PROMPTS} per job "
        "(ei2 serve --max-prompts)", timeout=30_000)
    assert "TypeError" not in _log(server) and server["process"].poll() is None
    page.close()


def test_a_job_whose_page_is_closed_is_cancelled_at_its_next_step(server, browser):
    """Defect 5: a closed page's job ran to the end. Now it stops at its next step and leaves no run folder."""
    before = set((server["out"] / "runs").iterdir())
    page = _open(browser, server)
    _pick_sample(page, "yellow diamond bouncing")  # no other test tunes it: no adapter to reuse
    _tiny(page, "a yellow circle bouncing on a white background")
    page.locator("#ei2-steps input").fill(str(MAX_STEPS))
    page.locator("#ei2-run").click()
    sync_api.expect(page.locator("#ei2-status")).to_contain_text("tuning", timeout=60_000)
    deadline = time.monotonic() + 60
    while not re.search(r"tuning\s+\S*\s+[1-9]\d*/\d+", page.locator("#ei2-status").inner_text()):
        assert time.monotonic() < deadline, page.locator("#ei2-status").inner_text()
        time.sleep(0.1)
    # the stage card in the grid's place (issue 29: the result area was an empty outline): the stage, its step of
    # the total, a spinner, a bar and the time left in the stage
    card = page.locator("#ei2-stage")
    sync_api.expect(card).to_contain_text(
        re.compile(rf"tuning: step [1-9]\d* of {MAX_STEPS} · \d+:\d\d so far · about \d+:\d\d left in this stage"),
        timeout=30_000)
    assert card.locator(".ei2-spinner").is_visible() and card.locator(".ei2-meter div").is_visible()
    assert not page.locator("#ei2-grid").is_visible()  # no empty outline beside it
    _in_view(page, "#ei2-stage")
    page.close()
    log = _wait_for_log(server, "cancelled a job whose page was closed, at tuning ")
    step = int(log.split("cancelled a job whose page was closed, at tuning ")[1].split("/")[0])
    assert step < MAX_STEPS, log
    assert not set((server["out"] / "runs").iterdir()) - before  # no run folder, no .partial staging folder left
    # the lock is free again: the next job starts at once
    page = _open(browser, server)
    _tiny(page, "")
    page.locator("#ei2-run").click()
    sync_api.expect(page.locator("#ei2-status")).to_contain_text("no Target prompts given", timeout=30_000)
    page.close()


def test_only_a_finished_jobs_files_are_served(server, browser, tmp_path):
    """Defect 4: everything under --out was served, adapters.json (every video's hash and run path) and every
    upload included. Now a job's files are served under a random name; runs, uploads and the index never."""
    upload = tmp_path / "my-video.mp4"
    shutil.copyfile(SAMPLES / "purple_circle_diagonal.mp4", upload)
    page = _open(browser, server)
    page.locator("#ei2-upload input[type=file]").set_input_files(str(upload))
    sync_api.expect(page.locator("#ei2-source input")).to_have_value("upload a video", timeout=15_000)
    page.locator("#ei2-source-prompt textarea").fill("a purple circle moving diagonally on a black background")
    _tiny(page, "a green circle moving diagonally on a black background")
    record = _run_and_wait(page, server)
    page.wait_for_selector("#ei2-grid video")
    grid_url = _served_url(page, server, "#ei2-grid video")
    assert _get(grid_url) == 200  # the page that ran the job gets its grid
    assert "/.gradio/files/jobs/" in grid_url and len(grid_url.split("/jobs/")[1].split("/")[0]) == 32
    out = server["out"]
    kept_upload = Path(record["video"]["path"])
    assert kept_upload.parent == out / "uploads" and kept_upload.is_file()
    assert (out / "adapters.json").is_file()
    run = Path(record["run_folder"])
    for path in [out / "adapters.json", kept_upload, run / "grid.mp4", run / "run.json",
                 run / "adapter" / "adapter.safetensors", out / "runs"]:
        for route in ("gradio_api/file=", "file=", "gradio_api/file/"):
            assert _get(server["url"] + f"{route}{path}") in (403, 404), (route, path)
    # the served folder holds the job's outputs only, under a 128-bit token
    served = Path(urllib.parse.unquote(grid_url.split("file=")[1])).parent
    assert served.name == run.name and sorted(p.name for p in served.iterdir()) == [
        "adapter.zip", "edits", "grid.gif", "grid.mp4", "run.json"]
    page.close()


def test_keep_runs_prunes_the_oldest_and_says_so_in_the_log(server, browser):
    """Defect 5: runs, uploads and the inversion cache grew without end; `--keep-runs N` keeps the newest N."""
    out, cache = server["out"], server["root"] / "cache" / "inversions"
    start = len(_log(server))
    page = _open(browser, server)
    _pick_sample(page, "green triangle circling")
    for i in range(KEEP_RUNS + 1):  # enough jobs to go past the cap, whichever tests ran before
        _tiny(page, f"a green square circling on a black background, take {i + 1}")
        _run_and_wait(page, server)
        if "ei2 serve: pruned " in _log(server)[start:]:
            break
    page.close()
    log = _log(server)
    assert f"(--keep-runs {KEEP_RUNS}: the newest {KEEP_RUNS} of each are kept)" in log, log[-2000:]
    assert len(_run_folders(server)) == KEEP_RUNS
    assert not [p for p in (out / "runs").iterdir() if p.name.endswith(".partial")]
    assert len(list((out / ".gradio" / "files" / "jobs").iterdir())) == KEEP_RUNS  # served copies go with them
    assert len(list((out / "uploads").iterdir())) <= KEEP_RUNS
    assert len(list(cache.glob("*.safetensors"))) <= KEEP_RUNS
    index = json.loads((out / "adapters.json").read_text())
    assert index and all(Path(p).is_dir() for p in index.values())


# ---------------------------------------------------------------------------------------------- issue 29
def test_the_status_stays_in_view_and_the_results_show_whole_captions_and_no_remove_buttons(server, browser):
    """Issue 29, 1-4: after Edit (the button at the foot of the long form, in a 1280x900 window) the status was
    scrolled out of view; the grid's download icon hid its last caption, the gallery cut its captions short, and
    every download had a remove button."""
    page = _open(browser, server)
    _pick_sample(page, "red circle right")
    targets = ["a yellow triangle moving right on a white background",
               "a green square moving right on a black background"]
    _tiny(page, "\n".join(targets))
    form = page.locator("#ei2-form").bounding_box()
    assert form["height"] > 900  # the form is taller than the window: the Edit button is below the fold
    page.locator("#ei2-run").click()  # scrolls to the button, as a person does
    assert page.evaluate("window.scrollY") > 0
    sync_api.expect(page.locator("#ei2-status .ei2-now")).to_contain_text(" so far", timeout=30_000)
    _in_view(page, "#ei2-status")  # the stage, its bar and its time, beside the button that was pressed
    _in_view(page, "#ei2-run")
    status = page.locator("#ei2-status")
    deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
    while "done:" not in status.inner_text():
        assert "Error:" not in status.inner_text() and time.monotonic() < deadline, status.inner_text()
        time.sleep(0.2)
    assert "finished in " in page.locator("#ei2-status .ei2-now").inner_text()
    _in_view(page, "#ei2-status .ei2-now")
    grid = page.wait_for_selector("#ei2-grid video")
    _in_view(page, "#ei2-grid video")  # the result is in view too, without scrolling back up

    # nothing lies over the grid's captions, burnt into the video's top rows (a block under a third of the tile's
    # height, so within the video's top quarter): no button there (the player's own controls are at its foot)
    video = grid.bounding_box()
    captions_bottom = video["y"] + video["height"] / 4
    for button in page.locator("#ei2-grid button").all():
        b = button.bounding_box()
        assert b is None or not button.is_visible() or not (
            b["x"] < video["x"] + video["width"] and b["x"] + b["width"] > video["x"]
            and b["y"] < captions_bottom and b["y"] + b["height"] > video["y"]), b
    # the gallery's captions are whole: not cut (no ellipsis, no hidden overflow) and inside their tile
    page.wait_for_selector("#ei2-edits img[src$='.gif']")
    captions = page.evaluate("""() => [...document.querySelectorAll('#ei2-edits .caption-label')].map((c) => {
        const tile = c.parentElement.getBoundingClientRect(), r = c.getBoundingClientRect();
        return {text: c.innerText, cut: c.scrollWidth > c.clientWidth + 1 || c.scrollHeight > c.clientHeight + 1,
                inside: r.left >= tile.left - 1 && r.right <= tile.right + 1 && r.top >= tile.top - 1
                        && r.bottom <= tile.bottom + 1};
    })""")
    assert sorted(c["text"] for c in captions) == sorted(targets), captions
    assert all(not c["cut"] and c["inside"] for c in captions), captions
    # downloads: every file, and no remove button on any row
    rows = page.locator("#ei2-downloads tr")
    assert rows.count() >= 8, rows.count()  # grid mp4/gif, 2 edits x mp4/gif, run.json, adapter.zip
    removes = page.locator("#ei2-downloads button[aria-label='Remove this file'], #ei2-downloads .label-clear-button")
    assert [b for b in removes.all() if b.is_visible()] == []
    page.close()


def test_errors_name_the_field_as_the_page_labels_it(server, browser):
    """Issue 29, 5: the page said `ei2: error: no --target-prompt given; pass one or more, e.g. --target-prompt
    "a panda is skiing"`. The job layer's message (CLI words) is rendered with the page's labels."""
    page = _open(browser, server)
    _pick_sample(page, "red circle right")
    cases = [
        (lambda: page.locator("#ei2-targets textarea").fill(""),
         'Error: no Target prompts given; type one or more, e.g. "a panda is skiing" in Target prompts'),
        (lambda: page.locator("#ei2-source-prompt textarea").fill(""),
         'Error: Source prompt is empty; describe the source video, e.g. "a man is skiing" in Source prompt'),
        (lambda: page.locator("#ei2-inference-steps input").fill("0"),
         "Error: Inference steps must be between 1 and 1000 (the training timesteps of Stable Diffusion), got 0"),
    ]
    for change, message in cases:
        _tiny(page, "a blue square moving right on a gray background")
        page.locator("#ei2-source-prompt textarea").fill("a red circle moving right on a gray background")
        change()
        page.locator("#ei2-run").click()
        sync_api.expect(page.locator("#ei2-status .ei2-error")).to_have_text(message, timeout=30_000)
        _in_view(page, "#ei2-status .ei2-error")
    page.close()


def test_prompt_to_prompt_on_the_shapes_model_shows_its_measured_note(server, browser):
    """Issue 29, 6: P2P replace collapsed frames on the bundled sample without a word on the page; the Shapes
    benchmark measured it (benchmarks/shapes/RESULTS.md: 19 of 288 frames, 46 with a local blend)."""
    page = _open(browser, server)
    _open_accordion(page, "Prompt-to-Prompt")
    note = page.locator("#ei2-p2p-note")
    assert not note.is_visible()  # not while Prompt-to-Prompt is off
    for mode in ("replace", "refine"):
        page.locator("#ei2-p2p input").click()
        page.get_by_role("option", name=mode, exact=True).click()
        sync_api.expect(note).to_be_visible(timeout=10_000)
        text = note.inner_text()
        assert "19 of 288" in text and "46 of 288" in text and "3 of 288" in text, text
        assert "benchmarks/shapes/RESULTS.md" in text
        control, shown = page.locator("#ei2-p2p").bounding_box(), note.bounding_box()
        assert 0 <= shown["y"] - (control["y"] + control["height"]) < 40, (control, shown)  # right under it
    page.locator("#ei2-p2p input").click()
    page.get_by_role("option", name="off", exact=True).click()
    sync_api.expect(note).to_be_hidden(timeout=10_000)
    page.close()


def test_every_control_says_what_it_does_in_a_line(server, browser):
    """Issue 29: every control's help text says what it does in a line."""
    page = _open(browser, server)
    for label in ("Prompt-to-Prompt", "Structure ("):
        _open_accordion(page, label)
    ids = ["source", "source-prompt", "targets", "recipe", "frames", "steps", "inference-steps", "guidance", "seed",
           "strength", "guidance-rescale", "negative", "reuse", "p2p", "cross-replace", "self-replace", "reweight",
           "blend-words", "blend-threshold", "inject-features", "inject-attention", "inject-block", "control",
           "control-scale"]
    for name in ids:
        info = page.locator(f"#ei2-{name} .info-text").first  # gradio's `info=`, under the label
        sync_api.expect(info).to_be_visible()
        text = info.inner_text().strip()
        assert text and "\n" not in text and len(text) <= 100, (name, text)
    page.close()


def test_page_words_renders_the_cli_messages_with_the_forms_labels():
    pytest.importorskip("gradio", reason='the app extra is not installed: pip install -e ".[app]"')
    from ei2.app.server import FIELDS, page_words

    assert page_words('no --target-prompt given; pass one or more, e.g. --target-prompt "a panda is skiing"') == \
        'no Target prompts given; type one or more, e.g. "a panda is skiing" in Target prompts'
    assert page_words("--strength 0.04 of 3 inference steps runs no step; raise it to at least 0.333 or raise "
                      "--inference-steps") == ("Edit strength 0.04 of 3 inference steps runs no step; raise it to "
                                               "at least 0.333 or raise Inference steps")
    # flags the form has no control for stay: they are the server's (ei2 serve --max-steps)
    assert page_words("--steps 301 is over this app's limit of 300 (ei2 serve --max-steps)") == \
        "Tuning steps 301 is over this app's limit of 300 (ei2 serve --max-steps)"
    assert all(flag.startswith("--") and label[0].isupper() for flag, label in FIELDS.items())


def test_the_status_says_the_stage_its_time_and_the_time_left_in_it():
    pytest.importorskip("gradio", reason='the app extra is not installed: pip install -e ".[app]"')
    from ei2.app.server import _Progress

    now = [100.0]
    progress = _Progress(clock=lambda: now[0])
    progress("load", 0, 1)
    assert progress.now_line() == "loading the model · 0:00 so far"
    now[0] = 104.0
    progress("load", 1, 1)
    progress("tuning", 0, 100)
    now[0] = 110.0
    progress("tuning", 1, 100)  # the first step (with the stage's set-up) is not counted in the pace
    now[0] = 130.0
    progress("tuning", 11, 100)  # 2 s a step
    assert progress.now_line() == "tuning: step 11 of 100 · 0:30 so far · about 2:58 left in this stage"
    now[0] = 131.0
    assert "about 2:57 left" in progress.now_line()
    assert "0:26" in progress.html()  # the stage's own time so far, on its bar
    progress.done()
    assert progress.now_line() == "finished in 0:31"


# ---------------------------------------------------------------------------------------------- without a browser
@pytest.fixture
def app(tmp_path, monkeypatch):
    pytest.importorskip("gradio", reason='the app extra is not installed: pip install -e ".[app]"')
    monkeypatch.setenv("EI2_CACHE_DIR", str(tmp_path / "cache"))
    from ei2.app.server import App

    def make(**kw):
        kw = {"model": None, "out": tmp_path / "out", "max_upload_mb": 1, "max_frames": 8, "device": "cpu", **kw}
        return App(**kw)

    return make


def _age(path: Path, seconds_ago: float) -> None:
    stamp = time.time() - seconds_ago
    os.utime(path, (stamp, stamp))


def test_keep_runs_at_start_removes_the_oldest_runs_uploads_and_cache_entries(app, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache" / "inversions"
    runs, uploads, jobs = out / "runs", out / "uploads", out / ".gradio" / "files" / "jobs"
    index = {}
    for i in range(5):
        run = runs / f"2024010{i}-000000-edit-{i}"
        (run / "adapter").mkdir(parents=True)
        (run / "run.json").write_text("{}")
        _age(run / "run.json", 1000 - i)
        (jobs / f"{i:032x}" / run.name).mkdir(parents=True)
        index[f"key{i}"] = str(run / "adapter")
        uploads.mkdir(exist_ok=True)
        (uploads / f"{i:016x}.mp4").write_bytes(b"v")
        _age(uploads / f"{i:016x}.mp4", 1000 - i)
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"entry{i}.safetensors").write_bytes(b"c")
        _age(cache / f"entry{i}.safetensors", 1000 - i)
    (runs / "20240109-000000-crashed.partial").mkdir()
    from ei2.files import FolderLock

    live = FolderLock(runs / "20240110-000000-live.partial").acquire()  # another ei2 is writing it now
    (out / "adapters.json").write_text(json.dumps(index))
    try:
        app(keep_runs=2)
        assert (runs / "20240110-000000-live.partial").is_dir()  # a live run's folder is never pruned
    finally:
        live.release()
    shutil.rmtree(runs / "20240110-000000-live.partial")
    err = capsys.readouterr().err
    assert ("ei2 serve: pruned 3 runs, 3 uploads, 3 inversion-cache entries, 1 interrupted run "
            "(--keep-runs 2: the newest 2 of each are kept)") in err, err
    assert sorted(p.name for p in runs.iterdir()) == ["20240103-000000-edit-3", "20240104-000000-edit-4"]
    assert sorted(p.name for p in uploads.iterdir()) == [f"{3:016x}.mp4", f"{4:016x}.mp4"]
    assert sorted(p.name for p in cache.iterdir()) == ["entry3.safetensors", "entry4.safetensors"]
    assert sorted(p.name for p in jobs.iterdir()) == [f"{3:032x}", f"{4:032x}"]
    assert sorted(json.loads((out / "adapters.json").read_text())) == ["key3", "key4"]
    capsys.readouterr()
    app(keep_runs=2)  # nothing more to prune: nothing said
    assert "pruned" not in capsys.readouterr().err


def test_an_upload_is_copied_whole_or_not_at_all(app, tmp_path, monkeypatch):
    """Defect 6: the upload was copied in place, so a copy cut off by a crash was reused for that video forever."""
    import shutil as shutil_module

    application = app()
    video = tmp_path / "clip.mp4"
    shutil.copyfile(SAMPLES / "red_circle_right.mp4", video)
    real_copy = shutil_module.copyfile

    def cut_off(source, target, *a, **kw):
        Path(target).write_bytes(Path(source).read_bytes()[:100])
        raise OSError("No space left on device")

    monkeypatch.setattr(shutil_module, "copyfile", cut_off)
    with pytest.raises(OSError):
        application._video("upload", str(video))
    assert list((tmp_path / "out" / "uploads").iterdir()) == []  # nothing half-written is left to be reused
    monkeypatch.setattr(shutil_module, "copyfile", real_copy)
    kept = Path(application._video("upload", str(video)))
    assert kept.read_bytes() == video.read_bytes()
    kept.write_bytes(video.read_bytes()[:100])  # a cut-off copy left by an older version is replaced
    assert Path(application._video("upload", str(video))).read_bytes() == video.read_bytes()


def test_the_form_passes_as_given_only_what_differs_from_the_model_defaults(app):
    """Defect 1, the rule in one place: `config.defaults_for` + `apply_model_defaults`, for the CLI and the app."""
    from ei2 import config as cfg

    application = app()
    form = dict(choice="red_circle_right", upload=None, source_prompt="a red circle moving right on a gray background",
                targets="a blue circle moving right on a gray background", recipe="ei2", steps=100,
                inference_steps=25, guidance=7.5, seed=0, frames=8, negative_prompt="", p2p="replace",
                cross_replace="", self_replace="", reweight="", blend_words="", blend_threshold="",
                inject_features=0.0, inject_attention=0.0, inject_block=1)
    s = application.settings(**form)  # P2P with the sliders as the page shows them for P2P
    assert (s.inject_features, s.inject_attention) == (0.0, 0.0)
    assert not s.explicit & {"steps", "inference_steps", "guidance_scale", "inject_features", "inject_attention"}
    assert "--inject-features" not in application._argv(s) and "--steps" not in application._argv(s)
    assert (application.settings(**{**form, "inject_attention": 0.25}).inject_attention) == 0.25
    plain = application.settings(**{**form, "p2p": "off", "inject_features": 0.5, "inject_attention": 0.5})
    assert (plain.inject_features, plain.inject_attention) == (0.5, 0.5)  # the model's, for a plain edit
    # the same settings as `ei2 edit` without those flags
    cli = cfg.Settings(p2p="replace")
    cli.explicit = frozenset({"p2p"})
    cfg.apply_model_defaults(cli, application.model_dir, cfg.EDIT)
    assert (cli.inject_features, cli.inject_attention, cli.steps) == (s.inject_features, s.inject_attention, s.steps)


def test_a_job_shows_each_stage_and_step_on_gradios_progress_bar(app, monkeypatch):
    """`App.run` passes the job's progress events (stage, step, total) to gradio's `gr.Progress`: a stage that counts
    steps as ((step, total), stage), loading and writing as a fraction with their names."""
    import threading

    from ei2 import runs
    from ei2.errors import EI2Error

    application = app()
    shown, changed = [], threading.Condition()
    events = [("load", 1, 1), ("tuning", 0, 4), ("tuning", 2, 4), ("tuning", 4, 4), ("inversion", 3, 3),
              ("edit 1/2", 1, 3), ("edit 2/2", 3, 3), ("write", 0, 1), ("write", 1, 1)]
    expected = [(1.0, "loading the model"), ((0, 4), "tuning"), ((2, 4), "tuning"), ((4, 4), "tuning"),
                ((3, 3), "inversion"), ((1, 3), "edit 1/2"), ((3, 3), "edit 2/2"), (0.0, "writing videos"),
                (1.0, "writing videos")]

    def page_progress(*args, **kwargs):
        with changed:
            shown.append(args)
            changed.notify_all()

    def job(s, argv, progress, say, root):  # stands for runs.edit: each event waits until the page showed it
        for event, want in zip(events, expected):
            progress(*event)
            with changed:
                assert changed.wait_for(lambda: shown and shown[-1] == want, timeout=30), (event, shown)
        raise EI2Error("stopped by the test")

    monkeypatch.setattr(runs, "edit", job)
    form = dict(choice="red_circle_right", upload=None, source_prompt="a red circle moving right on a gray background",
                targets="a blue circle moving right on a gray background\na red square moving right on a gray "
                        "background", recipe="ei2", steps=4, inference_steps=3, guidance=7.5, seed=0, frames=8,
                negative_prompt="", p2p="off", cross_replace="", self_replace="", reweight="", blend_words="",
                blend_threshold="", inject_features=0.5, inject_attention=0.5, inject_block=1, strength=1.0,
                guidance_rescale=0.0, reuse=False)
    updates = list(application.run(**form, page_progress=page_progress))
    assert "Error: stopped by the test" in updates[-1][0]
    first = shown.index(expected[0])
    assert shown[first:] == expected  # every event once, in order
    # before them, at most the page's "waiting" and the job's own "load 0/1"
    assert set(shown[:first]) <= {(0.0, "waiting for the previous job"), (0.0, "loading the model")}, shown
