"""Drive `regionmed-app` in headless Chromium with selenium, as a user would: start the app, upload a film, draw
boxes with the mouse, press Analyse and read the page. The browser test (tests/test_app_browser.py) and the latency
benchmark (benchmarks/bench_app.py) use it; it needs the `dev` extra (selenium) and a Chromium with its driver
(Debian: `apt-get install chromium chromium-driver`; nothing is downloaded)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CHROMEDRIVER", "CHROMIUM", "AppPage", "browser_available", "chromium", "free_port", "start_app", "stop_app"]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_SECONDS = 120


def browser_available() -> bool:
    return Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for the app, or any server a test or benchmark starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(model_dir: Path, port: int, findings: Sequence[str], log_path: Path) -> subprocess.Popen:
    """The installed `regionmed-app` on 127.0.0.1:`port` as a user starts it (stdin closed, offline; `findings`
    empty: its default list); returns once it serves its page."""
    script = Path(sys.executable).with_name("regionmed-app")
    command = [str(script) if script.is_file() else "regionmed-app", "--model", str(model_dir), "--port", str(port),
               *(["--findings", *findings] if findings else [])]
    environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    log = log_path.open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=environment)
    deadline = time.time() + WAIT_SECONDS
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"regionmed-app exited with {process.returncode}: {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"regionmed-app did not serve within {WAIT_SECONDS} s: {log_path.read_text()[-3000:]}")


def stop_app(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def chromium(width: int = 1400, height: int = 1400) -> Any:
    """A headless Chromium driven by selenium (Debian's binaries; nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}", "--disable-background-networking",
                     "--disable-component-update", "--no-first-run", "--disable-sync"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


class AppPage:
    """The app's page in a selenium driver, by the elem_ids `regionmed_clip.apps.app.build_app` gives."""

    def __init__(self, driver: Any, url: str) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.url = url
        driver.get(url)
        self.wait = WebDriverWait(driver, WAIT_SECONDS)
        self.wait.until(lambda d: d.find_elements("css selector", "#analyse"))

    def text(self, elem_id: str) -> str:
        """The visible text of a component, without its status tracker (the "processing | 1.2 s" timer)."""
        elements = self.driver.find_elements("css selector", f"#{elem_id} [data-testid=markdown]")
        elements = elements or self.driver.find_elements("css selector", f"#{elem_id}")
        return elements[0].text if elements else ""

    def idle(self, elem_id: str) -> bool:
        """Whether no event is pending on the component (its status tracker is hidden)."""
        trackers = self.driver.find_elements("css selector", f"#{elem_id} [data-testid=status-tracker]")
        return all("hide" in (tracker.get_attribute("class") or "").split() for tracker in trackers)

    def table(self, elem_id: str) -> list[list[str]]:
        """The rows of a dataframe as their cells' text, in order (Gradio renders them as a virtual grid of
        `role=row` / `role=gridcell` elements; textContent includes cells scrolled out of view)."""
        rows = self.driver.find_elements("css selector", f"#{elem_id} [role=row].virtual-row")
        rows = sorted(rows, key=lambda row: int(row.get_attribute("data-index")))
        return [[cell.get_attribute("textContent").strip() for cell in row.find_elements("css selector", "[role=gridcell]")]
                for row in rows]

    def upload(self, path: Path, expect: str) -> str:
        """Upload `path` as the film; waits until the message holds `expect` and returns the message."""
        field = self.driver.find_element("css selector", "#film-file input[type=file]")
        field.send_keys(str(Path(path).resolve()))
        self.wait.until(lambda d: expect in self.text("message"))
        return self.text("message")

    def canvas(self) -> Any:
        return self.driver.find_element("css selector", "#film-canvas canvas")

    def film_to_screen(self, x: float, y: float, film_width: int, film_height: int) -> tuple[float, float]:
        """Offsets from the canvas' centre of film pixel (x, y): the canvas shows the film fitted and centred."""
        canvas = self.canvas()
        width, height = canvas.size["width"], canvas.size["height"]
        scale = min(width / film_width, height / film_height)
        return (x - film_width / 2) * scale, (y - film_height / 2) * scale

    def draw_box(self, box: Sequence[float], film_width: int, film_height: int) -> None:
        """Drag the mouse over the canvas from the box's top-left to its bottom-right corner (film pixels)."""
        from selenium.webdriver.common.action_chains import ActionChains

        x0, y0 = self.film_to_screen(box[0], box[1], film_width, film_height)
        x1, y1 = self.film_to_screen(box[2], box[3], film_width, film_height)
        canvas = self.canvas()
        chain = ActionChains(self.driver, duration=50)
        chain.move_to_element_with_offset(canvas, round(x0), round(y0)).click_and_hold()
        for step in range(1, 6):  # a drag in steps, as a hand makes it
            chain.move_to_element_with_offset(canvas, round(x0 + (x1 - x0) * step / 5),
                                              round(y0 + (y1 - y0) * step / 5))
        chain.release().perform()

    def analyse(self, expect: str = "Box-free top finding") -> float:
        """Press Analyse; waits until the summary is new and holds `expect` (its "Analysed in" line changes on
        every run), or a message, with nothing pending; returns the seconds from the click to that."""
        previous = self.text("summary")
        self.driver.find_element("css selector", "#analyse").click()
        began = time.perf_counter()

        def done(_: Any) -> bool:
            summary, message = self.text("summary"), self.text("message")
            answered = (expect in summary and summary != previous) or "Cannot analyse" in message or "went wrong" in message
            return answered and self.idle("summary") and self.idle("heatmap") and self.idle("box-results")

        self.wait.until(done)
        return time.perf_counter() - began

    def resources(self) -> list[str]:
        """Every URL the page loaded (document, scripts, styles, fonts, images, calls)."""
        return self.driver.execute_script(
            "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))"
            ".map(entry => entry.name)")
