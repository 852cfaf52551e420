"""The playground in a real browser: headless Chromium (selenium + chromedriver) against
`stylealign serve --model tiny` on 127.0.0.1, started by the tests.

    python -m pytest tests/browser -q                 # needs chromium, chromium-driver, selenium
    STYLEALIGN_BIN=path/to/stylealign                 # default: target/release/stylealign
    PLAYGROUND_SCREENSHOT=docs/playground.png         # also write the screenshot there

`.ci/browser.sh` installs what it needs and runs it.
"""

import os
import re
import shutil
import struct
import subprocess
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("STYLEALIGN_BIN", ROOT / "target" / "release" / "stylealign"))


def serve(*extra):
    """`stylealign serve` on an ephemeral port; yields its base URL once the page answers."""
    if not BIN.exists():
        pytest.fail(f"{BIN} not found: build it first (cargo build --release --bin stylealign)")
    proc = subprocess.Popen(
        [str(BIN), "serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "off", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"gRPC on (127\.0\.0\.1:\d+)", line)
        assert m, f"unexpected first line {line!r}"
        base = f"http://{m.group(1)}"
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the playground never answered"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server():
    yield from serve()


@pytest.fixture(scope="module")
def lora_server():
    yield from serve("--lora-dir", str(ROOT / "tests" / "fixtures" / "loras"))


@pytest.fixture(scope="module")
def auth_server():
    yield from serve("--auth-tokens", "alice=s3cret-token")


def _find(*names):
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    return None


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1360,1000", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    chromium = _find("chromium", "chromium-browser", "google-chrome")
    if chromium:
        opts.binary_location = chromium
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = _find("chromedriver")
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path) if driver_path else Service())
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver):
    """Console messages at error level since the last call (the log is drained on read)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def open_playground(driver, base):
    driver.get(base + "/")
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "generate").is_enabled(), "Generate never enabled (models not listed)")
    assert driver.find_element(By.ID, "health").get_attribute("data-state") == "serving"
    assert driver.find_element(By.ID, "model").get_attribute("value") == "tiny"


def fill(driver, element_id, value):
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


# Records, in order, what the page showed while the stream ran: phase texts, queue texts,
# progress texts and images as they were filled in.
RECORDER = """
window.__seen = [];
const rec = (kind, text) => window.__seen.push([kind, text, performance.now()]);
for (const [id, kind] of [["phase", "phase"], ["queue", "queue"], ["progress-text", "progress"]]) {
  new MutationObserver((ms) => { for (const m of ms) for (const n of m.addedNodes) rec(kind, n.textContent); })
    .observe(document.getElementById(id), { childList: true });
}
new MutationObserver((ms) => {
  for (const m of ms) for (const n of m.addedNodes) if (n.tagName === "IMG" && n.classList.contains("generated")) rec("image", n.dataset.index);
}).observe(document.getElementById("results"), { childList: true, subtree: true });
"""


def wait_finished(driver, timeout=180):
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "phase").get_attribute("data-phase") in ("done", "failed", "cancelled"),
        "the generation never finished",
    )
    phase = driver.find_element(By.ID, "phase")
    error = driver.find_element(By.ID, "error")
    assert phase.get_attribute("data-phase") == "done", f"{phase.text}: {error.text}"


def image_state(driver):
    return driver.execute_script(
        """return [...document.querySelectorAll('#results img.generated')].map(i => ({
            index: Number(i.dataset.index), w: i.naturalWidth, h: i.naturalHeight, complete: i.complete,
            reference: i.closest('.card').dataset.reference === 'true',
            badge: i.closest('.card').querySelector('.badge').textContent,
            href: i.closest('.card').querySelector('a.download').getAttribute('href'),
            download: i.closest('.card').querySelector('a.download').getAttribute('download')}))"""
    )


def downloaded_png(driver, href):
    """The bytes behind a download link, fetched inside the page: (first 8 bytes, has a `parameters` chunk)."""
    return driver.execute_async_script(
        """const [href, done] = arguments;
        fetch(href).then(r => r.arrayBuffer()).then(b => {
          const u = new Uint8Array(b);
          const text = new TextDecoder('latin1').decode(u);
          done([Array.from(u.slice(0, 8)), text.includes('iTXtparameters'), text.includes('"seed"')]);
        }).catch(e => done([[], false, String(e)]));""",
        href,
    )


def test_generate_streams_progress_and_images(server, browser, tmp_path):
    open_playground(browser, server)
    console_errors(browser)

    prompts = ["a lighthouse on a cliff, linocut print", "a fox in the snow, linocut print", "a bicycle by a wall, linocut print"]
    steps = 6
    fill(browser, "prompts", "\n".join(prompts))
    fill(browser, "width", "64")
    fill(browser, "height", "64")
    fill(browser, "steps", str(steps))
    fill(browser, "seed", "42")
    browser.execute_script(RECORDER)
    browser.find_element(By.ID, "generate").click()
    wait_finished(browser)
    WebDriverWait(browser, 10).until(lambda d: all(i["complete"] for i in image_state(d)))

    images = image_state(browser)
    assert len(images) == len(prompts), images
    assert sorted(i["index"] for i in images) == list(range(len(prompts)))
    for i in images:
        assert (i["w"], i["h"]) == (64, 64), i
        assert i["href"].startswith("blob:") and i["download"] == f"stylealign-42-{i['index']}.png", i
    # The reference (first prompt) is marked, and only it.
    refs = [i for i in images if i["reference"]]
    assert [r["index"] for r in refs] == [0] and refs[0]["badge"] == "reference", images
    # Each download is the PNG with its parameters chunk.
    for i in images:
        head, has_chunk, has_seed = downloaded_png(browser, i["href"])
        assert bytes(head) == b"\x89PNG\r\n\x1a\n"
        assert has_chunk and has_seed, i

    # Progress was shown live: every step, in order, and before the images.
    seen = browser.execute_script("return window.__seen")
    progress = [t for k, t, _ in seen if k == "progress" and t.startswith("step")]
    assert progress == [f"step {s} / {steps}" for s in range(1, steps + 1)], seen
    first_image = min(ts for k, _, ts in seen if k == "image")
    assert max(ts for k, t, ts in seen if k == "progress" and t.startswith("step")) <= first_image, seen
    phases = [t for k, t, _ in seen if k == "phase"]
    assert "Running" in phases and phases[-1].startswith("Done"), phases
    # The queue position was shown while it waited.
    assert any(k == "queue" and t.endswith("in queue") for k, t, _ in seen), seen
    assert browser.find_element(By.ID, "progress-text").text == f"step {steps} / {steps}"
    assert browser.find_element(By.ID, "progress").get_attribute("data-events") == str(steps)
    assert "session" in browser.find_element(By.ID, "session-info").text

    shot = tmp_path / "playground.png"
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    if os.environ.get("PLAYGROUND_SCREENSHOT"):
        shutil.copy(shot, os.environ["PLAYGROUND_SCREENSHOT"])
    assert console_errors(browser) == []


def test_server_validation_errors_are_shown_with_the_field(server, browser):
    open_playground(browser, server)
    console_errors(browser)
    fill(browser, "prompts", "a\nb")
    fill(browser, "width", "13")
    fill(browser, "steps", "2")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "phase").get_attribute("data-phase") == "failed")
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert error.text.startswith("INVALID_ARGUMENT:") and "width" in error.text, error.text
    assert console_errors(browser) == []


def small_png(path, w=64, h=64):
    """A gradient PNG (RGB, 8 bit) for the reference-image input."""
    rows = b"".join(b"\x00" + bytes(v for x in range(w) for v in (x * 4 % 256, y * 4 % 256, 128)) for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_reference_image_is_marked_and_options_reach_the_session(server, browser, tmp_path):
    open_playground(browser, server)
    console_errors(browser)
    ref = tmp_path / "reference.png"
    small_png(ref)
    # Every node option and a new session with them.
    browser.find_element(By.CSS_SELECTOR, "#share-norm option[value=GROUP]").click()
    browser.find_element(By.CSS_SELECTOR, "#share-attn option[value=Q_K_V]").click()
    browser.execute_script("const s = document.getElementById('scale'); s.value = '0.5'; s.dispatchEvent(new Event('input'));")
    fill(browser, "prompts", "a lighthouse\na fox")
    fill(browser, "width", "64")
    fill(browser, "height", "64")
    fill(browser, "steps", "3")
    browser.find_element(By.ID, "reference-file").send_keys(str(ref))
    fill(browser, "reference-caption", "a colourful gradient")
    browser.find_element(By.ID, "generate").click()
    wait_finished(browser)

    info = browser.find_element(By.ID, "session-info").text
    assert "gain 0.50" in info and "AdaIN q+k+v" in info, info
    cards = browser.execute_script(
        """return [...document.querySelectorAll('#results .card')].map(c => ({
            reference: c.dataset.reference === 'true', badge: c.querySelector('.badge').textContent,
            uploaded: !!c.querySelector('img.uploaded'), generated: c.querySelector('img.generated')?.naturalWidth ?? 0}))"""
    )
    # The uploaded image is the marked reference; every prompt is a generated target.
    assert cards[0] == {"reference": True, "badge": "reference · uploaded", "uploaded": True, "generated": 0}, cards
    assert [c["generated"] for c in cards[1:]] == [64, 64] and not any(c["reference"] for c in cards[1:]), cards
    assert console_errors(browser) == []


def test_step_window_and_levels_reach_the_session(server, browser):
    open_playground(browser, server)
    console_errors(browser)
    browser.find_element(By.CSS_SELECTOR, "#scope summary").click()
    fill(browser, "prompts", "a lighthouse\na fox")
    fill(browser, "width", "32")
    fill(browser, "height", "32")
    fill(browser, "steps", "2")
    fill(browser, "window-end", "0.5")
    fill(browser, "levels", "up.1:off; down.0:gain=0.5,norm=off")
    browser.find_element(By.ID, "generate").click()
    wait_finished(browser)
    info = browser.find_element(By.ID, "session-info").text
    assert "steps 0–0.5" in info and "up.1 off" in info and "down.0 (norm own, attention shared, gain 0.50)" in info, info

    # A level the model does not have: the server's error names the field.
    fill(browser, "levels", "down.9:off")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "phase").get_attribute("data-phase") == "failed")
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("INVALID_ARGUMENT:") and "levels[0].name" in error and "down.0..down.2" in error, error
    # A malformed entry is refused in the page.
    fill(browser, "levels", "up.1:sideways")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 10).until(lambda d: "unknown option" in d.find_element(By.ID, "error").text)
    assert "levels[0]" in browser.find_element(By.ID, "error").text
    assert console_errors(browser) == []


def test_loras_are_offered_and_reach_the_session(lora_server, browser):
    open_playground(browser, lora_server)
    console_errors(browser)
    assert "tiny-ink for tiny" in browser.find_element(By.ID, "lora-list").text
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#lora-names option")]
    assert options == ["tiny-ink:1"], options
    assert "embedded · fp32 · epsilon (config)" in browser.find_element(By.ID, "model-info").text
    fill(browser, "prompts", "a lighthouse\na fox")
    fill(browser, "width", "32")
    fill(browser, "height", "32")
    fill(browser, "steps", "2")
    fill(browser, "loras", "tiny-ink:-0.7")
    browser.find_element(By.ID, "generate").click()
    wait_finished(browser)
    assert "LoRAs tiny-ink -0.70" in browser.find_element(By.ID, "session-info").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "img.generated")) == 2
    # An unknown LoRA: the server's error names the field.
    fill(browser, "loras", "tiny-ink:0.5, nope")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "phase").get_attribute("data-phase") == "failed")
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("INVALID_ARGUMENT:") and "loras[1].name" in error, error
    # A malformed weight is refused in the page.
    fill(browser, "loras", "tiny-ink:heavy")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 10).until(lambda d: "loras[0].weight" in d.find_element(By.ID, "error").text)
    assert console_errors(browser) == []


def test_queue_position_is_live_and_cancel_frees_the_worker(server, browser):
    """Two other tabs occupy the (single) worker and the queue: this tab shows `1 ahead`, then
    `next to run`; cancelling them lets it run."""
    open_playground(browser, server)
    main = browser.current_window_handle
    blockers = []
    # Different sizes: never batched together; the first runs, the second waits.
    for size in ("128", "96"):
        browser.switch_to.new_window("tab")
        open_playground(browser, server)
        fill(browser, "prompts", "\n".join(f"blocker {i}" for i in range(8)))
        fill(browser, "width", size)
        fill(browser, "height", size)
        fill(browser, "steps", "150")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "phase").get_attribute("data-phase") in ("queued", "running"))
        if size == "128":
            WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "phase").get_attribute("data-phase") == "running")
        blockers.append(browser.current_window_handle)

    browser.switch_to.window(main)
    console_errors(browser)
    fill(browser, "prompts", "a lighthouse\na fox")
    fill(browser, "width", "64")
    fill(browser, "height", "64")
    fill(browser, "steps", "2")
    browser.execute_script(RECORDER)
    browser.find_element(By.ID, "generate").click()
    queue = browser.find_element(By.ID, "queue")
    WebDriverWait(browser, 30).until(lambda d: queue.get_attribute("data-position") == "1" and queue.is_displayed(), "never shown as 1 ahead")
    assert queue.text == "1 ahead · 2 in queue", queue.text
    assert browser.find_element(By.ID, "phase").text == "Queued"

    for handle in blockers:
        browser.switch_to.window(handle)
        assert browser.find_element(By.ID, "phase").get_attribute("data-phase") in ("queued", "running")
        browser.find_element(By.ID, "cancel").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "phase").get_attribute("data-phase") == "cancelled")
        assert not browser.find_element(By.ID, "error").is_displayed()
        assert browser.find_element(By.ID, "generate").is_enabled()

    browser.switch_to.window(main)
    wait_finished(browser, timeout=60)
    queue_texts = [t for k, t, _ in browser.execute_script("return window.__seen") if k == "queue"]
    assert queue_texts[:1] == ["1 ahead · 2 in queue"] and "next to run · 1 in queue" in queue_texts, queue_texts
    assert len(image_state(browser)) == 2
    assert console_errors(browser) == []
    for handle in blockers:
        browser.switch_to.window(handle)
        browser.close()
    browser.switch_to.window(main)


def test_with_auth_on_the_token_field_unlocks_the_page(auth_server, browser):
    browser.get(auth_server + "/")
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30).until(lambda d: error.is_displayed(), "no error without a token")
    assert error.text.startswith("UNAUTHENTICATED:"), error.text
    assert not browser.find_element(By.ID, "generate").is_enabled()
    browser.find_element(By.CSS_SELECTOR, "details.connection > summary").click()
    fill(browser, "token", "s3cret-token")
    browser.find_element(By.ID, "prompts").click()  # leaving the field commits it
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "generate").is_enabled(), "the token did not unlock the page")
    assert not error.is_displayed()
    console_errors(browser)
    fill(browser, "prompts", "a lighthouse\na fox")
    fill(browser, "width", "64")
    fill(browser, "height", "64")
    fill(browser, "steps", "2")
    browser.find_element(By.ID, "generate").click()
    wait_finished(browser)
    assert len(image_state(browser)) == 2
    assert console_errors(browser) == []
    browser.execute_script("sessionStorage.clear()")
