"""web/, the phone page, in the system Chromium (Playwright), served as a user serves it: a plain
static file server at the repository root, no special headers. The model's uint8 output equals
Python LiteRT's on the same file; the downloaded mask and the review flag agree with predict.py's;
the slider never reruns the model; no request carries a photo or leaves the page's origin; after
one visit the page works with the server stopped and the network off; a bad photo or model gets one
line on the page, which stays usable."""

import io
import json
import os
import sys
from urllib.parse import urlsplit

import numpy as np
import pytest
from conftest import ROOT
from hypothesis import given, settings, strategies as st
from PIL import Image

import app
import imaging
import metrics
import predict
from extras import synthetic

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_web  # noqa: E402  (bench/ is not a package): its static server and predict.py run

CHROMIUM = "/usr/bin/chromium"
RUNTIME = os.path.join(ROOT, "web", "node_modules", "@litertjs", "core")
INT8 = os.path.join(ROOT, "models", "skin_unet_int8.tflite")
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 3, "is_mobile": True,
         "has_touch": True}


def _need_browser():
    for missing, fix in ((not os.path.exists(CHROMIUM), "apt-get install -y chromium"),
                         (not os.path.isdir(RUNTIME), "npm ci --prefix web")):
        if missing:
            if os.environ.get("CI"):
                pytest.fail(f"the page's test needs `{fix}` in CI (.ci/run does it)")
            pytest.skip(f"the page's test needs `{fix}`; CI runs this test")


class Site:
    """The repository root over plain HTTP, as `python -m http.server` serves it (bench_web.serve,
    no headers added)."""

    def __init__(self):
        self.server, self.origin, _ = bench_web.serve()
        self.page = self.origin + "/web/"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def site():
    served = Site()
    yield served
    served.stop()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Synthetic photos as a phone would hand them over: JPEGs of two sizes, and one stored on its
    side with an EXIF orientation (the page must turn it as predict.py does)."""
    folder = tmp_path_factory.mktemp("photos")
    images, _ = synthetic.make_synthetic(4, seed=3)
    paths = []
    for i, image in enumerate(images[:3]):
        path = folder / f"lesion{i}.jpg"
        Image.fromarray(image).save(path, "JPEG", quality=92)
        paths.append(str(path))
    big = Image.fromarray(images[3]).resize((1600, 1200), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: shown rotated 90 degrees clockwise
    big.transpose(Image.Transpose.ROTATE_90).save(folder / "sideways.jpg", "JPEG", quality=90,
                                                  exif=exif)
    paths.append(str(folder / "sideways.jpg"))
    return paths


@pytest.fixture(scope="module")
def python_masks(photos):
    """predict.py on the same photos with the same int8 file: {name: (mask, csv row)}."""
    return bench_web.predict_py(photos)


def _pixels(path_or_bytes):
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as img:
        assert img.mode == "L", img.mode
        return np.asarray(img)


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def _open(browser, site, **context):
    """A fresh visitor: a page on the site, every request it makes recorded. A first visit
    reloads itself once, cross-origin isolated by sw.js; body[data-ready] outlives that reload."""
    ctx = browser.new_context(accept_downloads=True, **context)
    page = ctx.new_page()
    page.requests = []
    ctx.on("request", lambda r: page.requests.append((r.method, r.url, r.post_data_buffer)))
    page.goto(site.page)
    _ready(page)
    return ctx, page


def _ready(page):
    page.wait_for_selector("body[data-ready]", state="attached")
    assert page.evaluate("window.skinUnet.ready") is True, page.text_content("#status")


def _status(page):
    page.wait_for_function("(s => s.includes('outlined') || document.getElementById('status')"
                           ".classList.contains('error'))(document.getElementById('status')"
                           ".textContent)")
    return page.text_content("#status"), page.evaluate("document.getElementById('status')"
                                                       ".classList.contains('error')")


def _segment(page, path):
    """Pick the photo; what the page worked out (its model-size output, figures)."""
    page.evaluate("document.getElementById('status').textContent = ''")
    page.set_input_files("[data-testid=photo]", path)
    text, error = _status(page)
    assert not error, text
    return page.evaluate("""() => { const p = window.skinUnet.state.photo; return {
        output: Array.from(p.output), rgb: Array.from(p.rgb), width: p.width, height: p.height,
        area: p.area,
        uncertainty: p.uncertainty, review: p.review, threshold: p.threshold,
        calls: window.skinUnet.state.calls}; }""")


def _download(page, tap=True):
    with page.expect_download() as info:
        if tap:
            page.tap("[data-testid=download-mask]")
        else:
            page.click("[data-testid=download-mask]")
    download = info.value
    with open(download.path(), "rb") as f:
        return download.suggested_filename, f.read()


def _same_cut(mask, area, prob, threshold):
    """The page's resize, to the pixel: its mask is imaging.resize_prob's map of the page's own
    model output, cut at the threshold (in float32, as NumPy cuts it). predict.native_mask resizes
    a band at a time, whose sampling grid is the whole map's up to rounding: it may differ only
    where the map sits exactly on the threshold (a uint8 output of 128 around a pixel gives 0.5)."""
    whole = imaging.resize_prob(prob, mask.shape)
    assert np.array_equal(mask, whole > np.float32(threshold))
    assert area == np.count_nonzero(mask)
    banded, figures = predict.native_mask(prob, mask.shape, threshold)
    assert np.all(whole[banded != mask] == np.float32(threshold))


def _python_litert(x):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=INT8, num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).reshape(-1)


def _inputs(size, photo):
    rng = np.random.default_rng(0)
    return {"zeros": np.zeros((1, size, size, 3), np.uint8),
            "noise": rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8),
            "photo": imaging.resize_image(imaging.read_image(photo)[0], (size, size))[None]}


def _same_as_python(page, photo):
    size = page.evaluate("window.skinUnet.state.size")
    for name, x in _inputs(size, photo).items():
        web = np.array(page.evaluate("x => window.skinUnet.run(x)", x.reshape(-1).tolist()))
        python = _python_litert(x)
        assert web.dtype.kind == "i" and web.shape == python.shape, name
        assert np.array_equal(web, python), (name, int(np.abs(web - python).max()))


@pytest.fixture(scope="module")
def ready_page(browser, site):
    ctx, page = _open(browser, site)
    yield page
    ctx.close()


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), height=st.integers(1, 60),
       width=st.integers(1, 60), seed=st.integers(0, 2**32 - 1))
def test_resizes_equal_pillows(ready_page, h, w, height, width, seed):
    """mask.js's two resizes against imaging.py's, any sizes up or down: the photo to the model
    input (8-bit RGB, to the bit) and the model's map to the photo (float32, to the bit)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((h, w, 1), 255, np.uint8)], axis=2)
    web = ready_page.evaluate("([x, h, w, H, W]) => Array.from(window.skinUnet.maps.resizeImage("
                              "Uint8Array.from(x), h, w, H, W))",
                              [rgba.reshape(-1).tolist(), h, w, height, width])
    expected = imaging.resize_image(rgb, (height, width)).reshape(-1)
    assert np.array_equal(np.array(web, np.uint8), expected)

    prob = rng.integers(0, 256, (h, h)).astype(np.float32) / 256  # a model's square map
    web = ready_page.evaluate("""([q, s, H, W]) => { const out = []; window.skinUnet.maps
        .resizeBands(Float32Array.from(q), s, s, H, W, (band) => out.push(...band), 7);
        return out; }""", [prob.reshape(-1).tolist(), h, height, width])
    expected = imaging.resize_prob(prob, (height, width)).reshape(-1)
    assert np.array_equal(np.array(web, np.float32), expected)


def test_settings_mirror_python(browser, site):
    ctx, page = _open(browser, site)
    settings = page.evaluate("window.skinUnet.settings")
    ctx.close()
    assert settings["maxMegapixels"] == app.MAX_MEGAPIXELS
    assert settings["previewSide"] == predict.PREVIEW_SIDE
    assert settings["defaultReview"] == metrics.REVIEW_THRESHOLD
    assert os.path.samefile(os.path.join(ROOT, "web", settings["released"]), INT8)


def test_service_worker_cache_names_the_pinned_runtime():
    """sw.js keeps LiteRT.js cache-first: were its cache name not to change with the version the
    lock file pins, a phone would keep the old runtime after an upgrade."""
    lock = json.load(open(os.path.join(ROOT, "web", "package-lock.json")))
    version = lock["packages"]["node_modules/@litertjs/core"]["version"]
    sw = open(os.path.join(ROOT, "web", "sw.js")).read()
    assert f'-litertjs-{version}";' in sw


def test_model_output_equals_python_litert(browser, site, photos):
    """Both builds: one thread where no service worker may run (so no isolation), and the
    threaded build a first visit reloads into."""
    for workers, threads in (("block", 1), ("allow", min(4, os.cpu_count()))):
        ctx, page = _open(browser, site, service_workers=workers)
        assert page.evaluate("self.crossOriginIsolated") is (workers == "allow")
        assert page.evaluate("window.skinUnet.state.threads") == threads
        _same_as_python(page, photos[0])
        ctx.close()


def test_phone_page_agrees_with_predict(browser, site, photos, python_masks):
    """On a phone-sized touch screen: each photo's downloaded mask against predict.py's, the page's
    resize against predict.native_mask on the page's own map, the flag, and the slider."""
    ctx, page = _open(browser, site, **PHONE)
    review_at = json.load(open(os.path.join(ROOT, "models", "skin_unet.json")))["review_threshold"]
    for path in photos:
        name = os.path.splitext(os.path.basename(path))[0]
        python_mask, row = python_masks[name]
        seen = _segment(page, path)
        prob = np.array(seen["output"], np.float32).reshape(128, 128) / 256
        native = (seen["height"], seen["width"])
        assert native == python_mask.shape, name  # EXIF orientation applied as predict.py does

        filename, png = _download(page)
        mask = _pixels(png)
        assert filename == f"{name}_segmentation.png"
        assert set(np.unique(mask)) <= {0, 255} and mask.shape == native
        mask = mask > 128
        _same_cut(mask, seen["area"], prob, 0.5)
        # Against predict.py from the photo. Within 1024 px the page's preview is the photo, so
        # the model sees the same pixels (libjpeg-turbo in both) and the masks are the same; over
        # it, the browser's preview filter is not Pillow's reduced-scale decode: close, not equal.
        if max(native) <= predict.PREVIEW_SIDE:
            expected = imaging.resize_image(imaging.read_image(path)[0], (128, 128))
            assert np.array_equal(np.array(seen["rgb"], np.uint8).reshape(128, 128, 3), expected)
            ties = imaging.resize_prob(prob, native) == np.float32(0.5)  # see _same_cut
            assert np.all(ties[mask != python_mask]), name
        assert _dice(mask, python_mask) >= 0.98, (name, _dice(mask, python_mask))
        flagged = metrics.flag(prob, 0.5, review_at)
        assert seen["review"] == bool(flagged["review"]) == bool(int(row["review"])), name
        assert abs(seen["uncertainty"] - flagged["uncertainty"]) < 1e-9
        assert abs(seen["uncertainty"] - float(row["uncertainty"])) < 0.01, name

    # The slider, by touch-screen keyboard steps: new figures from the kept map, no model call.
    page.focus("[data-testid=threshold]")
    for _ in range(20):
        page.keyboard.press("ArrowLeft")
    page.wait_for_function("window.skinUnet.state.photo.threshold < 0.31")
    after = page.evaluate("""() => { const p = window.skinUnet.state.photo; return {
        area: p.area, uncertainty: p.uncertainty, threshold: p.threshold,
        calls: window.skinUnet.state.calls}; }""")
    assert after["calls"] == seen["calls"] and after["threshold"] == pytest.approx(0.3)
    assert after["area"] > seen["area"]
    _same_cut(_pixels(_download(page)[1]) > 128, after["area"], prob, 0.3)
    assert after["uncertainty"] == pytest.approx(metrics.uncertainty(prob, 0.3), abs=1e-9)

    # Nothing left the page: every request a GET of the page's own origin, with no body.
    for method, url, body in page.requests:
        assert urlsplit(url).scheme in ("http", "blob", "data") and site.origin in url, url
        assert method == "GET" and not body, (method, url)
    ctx.close()


def test_offline_after_one_visit(browser, photos):
    """One visit, then the server stopped and the network off: a reload still segments a photo,
    cross-origin isolated by sw.js, on the threaded build, with Python LiteRT's output."""
    own = Site()
    try:
        ctx, page = _open(browser, own)
        assert page.evaluate("window.skinUnet.offline") is True
    finally:
        own.stop()
    ctx.set_offline(True)
    page.reload()
    _ready(page)
    assert page.evaluate("self.crossOriginIsolated") is True
    assert page.evaluate("window.skinUnet.state.threads") == min(4, os.cpu_count())
    assert _segment(page, photos[1])["area"] > 0
    _same_as_python(page, photos[1])
    ctx.close()


def test_bad_photos_and_models_get_one_line(browser, site, photos, tmp_path):
    ctx, page = _open(browser, site, **PHONE)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.png"  # 50.4 megapixels, one bit each: a small file, a big photo
    Image.new("1", (7100, 7100)).save(huge)
    for path, words in ((text, "not an image"), (empty, "not an image"),
                        (huge, "7100 x 7100 px (50.4 megapixels) is over this page's limit of 50")):
        page.set_input_files("[data-testid=photo]", str(path))
        message, error = _status(page)
        assert error and message.startswith(path.name + ":") and words in message, message
        assert "\n" not in message
    assert _segment(page, photos[0])["area"] > 0  # still usable

    broken = tmp_path / "broken_int8.tflite"
    broken.write_bytes(b"TFL3 but not a model")
    page.set_input_files("[data-testid=model]", str(broken))
    message, error = _status(page)
    assert error and message.startswith("broken_int8.tflite: not a model"), message
    # Any int8 export, with the review threshold its .json carries.
    mine = tmp_path / "mine_int8.tflite"
    mine.write_bytes(open(INT8, "rb").read())
    (tmp_path / "mine.json").write_text(json.dumps({"review_threshold": 0.001}))
    page.set_input_files("[data-testid=model]", [str(mine), str(tmp_path / "mine.json")])
    page.wait_for_function("window.skinUnet.state.name === 'mine_int8.tflite'")
    assert "0.001 (from mine.json)" in page.text_content("[data-testid=model-info]")
    assert _segment(page, photos[0])["review"] is True
    # A ?model= that is not there: one line naming it, not a stack trace.
    page.goto(site.page + "?model=../models/none_int8.tflite")
    page.wait_for_selector("body[data-ready=false]", state="attached")
    assert page.text_content("#status") == "../models/none_int8.tflite: not found (HTTP 404)"
    ctx.close()
