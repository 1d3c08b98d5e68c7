"""Take the dashboard screenshot (docs/dashboard.png): an ``ef21 run`` and Debian's headless Chromium, nothing else.

    python scripts/dashboard_screenshot.py [--at-round 2000] [-o docs/dashboard.png] [-- extra ef21 run flags]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--at-round", type=int, default=2000)
    ap.add_argument("-o", "--output", default="docs/dashboard.png")
    ap.add_argument("--size", default="1400,1000")
    ap.add_argument("run_flags", nargs="*", default=["--workers", "4", "--k", "2", "--stepsize-mult", "256",
                                                     "--x0", "normal:0", "--rounds", "100000"])
    args = ap.parse_args()
    run = subprocess.Popen([sys.executable, "-m", "ef21", "run", "-q", *args.run_flags], stdout=subprocess.PIPE,
                           text=True)
    try:
        url = None
        for line in run.stdout:  # type: ignore[union-attr]
            m = re.search(r"dashboard (http://\S+/);", line)
            if m:
                url = m.group(1)
                break
        assert url is not None, "ef21 run printed no dashboard URL"
        while json.load(urllib.request.urlopen(url + "status", timeout=5))["round"] < args.at_round:
            time.sleep(0.2)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                            "--disable-background-networking", "--disable-component-update", "--disable-quic",
                            "--no-first-run", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
                            f"--window-size={args.size}", "--virtual-time-budget=3000",
                            f"--screenshot={args.output}", url], check=True, capture_output=True, timeout=120)
        print(f"wrote {args.output}")
    finally:
        run.send_signal(signal.SIGINT)
        run.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
