"""Open a page in Debian's headless Chromium: every image loaded, no console error, a screenshot that is not blank.

    >>> assert_page_loads(Path("eval/report.html"), tmp_path)
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || e.type));
}, true);
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (i) {
    return {alt: i.alt, loaded: i.complete && i.naturalWidth > 0};
  });
  var probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({images: images, errors: window.__errors});
  document.body.appendChild(probe);
});
</script>"""


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.fail("Chromium is not installed, and the report's browser check needs it: apt-get install chromium "
                    "(scripts/test.sh installs it).")
    # --no-sandbox: the sandbox refuses to run as root, as in a CI container.
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
               *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def assert_page_loads(report: Path, work: Path) -> None:
    """A copy of ``report`` with a probe: every image loaded, no error; then a screenshot of the page itself."""
    text = report.read_text(encoding="utf-8")
    probed = work / "probed.html"
    probed.write_text(text.replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8")
    done = chromium(probed, work / "profile", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, flags=re.S)
    assert found, f"the page did not finish loading:\n{done.stderr[-2000:]}"
    probe = json.loads(html.unescape(found.group(1)))
    assert len(probe["images"]) == text.count("<img ") and probe["images"]
    assert [i["alt"] for i in probe["images"] if not i["loaded"]] == []
    assert probe["errors"] == []
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []

    shot = work / "report.png"
    done = chromium(report, work / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2400")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (2400, 1280)
    assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 200, "a blank screenshot"
