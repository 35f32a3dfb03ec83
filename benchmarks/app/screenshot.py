"""Screenshots of `ei2 serve` after a finished job, as a person sees it (headless Chromium through Playwright).

    python benchmarks/app/screenshot.py --out assets/app-screenshot.png
    python benchmarks/app/screenshot.py --sample "green square left background" --control canny \
        --out assets/app-screenshot-control.png

Starts `ei2 serve` on a free loopback port with the bundled Shapes model, picks the sample, optionally the
structure condition, presses Edit at the model's defaults (the form as it opens), waits for the job's end and
saves a full-page screenshot (1280 px wide window). Needs the app extra and Debian's chromium.
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
            page = browser.new_page(viewport={"width": 1280, "height": 900})
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
            page.locator("#ei2-run").click()
            deadline = time.monotonic() + args.timeout
            while "done:" not in page.locator("#ei2-status").inner_text():
                if "error" in page.locator("#ei2-status").inner_text() or time.monotonic() > deadline:
                    raise SystemExit(page.locator("#ei2-status").inner_text())
                time.sleep(1.0)
            page.wait_for_selector("#ei2-grid video", timeout=30_000)
            time.sleep(2.0)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
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
