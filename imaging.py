"""One image file to arrays and back to any size: decoding (EXIF, JPEG draft mode, every way a file
can be bad as one line), the ISIC mask rule, and the squash resize every caller uses.

NumPy and Pillow only: predict.py, evaluate.py and the data loader all decode through here, so a
photo means the same pixels to training, scoring and prediction.
"""
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

import common

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# Pillow warns (and only raises at twice the limit) for decompression bombs; we turn any image
# over Image.MAX_IMAGE_PIXELS into a reported problem ourselves, so the warning is just noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def image_files(folder):
    """Image files in a folder (not recursive), sorted; ISIC's *_superpixels.png and hidden
    files such as .DS_Store are not images we want."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names
            if not n.startswith(".") and n.lower().endswith(IMAGE_EXTS)
            and not os.path.splitext(n)[0].lower().endswith("_superpixels")
            and os.path.isfile(os.path.join(folder, n))]


# --- Decoding -------------------------------------------------------------------------------------
def open_image(path, raw=None):
    """Open an image lazily, turning every way a file can be bad into a one-line Error. raw: the
    file's bytes, when it lives inside another file (an HDF5 archive); path then only names it."""
    try:
        if (os.path.getsize(path) if raw is None else len(raw)) == 0:
            raise common.Error(path, "empty file (0 bytes)")
        img = Image.open(path if raw is None else io.BytesIO(raw))
    except common.Error:
        raise
    except FileNotFoundError:
        raise common.Error(path, "file not found") from None
    except Image.DecompressionBombError as e:
        raise common.Error(path, f"decompression bomb refused ({e})") from None
    except UnidentifiedImageError:
        raise common.Error(path, "not an image (Pillow cannot identify it)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise common.Error(path, f"truncated or corrupt image ({e})") from None
    pixels = img.width * img.height
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        img.close()
        raise common.Error(path, f"decompression bomb refused ({img.width}x{img.height} = "
                                 f"{pixels} pixels > Pillow's limit {Image.MAX_IMAGE_PIXELS})")
    return img


def _decode(img, path, mode=None):
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return img.convert(mode) if mode and img.mode != mode else img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise common.Error(path, f"truncated or corrupt image ({e})") from None


def _on_its_side(img):
    """Whether the EXIF orientation (5 to 8) turns the picture on its side."""
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # a damaged EXIF block is not worth losing the image over
        return False


def read_image(path, min_size=None, raw=None):
    """(uint8 HxWx3 RGB, native (h, w) after EXIF rotation). With min_size=(h, w), JPEG draft
    mode decodes at 1/2, 1/4 or 1/8 scale as long as the result stays >= min_size: a large ISIC
    original decodes many times faster, and the resize that follows antialiases anyway. raw: as
    for open_image."""
    img = open_image(path, raw)
    w, h = img.size
    rotated = _on_its_side(img)
    if min_size is not None and img.format == "JPEG":
        want_h, want_w = min_size
        img.draft("RGB", (want_h, want_w) if rotated else (want_w, want_h))
    img = _decode(img, path, "RGB")
    return np.asarray(img), ((w, h) if rotated else (h, w))


def native_hw(path, raw=None):
    """(h, w) as displayed (EXIF rotation applied), from the header only: no decode. A bad file
    is a one-line Error (open_image)."""
    with open_image(path, raw) as img:
        w, h = img.size
        return (w, h) if _on_its_side(img) else (h, w)


def load_mask(path):
    """bool (H, W), binarized exactly as the official ISIC scorer does: > 128 of 255. The one
    extension: 0/1 masks (max <= 1) count as > 0, where the scorer would see all background.
    16-bit masks are scaled to 8 bit first, palette/RGB/LA masks are converted to gray."""
    img = _decode(open_image(path), path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(img).astype(np.float64)
        if values.max() > 255 or img.mode != "I":
            values = values / 257.0  # 16 bit -> 8 bit
    elif img.mode == "F":
        values = np.asarray(img)
        values = values * 255.0 if values.max() <= 1.0 else values
    else:
        values = np.asarray(img.convert("L"))
    if values.max() <= 1:
        return values > 0
    return values > 128


# --- Resizing: one squash, three kinds of array ---------------------------------------------------
def resize_image(image, size_hw):
    """uint8 HxWx3 -> size_hw, Pillow bilinear (antialiased when shrinking).
    Aspect: we SQUASH to the target shape, no crop or pad, so every pixel of the lesion is kept
    and a probability map resized back with resize_prob lands exactly on the original pixels."""
    h, w = size_hw
    if image.shape[:2] == (h, w):
        return np.array(image, dtype=np.uint8)
    return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((w, h), Image.BILINEAR))


def resize_mask(mask, size_hw):
    """bool -> bool at size_hw. Bilinear on 0/255 then > 127 keeps the area (unlike nearest,
    which drops or doubles whole rows when shrinking)."""
    h, w = size_hw
    mask = np.asarray(mask).astype(bool)
    if mask.shape == (h, w):
        return mask.copy()
    gray = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(gray.resize((w, h), Image.BILINEAR)) > 127


def resize_prob(prob, size_hw):
    """float probabilities -> float32 at size_hw (Pillow bilinear on mode "F")."""
    h, w = size_hw
    prob = np.asarray(prob, np.float32)
    if prob.shape == (h, w):
        return prob.copy()
    return np.asarray(Image.fromarray(prob).resize((w, h), Image.BILINEAR), dtype=np.float32)


def mask_png(mask, file):
    """A bool mask as the ISIC submission's PNG, 8-bit greyscale 0/255, into a file object."""
    Image.fromarray(np.uint8(mask) * 255, mode="L").save(file, format="PNG", compress_level=1)


def save_mask_png(folder, image_id, mask):
    """<id>_segmentation.png in folder (mask_png) at the photo's native size, written whole or not
    at all."""
    common.atomic_write(os.path.join(folder, f"{image_id}_segmentation.png"),
                        lambda f: mask_png(mask, f))
