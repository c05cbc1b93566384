"""A web page for one dermoscopy photo at a time: upload it, see the lesion the model finds.

    python app.py [--weights best.keras] [--host 127.0.0.1] [--port 7860]

Any model predict.py reads works (.keras, a SavedModel folder, a .tflite), through the same
Predictor and the same preprocessing (predict.segment). The page shows the photo with the lesion
tinted and outlined, the mask, the lesion's area, and a threshold slider that re-draws all of it
from the cached probability map without running the model again; the mask downloads as a PNG at
the photo's native size. It serves on 127.0.0.1 only unless --host says otherwise, sends no
analytics and loads nothing from outside the machine. Gradio also serves an HTTP API for the same
function (the "Use via API" link at the foot of the page).

Read top to bottom: the pure functions a test calls without a browser (analyse, rerender), the
page (build_ui), the command line (main).
"""
import os
import shutil
import sys
import tempfile
import threading
import uuid

import numpy as np
from PIL import Image

import data
import predict  # the one Predictor and preprocessing path (imports no Keras by itself)

DISPLAY_MAX = 1024  # px, long side of the images sent to the browser (the mask file is native)
DEFAULT_THRESHOLD = 0.5
DISCLAIMER = ("**Research tool, not a diagnosis.** This model has not been validated for clinical "
              "use; anyone worried about a skin lesion should see a doctor.")
FORMATS = {"keras": "Keras (.keras)", "saved_model": "TensorFlow SavedModel",
           "tflite": "LiteRT (.tflite)"}


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
    return (f"Model: `{os.path.basename(os.path.normpath(predictor.path))}`, "
            f"{FORMATS.get(predictor.kind, predictor.kind)}, "
            f"{model_megabytes(predictor.path):.1f} MB, {predictor.size} px input")


# ----------------------------------------------------------------------------------------------
# One photo: analyse() runs the model once; rerender() redraws from its cached probabilities


def _display_size(h, w, limit=DISPLAY_MAX):
    scale = min(1.0, limit / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _stats_text(stats, threshold):
    return (f"**Lesion area: {stats['area_percent']:.1f} %** of the photo "
            f"({stats['area_px']:,} of {stats['width'] * stats['height']:,} px; photo "
            f"{stats['width']} x {stats['height']} px); mean probability inside "
            f"{stats['mean_prob']:.2f} at threshold {threshold:.2f}")


def _write_mask(mask, folder, name):
    """The mask as an 8-bit 0/255 PNG at native size (the ISIC format) in its own new subfolder
    of `folder`, so two visitors' downloads never overwrite each other."""
    path = os.path.join(folder, uuid.uuid4().hex, f"{name}_segmentation.png")
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    data.atomic_write(path, lambda f: image.save(f, "PNG", compress_level=1), durable=False)
    return path


def render(state, threshold, folder):
    """(overlay uint8 (h, w, 3), mask uint8 (h, w), stats markdown, mask PNG path) from a state
    analyse() made; the two images are at display size, the PNG and the numbers at native size."""
    mask = state["prob"] > threshold
    small_mask = state["small_prob"] > threshold
    # The overlay is drawn on the display-size copy: the slider stays fast on a 24 MP photo.
    shown = predict.overlay(state["small_image"], small_mask, state["small_prob"])
    stats = predict.lesion_stats(mask, state["prob"])
    path = _write_mask(mask, folder, state["name"])
    return shown, small_mask.astype(np.uint8) * 255, _stats_text(stats, threshold), path


def analyse(predictor, path, threshold=DEFAULT_THRESHOLD, folder=None):
    """One upload -> (overlay, mask image, status markdown, mask PNG path, state).

    `path` is the uploaded file (or None). A file that is not a usable image (data.load_image's
    checks: empty, not an image, truncated, decompression bomb) gives the message in the status
    and None elsewhere, never an exception. `state` holds what rerender() needs: the native
    probability map and display-size copies, so the model runs once per upload."""
    folder = folder or tempfile.gettempdir()
    if path is None or (isinstance(path, str) and not path.strip()):
        return None, None, "⚠️ No photo: upload a JPEG or PNG dermoscopy image.", None, None
    path = os.fspath(getattr(path, "name", path))  # a str path, or a tempfile-like object
    shown_name = os.path.basename(path)
    try:
        image = data.load_image(path)
    except data.Error as e:
        # data.py names the (temporary, server-side) file path; the visitor knows it by its name.
        message = data.one_line(e).replace(path, shown_name)
        return None, None, f"⚠️ {message}", None, None
    prob, _ = predict.segment(predictor, image, threshold)
    small_hw = _display_size(*image.shape[:2])
    state = {"prob": prob, "name": os.path.splitext(shown_name)[0] or "photo",
             "small_image": data.resize_image(image, small_hw),
             "small_prob": data.resize_prob(prob, small_hw)}
    return (*render(state, threshold, folder), state)


def rerender(state, threshold, folder=None):
    """The slider: the same outputs as analyse() for a new threshold, without the model."""
    if state is None:
        return None, None, "Upload a photo first.", None
    return render(state, threshold, folder or tempfile.gettempdir())


# ----------------------------------------------------------------------------------------------
# The page


def write_examples(folder, count=3, seed=7):
    """A few synthetic dermoscopy-like photos (data.make_synthetic) to try without any data."""
    images, _ = data.make_synthetic(count, seed=seed)
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(folder, f"synthetic_{i + 1}.jpg")
        data.atomic_write(path, lambda f: Image.fromarray(image).save(f, "JPEG", quality=92),
                          durable=False)
        paths.append(path)
    return paths


def theme():
    """Gradio's default look with system fonts: the page fetches no web fonts from anywhere."""
    import gradio as gr
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def build_ui(predictor, folder):
    """The Blocks page around one (locked) predictor; `folder` holds examples and mask files."""
    import gradio as gr

    examples = write_examples(os.path.join(folder, "examples"))
    masks = os.path.join(folder, "masks")

    def on_upload(path, threshold):
        return analyse(predictor, path, threshold, masks)

    def on_slide(state, threshold):
        return rerender(state, threshold, masks)

    # delete_cache: visitors' photos and masks leave Gradio's cache within two hours.
    with gr.Blocks(title="Skin lesion segmentation", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as page:
        gr.Markdown("## Skin lesion segmentation\nUpload a dermoscopy photo (JPEG or PNG). "
                    + DISCLAIMER)
        with gr.Row():
            with gr.Column(scale=1):
                # A plain file upload, not gr.Image: Gradio would decode (and re-encode) the photo
                # itself; this way data.load_image sees the visitor's bytes and applies its checks
                # (empty, not an image, truncated, decompression bomb) and the EXIF orientation.
                upload = gr.File(label="Dermoscopy photo", file_count="single", type="filepath",
                                 elem_id="upload")
                threshold = gr.Slider(0.05, 0.95, value=DEFAULT_THRESHOLD, step=0.01,
                                      label="Threshold (lesion where probability > threshold)",
                                      elem_id="threshold")
                status = gr.Markdown("Upload a photo or pick an example below.", elem_id="status")
                download = gr.DownloadButton("Download mask (PNG, native size)", value=None,
                                             elem_id="download")
                gr.Markdown(model_line(predictor), elem_id="model")
                gr.Examples(examples, inputs=upload, label="Examples (synthetic)")
            with gr.Column(scale=2):
                shown = gr.Image(label="Photo with the lesion outlined", type="numpy",
                                 interactive=False, format="png", elem_id="overlay")
                mask = gr.Image(label="Mask", type="numpy", image_mode="L", interactive=False,
                                format="png", elem_id="mask")
        state = gr.State(None, time_to_live=3600)  # per visitor; freed an hour after the last use

        upload.change(on_upload, [upload, threshold], [shown, mask, status, download, state],
                      concurrency_limit=4, api_name="analyse")
        threshold.release(on_slide, [state, threshold], [shown, mask, status, download],
                          concurrency_limit=4, api_name="rerender")
    return page


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    parser = data.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None,
                        help="model: .keras, .tflite or SavedModel folder (default: best.keras here)")
    parser.add_argument("--size", type=int, default=None,
                        help="input size, only for a model that accepts any (default: run.json's)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 for everyone who can reach it)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    if args.weights is None:
        if not os.path.exists("best.keras"):
            raise data.Error("best.keras", "not found; train one with `python train.py` "
                             "(or pass --weights)")
        args.weights = "best.keras"
    elif not os.path.exists(args.weights):
        raise data.Error(args.weights, "model file not found")
    if not 1 <= args.port <= 65535:
        raise data.Error("--port", f"{args.port} is not a port number (1-65535)")
    return args


@data.command
def main(argv=None):
    args = parse_args(argv)  # before any heavy import: a bad flag answers at once
    # Before gradio is imported: it reads these when it loads.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    predictor = LockedPredictor(predict.load_predictor(args.weights, args.size))

    folder = tempfile.mkdtemp(prefix="skin-unet-app-")
    try:
        page = build_ui(predictor, folder)
        print(f"{model_line(predictor).replace('`', '')}; serving http://{args.host}:{args.port}",
              flush=True)
        page.queue(default_concurrency_limit=4).launch(
            server_name=args.host, server_port=args.port, share=False, ssr_mode=False,
            theme=theme(), show_error=False, quiet=True, allowed_paths=[folder])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
