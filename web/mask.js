// The page's arithmetic, with no DOM: the model's map resized to the photo as predict.py resizes it,
// the uncertainty behind the review flag (metrics.py's formula), the outline, and the mask PNG.
// Written to give Python's numbers: tests/test_web.py holds the page to predict.py and metrics.py.

// --- The resize: Pillow's bilinear on a float32 map, to the pixel -------------------------------
// Pillow resizes one axis at a time (horizontal first), each output pixel a normalised triangle
// filter over its window of source pixels, sums in float64, results stored as float32. The same
// here, so a threshold cuts the same pixels that imaging.resize_prob / predict.native_mask cut.
function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = filterScale; // the triangle's support is 1, widened when shrinking
  const step = 1 / filterScale;
  const span = Math.ceil(support) * 2 + 1;
  const first = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Float64Array(outSize * span);
  for (let o = 0; o < outSize; o++) {
    const center = (o + 0.5) * scale;
    const lo = Math.max(Math.trunc(center - support + 0.5), 0);
    const n = Math.min(Math.trunc(center + support + 0.5), inSize) - lo;
    let total = 0;
    for (let i = 0; i < n; i++) {
      const w = Math.max(0, 1 - Math.abs((i + lo - center + 0.5) * step));
      weights[o * span + i] = w;
      total += w;
    }
    for (let i = 0; i < n && total !== 0; i++) weights[o * span + i] /= total;
    first[o] = lo;
    count[o] = n;
  }
  return {first, count, weights, span};
}

// A float32 map (h x w, row-major) resized to height x width, a band of rows at a time:
// eachBand(values, top, rows) gets every band in order, so a 50-megapixel photo's map is never
// whole in memory.
export function resizeBands(map, h, w, height, width, eachBand, bandRows = 256) {
  const across = coefficients(w, width);
  const down = coefficients(h, height);
  const wide = new Float32Array(h * width); // horizontal pass over every source row
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < width; x++) {
      let sum = 0;
      const lo = across.first[x];
      for (let i = 0; i < across.count[x]; i++) {
        sum += map[y * w + lo + i] * across.weights[x * across.span + i];
      }
      wide[y * width + x] = sum;
    }
  }
  const band = new Float32Array(Math.min(bandRows, height) * width);
  for (let top = 0; top < height; top += bandRows) {
    const rows = Math.min(bandRows, height - top);
    for (let r = 0; r < rows; r++) {
      const y = top + r;
      const lo = down.first[y];
      const n = down.count[y];
      const k = down.weights.subarray(y * down.span, y * down.span + n);
      for (let x = 0; x < width; x++) {
        let sum = 0;
        for (let i = 0; i < n; i++) sum += wide[(lo + i) * width + x] * k[i];
        band[r * width + x] = sum;
      }
    }
    eachBand(band.subarray(0, rows * width), top, rows);
  }
}

// The photo to the model's input, as imaging.resize_image squashes it: Pillow's bilinear on 8-bit
// RGB (antialiased when shrinking), its fixed-point arithmetic included (weights in 22 bits,
// rounded; each pass rounds to uint8), so the same preview gives the same input, to the bit.
const PRECISION = 22;
const ONE = 2 ** PRECISION;

function fixedPoint(weights) {
  return weights.map((k) => Math.trunc(k < 0 ? k * ONE - 0.5 : k * ONE + 0.5));
}

function clip8(sum) {
  if (sum >= ONE * 256) return 255;
  return sum <= 0 ? 0 : Math.floor(sum / ONE);
}

// rgba: h x w x 4 (a canvas's pixels) -> Uint8Array height x width x 3.
export function resizeImage(rgba, h, w, height, width) {
  const across = coefficients(w, width);
  const down = coefficients(h, height);
  const kx = fixedPoint(across.weights);
  const ky = fixedPoint(down.weights);
  const wide = new Uint8Array(h * width * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < width; x++) {
      const lo = across.first[x];
      for (let c = 0; c < 3; c++) {
        let sum = ONE / 2;
        for (let i = 0; i < across.count[x]; i++) sum += rgba[(y * w + lo + i) * 4 + c] * kx[x * across.span + i];
        wide[(y * width + x) * 3 + c] = clip8(sum);
      }
    }
  }
  const out = new Uint8Array(height * width * 3);
  for (let y = 0; y < height; y++) {
    const lo = down.first[y];
    for (let x = 0; x < width; x++) {
      for (let c = 0; c < 3; c++) {
        let sum = ONE / 2;
        for (let i = 0; i < down.count[y]; i++) sum += wide[((lo + i) * width + x) * 3 + c] * ky[y * down.span + i];
        out[(y * width + x) * 3 + c] = clip8(sum);
      }
    }
  }
  return out;
}

// The model's uint8 output as probabilities: the int8 file's output scale is 1/256, zero point 0
// (docs/mobile.md), so q / 256 is exact in float32, as Python's dequantisation gives it.
export function probabilities(output) {
  const prob = new Float32Array(output.length);
  for (let i = 0; i < output.length; i++) prob[i] = output[i] / 256;
  return prob;
}

// Python compares a float32 map with a threshold in float32 (NumPy 2 casts the scalar down).
const above = (threshold) => Math.fround(threshold);

// The lesion at the photo's size: {mask (Uint8Array 0/1, or null when only counting), area}.
export function nativeMask(prob, size, height, width, threshold, keep = true) {
  const cut = above(threshold);
  const mask = keep ? new Uint8Array(height * width) : null;
  let area = 0;
  resizeBands(prob, size, size, height, width, (band, top) => {
    for (let i = 0; i < band.length; i++) {
      if (band[i] > cut) {
        area++;
        if (mask) mask[top * width + i] = 1;
      }
    }
  });
  return {mask, area};
}

// --- The review flag: metrics.uncertainty and metrics.flag ---------------------------------------
// 1 - the soft Jaccard of the map and its own mask, with a pixel of smoothing (float64 sums).
export function uncertainty(prob, threshold) {
  let inside = 0;
  let union = 0;
  for (let i = 0; i < prob.length; i++) {
    if (prob[i] > threshold) {
      inside += prob[i];
      union += 1;
    } else {
      union += prob[i];
    }
  }
  return 1 - (inside + 1) / (union + 1);
}

export function flag(prob, threshold, reviewAt) {
  const unsure = uncertainty(prob, threshold);
  return {uncertainty: unsure, review: reviewAt !== null && unsure > reviewAt};
}

// --- The picture: predict.draw_overlay's amber wash (stronger where surer) and red border --------
const TINT = [255, 200, 0];
const OUTLINE = [255, 0, 0];

export function drawOverlay(rgba, prob, size, height, width, threshold) {
  const mask = new Uint8Array(height * width);
  const cut = above(threshold);
  resizeBands(prob, size, size, height, width, (band, top) => {
    for (let i = 0; i < band.length; i++) {
      const p = band[i];
      if (!(p > cut)) continue;
      const at = top * width + i;
      const a = Math.min(Math.max(p, 0), 1) * 0.5;
      mask[at] = 1;
      for (let c = 0; c < 3; c++) rgba[at * 4 + c] = Math.round(rgba[at * 4 + c] * (1 - a) + TINT[c] * a);
    }
  });
  // The border: mask pixels within `thick` pixels of the outside (about 3 px on a 1000 px photo).
  const thick = Math.max(1, Math.round(Math.max(height, width) / 350));
  let inner = mask;
  for (let step = 0; step < thick; step++) inner = erode(inner, height, width);
  for (let i = 0; i < mask.length; i++) {
    if (mask[i] && !inner[i]) for (let c = 0; c < 3; c++) rgba[i * 4 + c] = OUTLINE[c];
  }
}

function erode(mask, height, width) {
  const out = new Uint8Array(mask.length);
  for (let y = 1; y < height - 1; y++) {
    for (let x = 1; x < width - 1; x++) {
      const i = y * width + x;
      out[i] = mask[i] & mask[i - 1] & mask[i + 1] & mask[i - width] & mask[i + width];
    }
  }
  return out;
}

// --- The mask PNG: 8-bit greyscale, 0/255, as imaging.mask_png writes the ISIC submission --------
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function chunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  let crc = 0xffffffff;
  for (let i = 4; i < 8 + data.length; i++) crc = CRC_TABLE[(crc ^ out[i]) & 255] ^ (crc >>> 8);
  view.setUint32(8 + data.length, (crc ^ 0xffffffff) >>> 0);
  return out;
}

// A Blob of the PNG. The rows go through the browser's own zlib (CompressionStream) a band at a
// time: no canvas, so no canvas size limit (a phone's is often 16 megapixels) caps the photo.
export async function maskPng(mask, height, width) {
  const header = new Uint8Array(13);
  const view = new DataView(header.buffer);
  view.setUint32(0, width);
  view.setUint32(4, height);
  header.set([8, 0, 0, 0, 0], 8); // bit depth 8, greyscale, deflate, adaptive filters, no interlace
  const zlib = new CompressionStream("deflate");
  const compressed = new Response(zlib.readable).arrayBuffer();
  const writer = zlib.writable.getWriter();
  const rowsPerWrite = Math.max(1, Math.floor((1 << 20) / (width + 1)));
  for (let top = 0; top < height; top += rowsPerWrite) {
    const rows = Math.min(rowsPerWrite, height - top);
    const block = new Uint8Array(rows * (width + 1)); // each row: filter byte 0, then its pixels
    for (let r = 0; r < rows; r++) {
      const from = (top + r) * width;
      for (let x = 0; x < width; x++) block[r * (width + 1) + 1 + x] = mask[from + x] ? 255 : 0;
    }
    await writer.write(block);
  }
  await writer.close();
  const signature = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
  const parts = [signature, chunk("IHDR", header), chunk("IDAT", new Uint8Array(await compressed)),
    chunk("IEND", new Uint8Array(0))];
  return new Blob(parts, {type: "image/png"});
}
