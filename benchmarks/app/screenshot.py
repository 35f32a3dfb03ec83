"""Screenshots of `ei2 serve` after a finished job, as a person sees it (headless Chromium through Playwright).

    python benchmarks/app/screenshot.py --out assets/app-screenshot.png
    python benchmarks/app/screenshot.py --sample "green square left background" --control canny \
        --out assets/app-screenshot-control.png

Starts `ei2 serve` on a free loopback port with the bundled Shapes model, picks the sample, optionally the
structure condition, presses Edit at the model's defaults (the form as it opens), waits for the job's end and
saves what the window shows (1280x1300 by default; the results column stays in view beside the form, so a
full-page capture would not show it as a person sees it; `--full-page` takes one anyway). `--running PATH` also
saves the window while the job runs (after `--running-after` seconds); `--steps`/`--inference-steps` make a quick
job for such pictures (the README's are at the defaults). Needs the app extra and Debian's chromium.

    python benchmarks/app/screenshot.py --window 1280x900 --steps 40 --running before.png --out after.png
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    from playwright import sync_api

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sample", default="red circle right", help="the sample's label in the Source video list")
    ap.add_argument("--target", help="target prompt (default: the sample's)")
    ap.add_argument("--control", help="a structure condition to pick (e.g. canny)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--window", default="1280x1300", help="window size WxH (default 1280x1300)")
    ap.add_argument("--full-page", action="store_true", help="capture the whole page, not the window")
    ap.add_argument("--running", help="also save the window while the job runs")
    ap.add_argument("--running-after", type=float, default=8.0, help="seconds after Edit for --running")
    ap.add_argument("--steps", help="tuning steps (default: the form's)")
    ap.add_argument("--inference-steps", help="inference steps (default: the form's)")
    args = ap.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH (apt-get install -y chromium)")
    root = Path(tempfile.mkdtemp(prefix="ei2-shot-"))
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", EI2_CACHE_DIR=str(root / "cache"))
    log = open(root / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "ei2", "serve", "--port", str(port), "--out", str(root / "out"),
                               "--device", "cpu"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(180):
            try:
                if urllib.request.urlopen(url, timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
            width, height = (int(v) for v in args.window.split("x"))
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.wait_for_selector("#ei2-run")
            page.locator("#ei2-source input").click()
            page.get_by_role("option", name=args.sample, exact=True).click()
            page.wait_for_selector(f"#ei2-preview video[src*='{args.sample.replace(' ', '_')}']", timeout=15_000)
            if args.target:
                page.locator("#ei2-targets textarea").fill(args.target)
            if args.control:
                page.locator("#ei2-control input").click()
                page.get_by_role("option", name=args.control, exact=True).click()
                time.sleep(1.0)  # the sliders follow the condition's defaults
            for selector, value in (("#ei2-steps", args.steps), ("#ei2-inference-steps", args.inference_steps)):
                if value:
                    page.locator(f"{selector} input").fill(value)
            page.locator("#ei2-run").click()
            if args.running:
                time.sleep(args.running_after)
                page.screenshot(path=args.running)
                print(f"wrote {args.running}")
            deadline = time.monotonic() + args.timeout
            while "done:" not in page.locator("#ei2-status").inner_text():
                if "error" in page.locator("#ei2-status").inner_text().lower() or time.monotonic() > deadline:
                    raise SystemExit(page.locator("#ei2-status").inner_text())
                time.sleep(1.0)
            page.wait_for_selector("#ei2-grid video", timeout=30_000)
            time.sleep(2.0)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=args.full_page)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(20)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
