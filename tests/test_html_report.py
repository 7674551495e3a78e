"""The HTML report renders in a real headless Chromium: images decode and paint, nothing errors,
nothing is fetched, and data text cannot inject markup.

The browser is Debian's Chromium, driven through the Chrome DevTools protocol over
``--remote-debugging-pipe`` (no port, no extra Python package). When it is missing, the test runs
tools/install_browser.sh once (root with apt-get only) and skips, saying why, if that cannot work.
"""

import base64
import html
import json
import os
import re
import select
import signal
import subprocess
import time
from io import BytesIO

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from fal_d2.evaluation.random_control import CONTROL_MARK, CONTROL_NOTE
from fal_d2.evaluation.report import render_html_report, write_evaluation_report, write_html_report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_SCRIPT = os.path.join(REPO_ROOT, "tools", "install_browser.sh")
CHROMIUM = "/usr/bin/chromium"
INSTALL_TIMEOUT_S = 300
DEVTOOLS_TIMEOUT_S = 60
PAGE_WIDTH = 1200
# Without the background-networking flags Chromium opens connections that are refused here.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]

CLASS_NAMES = ["airplane", "beach", 'tennis<court> & "co"']  # the last one must come out as text
TITLE = "FAL p2+p3 <script>alert(1)</script> & co"


def find_or_install_chromium():
    """Path of Chromium, installing it once with tools/install_browser.sh; skip if impossible."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    # A new session lets the whole apt-get tree be killed on timeout, so no apt lock is left held.
    process = subprocess.Popen(
        ["bash", INSTALL_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.skip(f"installing chromium took more than {INSTALL_TIMEOUT_S} s")
    if not os.access(CHROMIUM, os.X_OK):
        reason = (
            output.strip().splitlines()[-1]
            if output.strip()
            else "install_browser.sh gave no reason"
        )
        pytest.skip(f"no {CHROMIUM}: {reason}")
    return CHROMIUM


class DevToolsPipe:
    """Chrome DevTools protocol over ``--remote-debugging-pipe``.

    Chromium reads commands on fd 3 and writes replies and events on fd 4, each a JSON message
    ended by a NUL byte. Events that arrive while waiting for a reply are kept in ``events``.
    """

    def __init__(self, chromium, user_data_dir, stderr_file):
        command_read, self._command_write = os.pipe()
        self._reply_read, reply_write = os.pipe()
        # bash moves the pipe ends to the fd numbers Chromium expects, then becomes Chromium.
        self.process = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$@" 3<&{command_read} 4>&{reply_write}',
                "bash",
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={user_data_dir}",
                "about:blank",
            ],
            pass_fds=(command_read, reply_write),
            stdin=subprocess.DEVNULL,
            stdout=stderr_file,
            stderr=stderr_file,
        )
        os.close(command_read)
        os.close(reply_write)
        self._buffer = b""
        self._last_id = 0
        self.events = []

    def _read_message(self, deadline):
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply from Chromium's DevTools pipe")
            if select.select([self._reply_read], [], [], remaining)[0]:
                chunk = os.read(self._reply_read, 1 << 20)
                if not chunk:
                    raise RuntimeError(
                        f"Chromium closed the DevTools pipe (exit code {self.process.poll()})"
                    )
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def send(self, method, params=None, session_id=None):
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        os.write(self._command_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + DEVTOOLS_TIMEOUT_S
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") != self._last_id:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"{method} failed: {reply['error']}")
            else:
                return reply["result"]

    def wait_for_event(self, method):
        deadline = time.monotonic() + DEVTOOLS_TIMEOUT_S
        while not any(event.get("method") == method for event in self.events):
            self.events.append(self._read_message(deadline))

    def close(self):
        try:
            self.send("Browser.close")
            self.process.wait(timeout=10)
        except Exception:  # a hung or dead browser must not outlive the test
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._command_write)
            os.close(self._reply_read)


def save_heatmap_grid(path, seed):
    """A small grid of jet-coloured smooth random maps, like the explanation grid figures."""
    rng = np.random.default_rng(seed)
    figure = Figure(figsize=(4, 2.2), dpi=100)
    FigureCanvasAgg(figure)
    for index in range(3):
        axes = figure.add_subplot(1, 3, index + 1)
        coarse = rng.random((4, 4))
        axes.imshow(np.kron(coarse, np.ones((8, 8))), cmap="jet", interpolation="bilinear")
        axes.set_axis_off()
    figure.savefig(path, format="png")


def sample_report_inputs(tmp_path):
    grids = []
    for seed, level in enumerate(["p2", "p3"]):
        path = tmp_path / f"heatmaps_{level}.png"
        save_heatmap_grid(path, seed)
        grids.append((f"Grad-CAM on {level} <{CLASS_NAMES[2]}>", str(path)))
    matrix = [[18, 1, 1], [2, 17, 1], [0, 3, 17]]
    accuracy = {"top1": 86.67, "top5": 100.0, "mean_class_acc": 86.67}
    accuracy.update(
        {f"acc/{name}": 100.0 * matrix[i][i] / 20 for i, name in enumerate(CLASS_NAMES)}
    )
    rows = []
    for method in ["gradcam", "gradcampp"]:
        for index, level in enumerate(["p5", "p4", "p3", "p2"]):
            for class_name in ["all"] + CLASS_NAMES:
                rows.append(
                    {
                        "method": method,
                        "level": level,
                        "class": class_name,
                        "average_drop_top15": 60.0 + index,
                        "increase_in_confidence_top15": 3.0 + index,
                        "average_drop": 20.0 + 10 * index,
                        "increase_in_confidence": 30.0 - 7 * index,
                        "coverage": 0.4,
                        "deletion_auc": 0.1 + 0.05 * index if method == "gradcam" else None,
                        "insertion_auc": 0.7 - 0.05 * index if method == "gradcam" else None,
                        "num_images": 60 if class_name == "all" else 20,
                    }
                )
    return dict(
        title=TITLE,
        accuracy=accuracy,
        confusion_matrix={"class_names": CLASS_NAMES, "confusion_matrix": matrix},
        explanation_rows=rows,
        images=grids,
        notes=["config: configs/fal_p2p3.yaml", "checkpoint: model_final.pth"],
    )


def is_jet_colour(pixels):
    """Bright saturated cyan-green-yellow: in jet maps, absent from the report's own styling."""
    pixels = pixels.astype(int)
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    return (pixels[..., 1] > 180) & (saturation > 150)


PAGE_PROBE = """(async () => {
    const images = await Promise.allSettled(Array.from(document.images, async (img) => {
        await img.decode();  // rejects for an image that cannot be decoded
        const box = img.getBoundingClientRect();
        return {src: img.src.slice(0, 22), width: img.naturalWidth, height: img.naturalHeight,
                box: [box.left + scrollX, box.top + scrollY, box.width, box.height]};
    }));
    return {
        images: images.map(result => result.value || {error: String(result.reason)}),
        title: document.title,
        heading: document.querySelector("h1") && document.querySelector("h1").textContent,
        scripts: document.scripts.length,
        tables: document.querySelectorAll("table").length,
        columnHeaders: Array.from(document.querySelectorAll("th.column"), th => th.textContent),
        text: document.body.innerText,
    };
})()"""


def load_in_chromium(chromium, html_path, work_dir):
    """Open ``html_path``; return what the page says about itself, a full-page screenshot and the
    protocol events (console, log, network) seen while loading."""
    url = html_path.as_uri()
    with open(work_dir / "chromium.log", "w+") as log:
        browser = DevToolsPipe(chromium, str(work_dir / "profile"), log)
        try:
            target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for domain in ["Page", "Runtime", "Log", "Network"]:
                browser.send(f"{domain}.enable", session_id=session)
            browser.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": PAGE_WIDTH, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                session,
            )
            navigation = browser.send("Page.navigate", {"url": url}, session)
            browser.wait_for_event("Page.loadEventFired")
            page = browser.send(
                "Runtime.evaluate",
                {"expression": PAGE_PROBE, "awaitPromise": True, "returnByValue": True},
                session,
            )
            screenshot = browser.send(
                "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session
            )["data"]
        finally:
            browser.close()
        log.seek(0)
        chromium_log = log.read()
    assert "errorText" not in navigation, navigation
    assert "exceptionDetails" not in page, page
    return {
        "url": url,
        "page": page["result"]["value"],
        "screenshot": Image.open(BytesIO(base64.b64decode(screenshot))),
        "events": browser.events,
        "chromium_log": chromium_log,
    }


def page_problems(events):
    """Exceptions, console errors, error-level log entries (CSP violations) and failed loads."""
    return [
        event["params"]
        for event in events
        if event.get("method") in ("Runtime.exceptionThrown", "Network.loadingFailed")
        or (
            event.get("method") == "Log.entryAdded" and event["params"]["entry"]["level"] == "error"
        )
        or (
            event.get("method") == "Runtime.consoleAPICalled"
            and event["params"]["type"] in ("error", "assert")
        )
    ]


def requested_urls(events):
    return [
        event["params"]["request"]["url"]
        for event in events
        if event.get("method") == "Network.requestWillBeSent"
    ]


@pytest.fixture(scope="module")
def chromium():
    return find_or_install_chromium()


@pytest.fixture(scope="module")
def rendered(chromium, tmp_path_factory):
    """The sample report, loaded once in Chromium for the tests below."""
    tmp_path = tmp_path_factory.mktemp("report")
    report_path = tmp_path / "report.html"
    write_html_report(str(report_path), **sample_report_inputs(tmp_path))
    return load_in_chromium(chromium, report_path, tmp_path)


def test_images_are_embedded_and_decoded(rendered):
    images = rendered["page"]["images"]
    assert len(images) == 2, "exactly the two heatmap grids: no <img> may come from escaped text"
    for image in images:
        assert image["src"] == "data:image/png;base64,"
        assert (image["width"], image["height"]) == (400, 220)


def test_screenshot_shows_the_heatmaps(rendered):
    screenshot = rendered["screenshot"]
    assert screenshot.format == "PNG" and screenshot.width == PAGE_WIDTH
    pixels = np.asarray(screenshot.convert("RGB"))
    assert pixels.std() > 20, "the screenshot is (nearly) blank"
    images = rendered["page"]["images"]
    for image in images:
        left, top, width, height = image["box"]
        region = pixels[round(top) : round(top + height), round(left) : round(left + width)]
        assert region.size and is_jet_colour(region).mean() > 0.05, "a heatmap was not painted"
    outside = pixels[: round(images[0]["box"][1])]
    assert (
        is_jet_colour(outside).mean() < 0.001
    ), "jet colours outside the heatmaps: test premise broken"


def test_page_has_no_errors_and_fetches_nothing(rendered):
    problems = page_problems(rendered["events"])
    assert not problems, f"{problems}\nChromium log:\n{rendered['chromium_log'][-3000:]}"
    urls = requested_urls(rendered["events"])
    assert rendered["url"] in urls
    assert all(
        url == rendered["url"] or url.startswith("data:image/png;base64,") for url in urls
    ), [url[:80] for url in urls]


def test_error_checks_catch_a_broken_page(chromium, tmp_path):
    """The checks above are not vacuous: a page like the report, but with an undecodable image and
    an external one, is flagged by them."""
    page_path = tmp_path / "broken.html"
    head, _, _ = render_html_report(title="broken").partition("<body>")
    page_path.write_text(
        head + '<body><h1>broken</h1><img src="data:image/png;base64,iVBORw0KGgo=">'
        '<img src="http://127.0.0.1:9/heatmap.png"></body></html>',
        encoding="utf-8",
    )
    result = load_in_chromium(chromium, page_path, tmp_path)
    assert [("error" in image) for image in result["page"]["images"]] == [True, True]
    assert page_problems(result["events"]), "the external image was neither blocked nor reported"


def test_text_is_escaped_and_tables_render(rendered):
    page = rendered["page"]
    assert page["title"] == TITLE and page["heading"] == TITLE
    assert page["scripts"] == 0
    assert page["columnHeaders"] == CLASS_NAMES
    # accuracy summary, per-class accuracy, confusion matrix, and per method: "all" + per-class
    assert page["tables"] == 3 + 2 * 2
    text = page["text"]
    for expected in [
        "Top-1 accuracy %",
        "86.67",
        "Average Drop % ↓ (whole map)",
        "Increase in Confidence % ↑ (whole map)",
        "Average Drop % ↓ (top 15 %)",
        "Coverage (mean of the map)",
        "Grad-CAM++",
        "config: configs/fal_p2p3.yaml",
        f"Grad-CAM on p2 <{CLASS_NAMES[2]}>",
    ]:
        assert expected in text


def test_report_is_self_contained_and_written_atomically(tmp_path):
    inputs = sample_report_inputs(tmp_path)
    path = tmp_path / "out" / "report.html"
    path.parent.mkdir()
    write_html_report(str(path), **inputs)
    text = path.read_text(encoding="utf-8")
    assert text == render_html_report(**inputs)
    assert os.listdir(path.parent) == ["report.html"]
    assert text.count('src="data:image/png;base64,') == 2
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "tennis&lt;court&gt; &amp; &quot;co&quot;" in text


def test_sections_are_optional_and_bad_matrix_is_rejected(tmp_path):
    text = render_html_report(title="accuracy only", accuracy={"top1": 50.0})
    assert "Top-1 accuracy %" in text and "Confusion matrix" not in text and "<img" not in text
    with pytest.raises(ValueError, match="must be 2 x 2"):
        render_html_report(
            title="t", confusion_matrix={"class_names": ["a", "b"], "confusion_matrix": [[1, 2]]}
        )


def test_budget_mode_is_named_and_maps_not_beating_the_random_control_are_marked():
    rows = [{"method": method, "level": level, "class": class_name, "average_drop_top50": drop,
             "increase_in_confidence_top50": 10.0, "average_drop": drop, "num_images": 4}
            for method, level, drop in [("gradcam", "p2", 20.0), ("gradcam", "p3", 45.0),
                                        ("random", "p2", 30.0), ("random", "p3", 40.0)]
            for class_name in ("all", "beach")]
    text = render_html_report(title="t", explanation_rows=rows, explanation_budget_mode="binary")
    assert "Budgets: top 50 % of each map&#x27;s pixels (binary: kept pixels at 1)." in text
    assert html.escape(CONTROL_NOTE, quote=True) in text
    marked = re.findall(r"<td[^>]*>([0-9.]+) " + CONTROL_MARK + "</td>", text)
    # gradcam at p3 (45 >= 40), in its overall and its per-class table; never whole-map columns
    assert marked == ["45.00", "45.00"]
    without_control = render_html_report(title="t", explanation_rows=rows[:4])
    assert CONTROL_MARK not in without_control and "Budgets:" not in without_control


def test_evaluation_report_is_assembled_from_evaluator_outputs(tmp_path):
    inputs = sample_report_inputs(tmp_path)
    inference_dir, explain_dir = tmp_path / "inference", tmp_path / "explain"
    inference_dir.mkdir()
    explain_dir.mkdir()
    (inference_dir / "confusion_matrix.json").write_text(json.dumps(inputs["confusion_matrix"]))
    (explain_dir / "explanation_metrics.json").write_text(
        json.dumps({"rows": inputs["explanation_rows"], "mask": "normalized"}))
    save_heatmap_grid(explain_dir / "grid_gradcam.png", 0)
    path = tmp_path / "report.html"
    write_evaluation_report(
        str(path),
        dataset_name="ucmerced_test",
        results={"classification": inputs["accuracy"]},
        inference_dir=str(inference_dir),
        explain_dir=str(explain_dir),
    )
    page = path.read_text()
    assert "ucmerced_test" in page and "86.67" in page
    assert page.count("data:image/png;base64,") == 1
    assert "Heatmaps: gradcam" in page
    assert "Mask convention: normalized: E multiplies the normalised input" in page
    # A metrics file from before the budget mode was recorded: its budgets kept the map values.
    assert "Budgets: top 15 % of each map&#x27;s pixels (valued: kept pixels at their map " \
           "values)." in page
    for name in CLASS_NAMES:
        assert html.escape(name) in page
    # Without an explanation folder the accuracy part still renders.
    write_evaluation_report(str(path), dataset_name="d", results={"classification": inputs["accuracy"]},
                            inference_dir=str(inference_dir), explain_dir=str(tmp_path / "none"))
    assert "data:image/png" not in path.read_text()
