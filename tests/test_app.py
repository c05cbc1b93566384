"""app.py: analyse()/rerender() without a browser (native sizes, areas, the slider never running the
model, bad uploads as one-line messages, the predictor lock), the command line's missing-model
error, and the real page end to end in headless Chromium (Playwright) against `python app.py`."""

import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import app  # noqa: E402
import data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"


class FakePredictor:
    """A radial 'lesion' (probability 1 at the centre falling to 0 at the corners), counting calls:
    every threshold gives a different, nested mask, and no TensorFlow is needed."""

    def __init__(self, size=32, kind="keras", path=__file__):
        self.size, self.kind, self.path = size, kind, path
        self.calls = 0
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        self.map = np.clip(1 - np.hypot(yy, xx) / np.hypot(0.5, 0.5), 0, 1).astype(np.float32)

    def predict(self, images):
        self.calls += 1
        return np.repeat(self.map[None], len(images), axis=0)


def _area_percent(text):
    return float(text.split("Lesion area: ")[1].split(" %")[0])


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A synthetic 384x288 photo as a JPEG."""
    path = tmp_path_factory.mktemp("photo") / "lesion.jpg"
    images, _ = data.make_synthetic(1, seed=1)
    Image.fromarray(images[0]).save(path, "JPEG", quality=92)
    return str(path)


@pytest.fixture
def bad_files(tmp_path, photo):
    """name -> path of each way an upload can be unusable."""
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all\n")
    truncated = tmp_path / "truncated.jpg"
    whole = open(photo, "rb").read()
    truncated.write_bytes(whole[:len(whole) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return {"non-image": str(text), "truncated": str(truncated), "empty": str(empty),
            "bomb": _bomb_png(tmp_path / "bomb.png")}


def _bomb_png(path):
    """A PNG whose header claims 100000 x 100000 pixels (valid CRC), and no pixel data to speak of:
    what a decompression bomb looks like to a decoder before it starts."""
    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return str(path)


# ---------------------------------------------------------------------------- analyse / rerender


def test_analyse_native_size_and_area_match_the_mask(photo, tmp_path):
    predictor = FakePredictor()
    shown, mask_img, text, mask_path, state = app.analyse(predictor, photo, 0.5, str(tmp_path))
    assert predictor.calls == 1
    assert shown.shape == (288, 384, 3) and shown.dtype == np.uint8
    assert mask_img.shape == (288, 384)
    saved = np.asarray(Image.open(mask_path))
    assert saved.shape == (288, 384) and set(np.unique(saved)) <= {0, 255}
    assert os.path.basename(mask_path) == "lesion_segmentation.png"
    area = int(np.count_nonzero(saved))
    assert 0 < area < saved.size
    assert f"({area:,} of {saved.size:,} px" in text
    assert _area_percent(text) == pytest.approx(100 * area / saved.size, abs=0.05)
    assert np.array_equal(saved > 0, state["prob"] > 0.5)


def test_large_photo_is_shown_small_but_the_mask_file_is_native(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 1500), (180, 120, 90)).save(path)
    shown, mask_img, _, mask_path, _ = app.analyse(FakePredictor(), str(path), 0.5, str(tmp_path))
    assert shown.shape == (512, 1024, 3) and mask_img.shape == (512, 1024)
    assert Image.open(mask_path).size == (3000, 1500)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    Image.new("RGB", (120, 80), (200, 150, 120)).save(path, "JPEG", exif=exif)
    shown, *_ = app.analyse(FakePredictor(), str(path), 0.5, str(tmp_path))
    assert shown.shape == (120, 80, 3)


def test_slider_rerenders_without_the_model_and_area_falls_with_threshold(photo, tmp_path):
    predictor = FakePredictor()
    *_, state = app.analyse(predictor, photo, 0.5, str(tmp_path))
    areas = []
    for threshold in (0.1, 0.3, 0.5, 0.7, 0.9):
        shown, mask_img, text, mask_path = app.rerender(state, threshold, str(tmp_path))
        area = int(np.count_nonzero(np.asarray(Image.open(mask_path))))
        assert f"({area:,} of" in text and f"threshold {threshold:.2f}" in text
        areas.append(area)
    assert predictor.calls == 1  # the model ran once, for the upload
    assert all(a > b for a, b in zip(areas, areas[1:])), areas
    assert app.rerender(None, 0.5, str(tmp_path))[0] is None  # slider before any upload


@pytest.mark.parametrize("kind", ["non-image", "truncated", "empty", "bomb"])
def test_bad_upload_is_a_one_line_message(bad_files, kind, tmp_path):
    predictor = FakePredictor()
    shown, mask_img, text, mask_path, state = app.analyse(predictor, bad_files[kind], 0.5,
                                                          str(tmp_path))
    assert shown is None and mask_img is None and mask_path is None and state is None
    assert text.startswith("⚠️ ") and "\n" not in text
    name = os.path.basename(bad_files[kind])
    assert text.startswith(f"⚠️ {name}: ")  # the visitor's file name, not the server's temp path
    assert {"non-image": "not an image", "truncated": "truncated", "empty": "empty",
            "bomb": "decompression bomb"}[kind] in text
    assert predictor.calls == 0


def test_pillow_pixel_limit_is_honoured(photo, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    text = app.analyse(FakePredictor(), photo, 0.5, str(tmp_path))[2]
    assert "decompression bomb" in text


def test_no_upload_is_a_message():
    for nothing in (None, ""):
        shown, _, text, _, state = app.analyse(FakePredictor(), nothing, 0.5)
        assert shown is None and state is None and "upload" in text.lower()


def test_predictor_lock_serialises_concurrent_visitors(photo, tmp_path):
    inner = FakePredictor()
    inside, overlaps = [0], []

    def predict(images):
        inside[0] += 1
        overlaps.append(inside[0])
        time.sleep(0.02)
        inside[0] -= 1
        return FakePredictor.predict(inner, images)

    inner_predict, inner.predict = inner.predict, predict
    locked = app.LockedPredictor(inner)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        app.analyse(locked, photo, 0.5, str(tmp_path)))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlaps) == 1 and inner.calls == 6
    first = results[0][4]["prob"]
    assert all(np.array_equal(r[4]["prob"], first) for r in results)
    assert len({r[3] for r in results}) == 6  # each visitor gets their own mask file
    del inner_predict


def test_model_line_names_format_and_size():
    line = app.model_line(FakePredictor(kind="tflite"))
    assert "LiteRT" in line and " MB" in line and "32 px" in line


# ---------------------------------------------------------------------------- command line


def test_no_weights_is_one_error_line_and_exit_2(tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "app.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: best.keras: not found; train one with `python train.py` (or pass --weights)"]
    assert time.monotonic() - started < 20  # checked before gradio/TensorFlow load


@pytest.mark.parametrize("argv, message", [
    (["--weights", "missing.tflite"], "error: missing.tflite: model file not found"),
    (["--weights", __file__, "--port", "70000"], "error: --port: 70000 is not a port number"),
])
def test_bad_flags_fail_fast(argv, message, capsys):
    assert app.main(argv) == 2
    assert capsys.readouterr().err.startswith(message)


# ---------------------------------------------------------------------------- the real page


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    code = ("import sys, data, unet; data.import_keras(); "
            "unet.build_unet(32, filters=4, depth=2).save(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, check=True, timeout=300)
    return str(path)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--weights",
                                 tiny_model, "--port", str(port)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"app.py did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_browser_end_to_end(server, photo, bad_files, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing in CI (.ci/run installs it with apt-get)")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); CI runs this test")
    from playwright.sync_api import sync_playwright

    url, proc, log = server
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            file_input = "#upload input[type=file]"
            page.wait_for_selector(file_input, state="attached", timeout=60_000)
            assert "Research tool, not a diagnosis" in page.inner_text("body")
            assert "tiny.keras" in page.inner_text("#model")

            page.set_input_files(file_input, photo)
            page.wait_for_selector("#status :text('Lesion area')", timeout=60_000)
            area = _area_percent(page.inner_text("#status"))
            assert 0 <= area <= 100
            overlay = page.locator("#overlay img").first
            overlay.wait_for(state="visible", timeout=30_000)
            assert overlay.evaluate("img => img.complete && img.naturalWidth") == 384
            page.screenshot(path=str(tmp_path / "app.png"))

            page.locator("#upload button[aria-label='Clear']").first.click()  # the x on the file
            page.wait_for_selector(file_input, state="attached", timeout=30_000)
            page.set_input_files(file_input, bad_files["non-image"])
            page.wait_for_selector("#status :text('not an image')", timeout=60_000)
            assert "notes.jpg: not an image" in page.inner_text("#status")
            assert "Traceback" not in page.inner_text("body")

            # Still serving: a good photo after the bad one works.
            page.locator("#upload button[aria-label='Clear']").first.click()
            page.wait_for_selector(file_input, state="attached", timeout=30_000)
            page.set_input_files(file_input, photo)
            page.wait_for_selector("#status :text('Lesion area')", timeout=60_000)
        finally:
            browser.close()
    assert proc.poll() is None, log.read_text()[-3000:]
    outside = [u for u in requests if not u.startswith(url) and not u.startswith(("data:", "blob:"))]
    assert requests and not outside, outside  # nothing fetched from outside the machine
    assert "Traceback" not in log.read_text()
