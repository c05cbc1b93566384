"""A web page for one dermoscopy photo at a time: upload it, see the lesion the model finds.

    python app.py [--weights best.keras] [--host 127.0.0.1] [--port 7860] [--auth USER:PASS]
    (no --weights: the released model, models/skin_unet.keras)
                  [--max-megapixels 50] [--max-upload-mb 50] [--review-threshold U]

Any model predict.py reads works (.keras, a SavedModel folder, a .tflite, an .onnx), through the
same Predictor and the same preprocessing as `predict.py`. The page shows the photo with the lesion
tinted and outlined, the mask, the lesion's area, and a threshold slider that re-draws all of it
from the cached probability map without running the model again; the mask downloads as a PNG at
the photo's native size. It also shows the photo's uncertainty (metrics.py, at the
slider's threshold), a cyan hatch where the model is unsure, and a "review suggested" line when
the uncertainty is over the model's review threshold (or --review-threshold), as predict.py flags
a photo in predictions.csv. It serves on 127.0.0.1 only unless --host says otherwise, sends no
analytics and loads nothing from outside the machine. Gradio also serves an HTTP API for the same
function (the "Use via API" link at the foot of the page).

What a visitor costs is bounded whatever the photo: a photo over --max-megapixels is refused from
its header and an upload over --max-upload-mb by Gradio, before either is decoded. Between calls the
server holds the photo at display size (at most 1024 px a side) and the model's probability map,
until an hour after the visitor's last call or until MAX_PHOTOS newer photos push it out, and on
disk the files of its last two renders; large photos decode one at a time. Everything, uploads
included, lives in one folder (Gradio's cache, GRADIO_TEMP_DIR) that goes when the server stops, on
Ctrl-C, SIGTERM or SIGHUP, within STOP_SECONDS whatever it is doing. docs/app.md has the figures.

Read top to bottom: the pure functions a test calls without a browser (analyse, rerender), the
page (build_ui), the command line (main).
"""
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict

import numpy as np
from PIL import Image

import common
import imaging
import inference  # the one Predictor and prediction path (imports no Keras by itself)
import metrics
import predict  # one photo: its preview, its native-size mask and figures, its overlay
from extras import synthetic

DEFAULT_THRESHOLD = 0.5
MAX_MEGAPIXELS = 50  # --max-megapixels: every ISIC photo (at most 30) and a 48 Mpx phone photo
MAX_UPLOAD_MB = 50   # --max-upload-mb
CONCURRENCY = 4      # calls at once per event (the model runs one at a time: LockedPredictor)
SESSION_SECONDS = 3600  # a visitor's photo is forgotten this long after their last call
MAX_PHOTOS = 100     # photos held at once, whoever sent them (see Photos)
KEEP_RENDERS = 2     # per visitor on disk: what the page shows and the one before, which a slow
                     # browser may still be fetching when the slider moves again
BIG_PHOTO = 4 * 10**6  # pixels: larger photos decode one at a time (see read_photo)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_SECONDS = 15    # a stop signal ends the process within this, whatever the server is doing
DISCLAIMER = ("**Research tool, not a diagnosis.** This model has not been validated for clinical "
              "use; anyone worried about a skin lesion should see a doctor.")
FORMATS = {"keras": "Keras (.keras)", "saved_model": "TensorFlow SavedModel",
           "tflite": "LiteRT (.tflite)", "onnx": "ONNX (.onnx)"}


# ----------------------------------------------------------------------------------------------
# The model, shared by every visitor


class LockedPredictor:
    """A Predictor whose predict() runs one call at a time. The LiteRT interpreter is not
    thread-safe (two threads calling invoke() on one interpreter corrupt each other's tensors),
    and Gradio runs handlers in a thread pool, so several visitors at once would otherwise get each
    other's masks; a lock is the simplest correct fix, and decoding, resizing and drawing (most of
    the time on a large photo) still run in parallel."""

    def __init__(self, predictor):
        self._predictor = predictor
        self._lock = threading.Lock()
        self.path, self.kind, self.size = predictor.path, predictor.kind, predictor.size
        # load_predictor sets these; a predictor made otherwise flags nothing, as predict.py does.
        self.review_threshold = getattr(predictor, "review_threshold", None)
        self.review_source = getattr(predictor, "review_source", None)

    def predict(self, images):
        with self._lock:
            return self._predictor.predict(images)


def model_megabytes(path):
    """Size on disk in MB (10**6 bytes); a SavedModel folder counts all its files."""
    if os.path.isdir(path):
        total = sum(os.path.getsize(os.path.join(root, name))
                    for root, _, names in os.walk(path) for name in names)
    else:
        total = os.path.getsize(path)
    return total / 1e6


def model_line(predictor):
    line = (f"Model: `{os.path.basename(os.path.normpath(predictor.path))}`, "
            f"{FORMATS.get(predictor.kind, predictor.kind)}, "
            f"{model_megabytes(predictor.path):.1f} MB, {predictor.size} px input")
    review_at = getattr(predictor, "review_threshold", None)
    if review_at is not None:
        line += f"; review suggested over uncertainty {review_at:.3f} ({predictor.review_source})"
    return line


# ----------------------------------------------------------------------------------------------
# One photo: analyse() runs the model once; rerender() redraws from its cached probabilities


_DECODING_BIG = threading.Lock()


def read_photo(path, max_pixels):
    """(uint8 image at display size, native (h, w)). The pixel limit is checked on the header, so
    a photo over it is never decoded; a JPEG decodes at the smallest scale (draft mode) that still
    covers the display size, the way predict.py reads photos. A PNG decodes whole, and Pillow's
    image, numpy's copy and the resize's are all held for a moment, so photos over BIG_PHOTO
    decode one at a time, not CONCURRENCY at once."""
    native = imaging.native_hw(path)  # empty, not an image, broken header, Pillow's bomb limit
    pixels = native[0] * native[1]
    if pixels > max_pixels:
        raise common.Error(path, f"{native[1]} x {native[0]} px ({pixels / 1e6:.1f} megapixels) is "
                                 f"over this server's limit of {max_pixels / 1e6:g} megapixels")
    with _DECODING_BIG if pixels > BIG_PHOTO else contextlib.nullcontext():
        return predict.decode_preview(path, native), native


REVIEW_LINE = "**Review suggested**: the model is unsure of this mask; have a person check it."


def _stats_text(stats, threshold, unsure, review_at):
    """The status: area and confidence, the uncertainty, and the review line when it is over
    review_at (None: the predictor has no review threshold, nothing is flagged)."""
    text = (f"**Lesion area: {stats['area_percent']:.1f} %** of the photo "
            f"({stats['area_px']:,} of {stats['width'] * stats['height']:,} px; photo "
            f"{stats['width']} x {stats['height']} px); mean probability inside "
            f"{stats['mean_prob']:.2f} at threshold {threshold:.2f}\n\n"
            f"Uncertainty: {unsure:.3f} (0: every pixel sure; cyan hatching marks the unsure ones)")
    if review_at is not None:
        text += f"; review suggested over {review_at:.3f}"
        if unsure > review_at:
            text += "\n\n" + REVIEW_LINE
    return text


def _write_png(path, pixels):
    common.atomic_write(path, lambda f: Image.fromarray(pixels).save(f, "PNG", compress_level=1),
                      durable=False)
    return path


class Photos:
    """The photos the server holds between calls, each in a state dict that analyse() makes: at
    most `limit` of them, the least recently used forgotten first. A state's size is bounded
    whatever the photo, and this bounds their number: Gradio keeps a visitor's state an hour after
    their last call, and makes a new visitor of every plain API call. A forgotten state is emptied
    (its arrays freed, its files removed); the visitor is asked to upload the photo again."""

    def __init__(self, folder, limit=MAX_PHOTOS):
        self.folder, self.limit = folder, limit
        self._held = OrderedDict()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # no render is writing files
        self._writing = 0
        self.closed = False

    def hold(self, state):
        if not state:  # None, or forgotten already
            return
        with self._lock:
            self._held[id(state)] = state
            self._held.move_to_end(id(state))
            evicted = [self._held.popitem(last=False)[1]
                       for _ in range(len(self._held) - self.limit)]
        for old in evicted:
            self.forget(old)

    def forget(self, state):
        """Free a photo, remove its files; Gradio also calls it when a visitor's state expires."""
        if state:
            with self._lock:
                self._held.pop(id(state), None)
            shutil.rmtree(state["folder"], ignore_errors=True)
            state.clear()

    @contextlib.contextmanager
    def writing(self):
        """Around the files of one render: yields False, and nothing may be written, once the
        server is stopping (see close)."""
        with self._lock:
            allowed = not self.closed
            self._writing += allowed
        try:
            yield allowed
        finally:
            with self._lock:
                self._writing -= allowed
                self._idle.notify_all()

    def close(self, seconds):
        """The server is stopping and its folder goes next: refuse new renders, and wait up to
        `seconds` for those being written, so that no file lands in the folder after it is gone."""
        with self._lock:
            self.closed = True
            self._idle.wait_for(lambda: not self._writing, timeout=seconds)


def render(state, threshold, photos):
    """(overlay PNG, mask PNG, stats markdown, native mask PNG, state) for a state analyse() made.

    The overlay and the mask image are at display size, the download and the numbers at native
    size. The three files are written once each, atomically, into a new folder of their own, and
    handed to Gradio as files: two visitors never share or rewrite a file (Gradio's own cache names
    images by content and rewrites them in place, which broke downloads of identical results under
    concurrency). Renders of this photo older than KEEP_RENDERS are removed. Once `photos` is
    closed (the server is stopping) nothing is written and the status says so."""
    held = dict(state)  # Photos.forget may empty the state while this runs
    if not held:
        return (None, None, "⚠️ This photo was forgotten (the server was busy): upload it again.",
                None, None)
    image, small_prob = held["image"], held["small_prob"]
    prob = imaging.resize_prob(small_prob, image.shape[:2])  # display size: small enough to hold
    shown_mask = prob > threshold
    mask, stats = predict.native_mask(small_prob, held["hw"], threshold)
    # From the model-size map, as predict.py's predictions.csv: the same photo, the same number.
    unsure = float(metrics.uncertainty(small_prob, threshold))
    # The native mask's own bytes (0/1) made 0/255 in place: no second native-size array.
    native = mask.view(np.uint8)
    np.multiply(native, 255, out=native)
    folder = os.path.join(held["folder"], uuid.uuid4().hex)
    with photos.writing() as allowed:
        if not allowed:
            return None, None, "⚠️ The server is stopping.", None, None
        outputs = (_write_png(os.path.join(folder, "overlay.png"),
                              predict.draw_overlay(image, shown_mask, prob)),
                   _write_png(os.path.join(folder, "mask.png"), shown_mask.astype(np.uint8) * 255),
                   _stats_text(stats, threshold, unsure, held["review_at"]),
                   _write_png(os.path.join(folder, f"{held['name']}_segmentation.png"), native))
    renders = held["renders"]
    renders.append(folder)
    if not state:  # forgotten while this ran: these files go too
        shutil.rmtree(held["folder"], ignore_errors=True)
    for old in renders[:-KEEP_RENDERS]:
        shutil.rmtree(old, ignore_errors=True)
    del renders[:-KEEP_RENDERS]
    return (*outputs, state)


def analyse(predictor, path, threshold, photos, state=None, max_pixels=MAX_MEGAPIXELS * 10**6):
    """One upload -> (overlay PNG, mask PNG, status markdown, mask PNG to download, state).

    `path` is the uploaded file (or None); `state` the visitor's previous one, which `photos`
    forgets now, since the page no longer shows it. A file that is not a usable image
    (imaging.read_image's checks: empty, not an image, truncated, decompression bomb) or has more
    than max_pixels gives the message in the status and None elsewhere, never an exception. The
    new state, which `photos` holds, keeps what rerender() needs, so the model runs once per
    upload: the photo at display size and the model's probability map, nothing at native size,
    and the predictor's review threshold."""
    photos.forget(state)
    if path is None or (isinstance(path, str) and not path.strip()):
        return None, None, "⚠️ No photo: upload a JPEG or PNG dermoscopy image.", None, None
    path = os.fspath(getattr(path, "name", path))  # a str path, or a tempfile-like object
    shown_name = os.path.basename(path)
    try:
        image, native = read_photo(path, max_pixels)
    except common.Error as e:
        # The error names the (temporary, server-side) path; the visitor knows the file by its name.
        return None, None, f"⚠️ {shown_name}: {common.one_line(e.problem)}", None, None
    square = imaging.resize_image(image, (predictor.size, predictor.size))  # what the model sees
    small_prob = inference.predict_probs(predictor, square[None])[0]
    state = {"folder": os.path.join(photos.folder, uuid.uuid4().hex),
             "name": os.path.splitext(shown_name)[0] or "photo", "hw": native, "image": image,
             "small_prob": small_prob, "renders": [],
             "review_at": getattr(predictor, "review_threshold", None)}
    photos.hold(state)
    return render(state, threshold, photos)


def rerender(state, threshold, photos):
    """The slider: the same outputs as analyse() for a new threshold, without the model."""
    if state is None:
        return None, None, "Upload a photo first.", None, None
    photos.hold(state)  # used again: the last to be forgotten
    return render(state, threshold, photos)


# ----------------------------------------------------------------------------------------------
# The page


def write_examples(folder, count=3, seed=7):
    """A few synthetic dermoscopy-like photos (synthetic.make_synthetic) to try without any data."""
    photos, _ = synthetic.make_synthetic(count, seed=seed)
    paths = []
    for i, image in enumerate(photos):
        path = os.path.join(folder, f"synthetic_{i + 1}.jpg")
        save = functools.partial(Image.fromarray(image).save, format="JPEG", quality=92)
        common.atomic_write(path, save, durable=False)
        paths.append(path)
    return paths


def theme():
    """Gradio's default look with system fonts: the page fetches no web fonts from anywhere."""
    import gradio as gr
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def build_ui(predictor, folder, photos, max_pixels=MAX_MEGAPIXELS * 10**6):
    """The Blocks page around one (locked) predictor. `folder` is Gradio's cache (main sets
    GRADIO_TEMP_DIR to it before gradio loads): uploads, the examples and every render (`photos`
    holds them) live there, so Gradio serves the files analyse() writes as they are."""
    import gradio as gr

    examples_dir = os.path.join(folder, "examples")
    examples = write_examples(examples_dir)

    def on_upload(upload, threshold, state):
        # The upload as Gradio received it (preprocess=False below): gr.File's own preprocess
        # leaves an empty temp file in its cache on every call. A path this server did not
        # receive (an upload or an example) is refused the same way whether or not the file
        # exists, so a caller of the API learns nothing about what else is on the disk.
        path = upload and upload["path"]
        if path and path not in page.upload_file_set and os.path.dirname(path) != examples_dir:
            raise gr.Error("Refused: not a file uploaded to this server.", print_exception=False)
        return analyse(predictor, path, threshold, photos, state, max_pixels)

    def on_slide(state, threshold):
        return rerender(state, threshold, photos)

    # delete_cache: a backstop for uploads, which stay in Gradio's cache until an hour old.
    with gr.Blocks(title="Skin lesion segmentation", analytics_enabled=False,
                   delete_cache=(600, SESSION_SECONDS)) as page:
        gr.Markdown("## Skin lesion segmentation\nUpload a dermoscopy photo (JPEG or PNG). "
                    + DISCLAIMER)
        with gr.Row():
            with gr.Column(scale=1):
                # A plain file upload, not gr.Image: Gradio would decode (and re-encode) the photo
                # itself; this way imaging.read_image sees the visitor's bytes and applies its
                # checks (empty, not an image, truncated, decompression bomb) and the EXIF
                # orientation.
                upload = gr.File(label="Dermoscopy photo", file_count="single", elem_id="upload")
                threshold = gr.Slider(0.05, 0.95, value=DEFAULT_THRESHOLD, step=0.01,
                                      label="Threshold (lesion where probability > threshold)",
                                      elem_id="threshold")
                status = gr.Markdown("Upload a photo or pick an example below.", elem_id="status")
                download = gr.DownloadButton("Download mask (PNG, native size)", value=None,
                                             elem_id="download")
                gr.Markdown(model_line(predictor), elem_id="model")
                gr.Examples(examples, inputs=upload, label="Examples (synthetic)")
            with gr.Column(scale=2):
                shown = gr.Image(label="Photo with the lesion outlined", type="filepath",
                                 interactive=False, elem_id="overlay")
                mask = gr.Image(label="Mask", type="filepath", interactive=False, elem_id="mask")
        state = gr.State(None, time_to_live=SESSION_SECONDS, delete_callback=photos.forget)

        outputs = [shown, mask, status, download, state]
        upload.change(on_upload, [upload, threshold, state], outputs, api_name="analyse",
                      preprocess=False)
        threshold.release(on_slide, [state, threshold], outputs, api_name="rerender")
    return page


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    parser = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None,
                        help="model: .keras, .tflite, .onnx or SavedModel folder "
                             "(default: models/skin_unet.keras, the released model)")
    parser.add_argument("--size", type=int, default=None,
                        help="input size, only for a model that accepts any (default: run.json's)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 for everyone who can reach it: see the README first)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", metavar="USER:PASS", default=None,
                        help="ask for this user name and password (Gradio's login page); "
                             "other users of this machine can read it in the process list")
    parser.add_argument("--max-megapixels", type=float, default=MAX_MEGAPIXELS,
                        help=f"refuse larger photos before decoding them (default "
                             f"{MAX_MEGAPIXELS})")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                        help=f"refuse larger uploads, in MB of 2**20 bytes, as the page's message "
                             f"counts them (default {MAX_UPLOAD_MB})")
    parser.add_argument("--review-threshold", type=float, default=None, metavar="U",
                        help="suggest review when a photo's uncertainty is over U (default: the "
                             f"one stored with the model, else {metrics.REVIEW_THRESHOLD})")
    args = parser.parse_args(argv)
    if args.weights is not None and not os.path.exists(args.weights):
        raise common.Error(args.weights, "model file not found")
    if not 1 <= args.port <= 65535:
        raise common.Error("--port", f"{args.port} is not a port number (1-65535)")
    for flag in ("max_megapixels", "max_upload_mb"):
        if not getattr(args, flag) > 0:
            raise common.Error(f"--{flag.replace('_', '-')}", "must be more than 0")
    if args.review_threshold is not None and not 0.0 <= args.review_threshold <= 1.0:
        raise common.Error("--review-threshold", f"{args.review_threshold:g} is not within [0, 1]")
    if args.auth is not None:
        user, _, password = args.auth.partition(":")
        if not user or not password:
            raise common.Error("--auth", "expected USER:PASS, both non-empty")
        args.auth = (user, password)
    return args


def return_freed_memory():
    """Make glibc hand every allocation of 1 MiB or more back to the system when it is freed. By
    default the threshold for that rises to the largest block freed so far (up to 32 MiB), and
    after a few large photos Pillow's 16 MiB blocks stay in the heap of whichever thread decoded
    them, unused (docs/app.md has the measure). Elsewhere this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 20)


def stop(page, photos, folder):
    """Stop serving, within STOP_SECONDS whatever the server is doing at that moment. uvicorn would
    wait for every open connection to close (an upload, a result still streaming): it waits 1 s,
    then cancels them. Gradio joins its server thread for at most 5 s; a call still running in a
    thread writes nothing more (Photos.close). Should the exit still hang (a thread it waits for),
    a timer removes the folder and ends the process, with one error line and exit code 1."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C cannot cut the clean-up short
    deadline = threading.Timer(STOP_SECONDS, _stopped_late, (folder,))
    deadline.daemon = True
    deadline.start()
    server = getattr(page, "server", None)  # None if the signal came before Gradio started it
    if server:
        server.config.timeout_graceful_shutdown = 1
    page.close(verbose=False)
    photos.close(STOP_SECONDS / 5)


def _stopped_late(folder):
    shutil.rmtree(folder, ignore_errors=True)
    print(f"error: app.py: not stopped {STOP_SECONDS} s after the signal; ended it",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


@common.command
def main(argv=None):
    args = parse_args(argv)  # before any heavy import: a bad flag answers at once
    # Before gradio is imported: it reads these when it loads.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    folder = tempfile.mkdtemp(prefix="skin-unet-app-")
    # Gradio's cache (its uploads included) inside the app's folder, which goes when the server
    # stops; Gradio's default, /tmp/gradio, outlives it.
    os.environ["GRADIO_TEMP_DIR"] = folder
    # Ctrl-C, SIGTERM (kill, systemd, docker stop) and SIGHUP all raise KeyboardInterrupt, so the
    # folder goes with the server. SIGINT is set too: a server started in the background by a
    # script inherits SIGINT ignored, and Ctrl-C (or kill -INT) would do nothing at all.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.default_int_handler)
    return_freed_memory()
    photos, page = Photos(os.path.join(folder, "photos")), None
    try:
        predictor = LockedPredictor(inference.load_predictor(args.weights, args.size,
                                                             args.review_threshold))
        page = build_ui(predictor, folder, photos, round(args.max_megapixels * 10**6))
        print(f"{model_line(predictor).replace('`', '')}; serving http://{args.host}:{args.port}",
              flush=True)
        # No monitoring page (anyone who can reach it would see the call counts) and no run
        # history (it keeps visitors' photos in the browser and can send them to a Hugging Face
        # bucket). prevent_thread_lock: this thread waits for the signal itself, below.
        page.queue(default_concurrency_limit=CONCURRENCY).launch(
            server_name=args.host, server_port=args.port, share=False, ssr_mode=False,
            theme=theme(), show_error=False, quiet=True, auth=args.auth,
            max_file_size=round(args.max_upload_mb * 2**20), enable_monitoring=False,
            run_history=False, prevent_thread_lock=True)
        while True:
            time.sleep(0.1)  # signals reach Python in the main thread, between two sleeps at worst
    except KeyboardInterrupt:
        if page is None:  # before the page existed: an interrupted start, `error: interrupted`
            raise
        stop(page, photos, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
