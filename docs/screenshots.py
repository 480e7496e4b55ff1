"""Screenshots of TensorBoard's Profile tab for a workdir's profile, taken by a headless browser.

    .venv/bin/python docs/screenshots.py WORKDIR [--run train] [--out docs/images] [--prefix profile]

Starts a real `tensorboard` on 127.0.0.1 over WORKDIR/tensorboard, asks it for the newest
profile session of `--run`, and has Debian's chromium (`apt-get install chromium`; no
download) save the overview page and the input-pipeline analyzer as PNGs, each as the
plugin's own page `data/plugin/profile/index.html?run=...&tool=...`. The browser resolves
nothing but loopback: the charts, which the page loads from Google, stay blank offline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

TOOLS = {"overview_page": "overview", "input_pipeline_analyzer": "input_pipeline"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--window-size=1400,1800",
                  "--hide-scrollbars", "--virtual-time-budget=60000"]


def get_json(url: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                body = response.read()
            if body[:2] == b"\x1f\x8b":  # the profile plugin gzips even unasked
                import gzip

                body = gzip.decompress(body)
            return json.loads(body)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # while TensorBoard starts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--run", default="train", help="TensorBoard run holding the profile (train, worker_1, ...)")
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--prefix", default="profile")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if not chromium:
        raise SystemExit("chromium is needed: apt-get install chromium")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    board = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "tensorboard"), "--logdir",
                              os.path.join(args.workdir, "tensorboard"), "--host", "127.0.0.1", "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        runs = [r for r in get_json(f"{base}/data/plugin/profile/runs") if r.startswith(args.run + "/")]
        if not runs:
            raise SystemExit(f"no profile of run {args.run!r} under {args.workdir}/tensorboard")
        run = sorted(runs)[-1]
        os.makedirs(args.out, exist_ok=True)
        for tool, name in TOOLS.items():
            hosts = get_json(f"{base}/data/plugin/profile/hosts?" + urllib.parse.urlencode({"run": run, "tag": tool}))
            host = hosts[0]["hostname"] if hosts and isinstance(hosts[0], dict) else (hosts or [""])[0]
            page = f"{base}/data/plugin/profile/index.html?" + urllib.parse.urlencode(
                {"run": run, "tool": tool, "host": host})
            out = os.path.abspath(os.path.join(args.out, f"{args.prefix}_{name}.png"))
            with tempfile.TemporaryDirectory() as profile_dir:
                subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--screenshot={out}", page],
                               check=True, capture_output=True, timeout=300)
            print(out)
    finally:
        board.terminate()
        board.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
