"""Regenerate docs/dashboard-study.png: the dashboard's study page for a finished study.

    hpo run studies/quickstart.yaml && python docs/screenshot.py quickstart
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

study = sys.argv[1] if len(sys.argv) > 1 else "quickstart"
storage = sys.argv[2] if len(sys.argv) > 2 else "sqlite:///hpo.db"
port = 18765
server = subprocess.Popen([sys.executable, "-m", "hpo", "dashboard", "--storage", storage, "--port", str(port)])
try:
    time.sleep(3)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    import json
    import urllib.request

    studies = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies"))["study_summaries"]
    study_id = next(s["study_id"] for s in studies if s["study_name"] == study)
    driver.get(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}")
    time.sleep(8)
    out = Path(__file__).with_name("dashboard-study.png")
    driver.save_screenshot(str(out))
    driver.quit()
    print(out)
finally:
    server.terminate()
