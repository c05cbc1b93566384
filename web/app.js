// The phone page: the released int8 .tflite in LiteRT.js (XNNPACK on WebAssembly), on this device.
// Steps: 1. settings; 2. the runtime (threaded when the page is cross-origin isolated); 3. the
// model and its review threshold; 4. a photo to the model's input; 5. the model call; 6. what the
// page shows, and the slider; 7. the mask PNG; 8. offline (the service worker). docs/mobile.md.
import {loadAndCompile, loadLiteRt, supportsFeature, Tensor, unloadLiteRt}
  from "./node_modules/@litertjs/core/dist/index.js";
import * as maps from "./mask.js";

// --- 1. Settings: each mirrors its Python home, and tests/test_web.py holds them equal ----------
const SETTINGS = {
  released: "../models/skin_unet_int8.tflite", // the released int8 file (models/README.md)
  maxMegapixels: 50, // app.MAX_MEGAPIXELS: a bigger photo is refused, never decoded
  previewSide: 1024, // predict.PREVIEW_SIDE: the long side of what the page draws
  defaultReview: 0.2, // metrics.REVIEW_THRESHOLD, for a model that stores no review threshold
  runtime: "./node_modules/@litertjs/core/wasm/",
};
const $ = (id) => document.getElementById(id);
const state = {model: null, modelUrl: "", size: 0, reviewAt: null, reviewSource: "", threads: 1,
  build: "", photo: null, calls: 0};

class Problem extends Error {} // a one-line message for the page, never a stack trace

function say(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// --- 2. The runtime --------------------------------------------------------------------------
// The threaded build needs SharedArrayBuffer, which a browser gives only to a cross-origin
// isolated page; a plain static server sends no such headers, so sw.js adds them (step 8). Its
// three builds: threaded (relaxed SIMD, isolated page), one thread (relaxed SIMD), compat.
async function wantThreads() {
  return (navigator.hardwareConcurrency || 1) > 1 && await supportsFeature("relaxedSimd");
}

async function loadRuntime() {
  if (self.crossOriginIsolated && await wantThreads()) {
    try {
      await loadLiteRt(SETTINGS.runtime, {threads: true});
      state.build = "litert_wasm_threaded_internal";
      return Math.min(navigator.hardwareConcurrency, 4); // a 128 px U-Net gains little beyond 4
    } catch (e) {
      console.warn("threaded LiteRT.js failed; one thread", e);
      unloadLiteRt();
    }
  }
  await loadLiteRt(SETTINGS.runtime);
  state.build = await supportsFeature("relaxedSimd") ? "litert_wasm_internal" : "litert_wasm_compat_internal";
  return 1;
}

// --- 3. The model, and the review threshold it carries ------------------------------------------
// The export contract (docs/mobile.md): uint8 (1, S, S, 3) in, uint8 (1, S, S, 1) out, > 128.
async function openModel(source, name, review) {
  let model;
  try {
    model = await loadAndCompile(source, {accelerator: "wasm", cpuOptions: {numThreads: state.threads}});
  } catch (e) {
    throw new Problem(`${name}: not a model LiteRT.js can load (${String(e.message || e).split("\n")[0]})`);
  }
  const [input] = model.getInputDetails();
  const [output] = model.getOutputDetails();
  const [, size] = input.shape;
  const fits = input.dtype === "uint8" && output.dtype === "uint8" && input.shape.length === 4 &&
    input.shape[0] === 1 && input.shape[2] === size && input.shape[3] === 3 &&
    output.shape.reduce((a, b) => a * b, 1) === size * size;
  if (!fits) {
    model.delete();
    throw new Problem(`${name}: not an int8 export (input ${input.dtype} [${input.shape}], output ` +
      `${output.dtype} [${output.shape}]; the page needs uint8 (1, S, S, 3) in and uint8 S x S out)`);
  }
  if (state.model) state.model.delete();
  Object.assign(state, {model, size, name, reviewAt: review.at, reviewSource: review.source});
  $("model-info").textContent = `${name}: ${size} x ${size} px, LiteRT.js ${state.threads === 1 ?
    "one thread" : `${state.threads} threads`}; review over uncertainty ${review.at.toFixed(3)} ` +
    `(${review.source}).`;
}

// inference.read_run_json's rule: <stem>.json, else that of the model it was exported from
// (model_int8.tflite -> model.json); outside models/, run.json beside it or one folder up.
async function reviewOf(url) {
  const stem = url.replace(/\.tflite$/, "");
  const candidates = [`${stem}.json`, `${stem.replace(/_(int8|float16|float32)(_qat)?$/, "")}.json`];
  if (!new URL(url, location.href).pathname.includes("/models/")) {
    candidates.push(new URL("run.json", new URL(url, location.href)).href,
      new URL("../run.json", new URL(url, location.href)).href);
  }
  for (const candidate of candidates) {
    const response = await fetch(candidate).catch(() => null);
    if (!response || !response.ok) continue;
    const file = candidate.split("/").pop();
    const run = await response.json().catch(() => {
      throw new Problem(`${file}: unreadable JSON`);
    });
    return reviewFrom(run, file);
  }
  return reviewFrom({}, "");
}

function reviewFrom(run, file) {
  if (typeof run.review_threshold === "number") return {at: run.review_threshold, source: `from ${file}`};
  return {at: SETTINGS.defaultReview, source: "the default: the model stores none"};
}

async function chooseModel(files) {
  const tflite = files.find((f) => f.name.endsWith(".tflite"));
  const json = files.find((f) => f.name.endsWith(".json"));
  if (!tflite) throw new Problem(`${files.map((f) => f.name).join(", ")}: no .tflite among them`);
  let run = {};
  if (json) {
    try {
      run = JSON.parse(await json.text());
    } catch {
      throw new Problem(`${json.name}: unreadable JSON`);
    }
  }
  await openModel(new Uint8Array(await tflite.arrayBuffer()), tflite.name, reviewFrom(run, json?.name));
}

// --- 4. A photo to the model's input: squash to S x S, uint8 RGB ----------------------------------
// As predict.py: the photo at preview size (long side at most 1024 px, never enlarged), then that
// preview squashed to S x S by Pillow's resize (mask.js). The browser decodes the preview (EXIF
// rotation applied, no colour conversion: Pillow converts none either) with its own filter where
// Pillow decodes a JPEG at a reduced scale and resizes: so for a photo over 1024 px the inputs
// differ a little, and for one within it they are the same pixels.
function pixelsOf(bitmap, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", {willReadFrequently: true});
  context.drawImage(bitmap, 0, 0);
  return context.getImageData(0, 0, width, height).data;
}

const roundHalfEven = (x) => (Math.abs(x % 1) === 0.5 ? 2 * Math.round(x / 2) : Math.round(x)); // Python's round

async function openPhoto(file) {
  const url = URL.createObjectURL(file);
  try {
    const img = new Image();
    img.src = url;
    await new Promise((ok, fail) => {
      img.onload = ok;
      img.onerror = fail;
    }).catch(() => {
      throw new Problem(`${file.name}: not an image this browser can decode`);
    });
    // The size from the header (oriented as displayed): a photo over the limit is never decoded.
    const width = img.naturalWidth;
    const height = img.naturalHeight;
    if (width * height > SETTINGS.maxMegapixels * 1e6) {
      throw new Problem(`${file.name}: ${width} x ${height} px (${(width * height / 1e6).toFixed(1)} ` +
        `megapixels) is over this page's limit of ${SETTINGS.maxMegapixels} megapixels`);
    }
    const scale = Math.min(1, SETTINGS.previewSide / Math.max(width, height));
    const pw = Math.max(1, roundHalfEven(width * scale));
    const ph = Math.max(1, roundHalfEven(height * scale));
    const bitmap = await createImageBitmap(file, {imageOrientation: "from-image",
      colorSpaceConversion: "none", premultiplyAlpha: "none", resizeWidth: pw, resizeHeight: ph,
      resizeQuality: "high"}).catch(() => {
      throw new Problem(`${file.name}: not an image this browser can decode`);
    });
    const preview = pixelsOf(bitmap, pw, ph);
    bitmap.close();
    const rgb = maps.resizeImage(preview, ph, pw, state.size, state.size);
    return {name: file.name, width, height, rgb, preview, pw, ph};
  } finally {
    URL.revokeObjectURL(url);
  }
}

// --- 5. The model call ---------------------------------------------------------------------------
// uint8 RGB (S * S * 3) -> the uint8 map (S * S), > 128 = lesion.
async function runModel(rgb) {
  state.calls += 1; // tests read it: the slider must never call the model
  const input = new Tensor(rgb, [1, state.size, state.size, 3]);
  try {
    const [output] = await state.model.run(input);
    const onHost = await output.moveTo("wasm");
    const map = onHost.toTypedArray().slice();
    onHost.delete();
    return map;
  } finally {
    input.delete();
  }
}

async function segment(file) {
  const t0 = performance.now();
  const photo = await openPhoto(file);
  const t1 = performance.now();
  photo.output = await runModel(photo.rgb);
  const t2 = performance.now();
  photo.prob = maps.probabilities(photo.output);
  state.photo = photo;
  render();
  photo.ms = {decode: t1 - t0, model: t2 - t1, total: performance.now() - t0};
  say(`${photo.name}: ${photo.width} x ${photo.height} px, outlined in ${Math.round(photo.ms.total)} ms ` +
    `(model ${photo.ms.model.toFixed(1)} ms), on this device.`);
}

// --- 6. What the page shows; the slider re-thresholds the kept map, never reruns the model -------
function threshold() {
  return Number($("threshold").value);
}

function render() {
  const photo = state.photo;
  if (!photo) return;
  const t = threshold();
  $("threshold-value").textContent = t.toFixed(2);
  const canvas = $("view");
  canvas.width = photo.pw;
  canvas.height = photo.ph;
  const picture = new ImageData(new Uint8ClampedArray(photo.preview), photo.pw, photo.ph);
  maps.drawOverlay(picture.data, photo.prob, state.size, photo.ph, photo.pw, t);
  canvas.getContext("2d").putImageData(picture, 0, 0);
  const {area} = maps.nativeMask(photo.prob, state.size, photo.height, photo.width, t, false);
  const {uncertainty, review} = maps.flag(photo.prob, t, state.reviewAt);
  Object.assign(photo, {area, uncertainty, review, threshold: t});
  const percent = 100 * area / (photo.width * photo.height);
  $("area").textContent = `Lesion area: ${area.toLocaleString("en")} px, ${percent.toFixed(2)} % of the photo`;
  $("review").textContent = review ?
    `Review: flagged. Uncertainty ${uncertainty.toFixed(3)} is over ${state.reviewAt.toFixed(3)} ` +
      `(${state.reviewSource}): have a person check this outline.` :
    `Review: not flagged. Uncertainty ${uncertainty.toFixed(3)}, at most ${state.reviewAt.toFixed(3)} ` +
      `(${state.reviewSource}).`;
  $("review").classList.toggle("flagged", review);
  $("figures").hidden = false;
}

let pending = false;
function rerender() { // one redraw per frame however fast the slider moves
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    render();
  });
}

// --- 7. The mask at the photo's native size, as predict.py writes <id>_segmentation.png ----------
async function downloadMask() {
  const photo = state.photo;
  const {mask} = maps.nativeMask(photo.prob, state.size, photo.height, photo.width, threshold());
  const blob = await maps.maskPng(mask, photo.height, photo.width);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${photo.name.replace(/\.[^.]*$/, "")}_segmentation.png`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

// --- 8. Offline, and threads: sw.js ---------------------------------------------------------------
// sw.js keeps every file the page fetches once it controls the page, and adds the headers that
// make the page cross-origin isolated. On a first visit the page is neither: once sw.js controls
// it, the page reloads itself once (before the runtime is fetched), so a first visit downloads the
// threaded build only. Without a service worker (blocked, or a private window) it runs one thread.
async function registerWorker() {
  if (!("serviceWorker" in navigator) || !location.protocol.startsWith("http")) return null;
  const within = (promise, ms) => Promise.race([promise, new Promise((ok) => setTimeout(ok, ms))]);
  try {
    // A worker that is refused without an error (some browsers, blocked workers) never gets
    // ready: after 5 s the page goes on without it.
    const registration = await within(navigator.serviceWorker.register("sw.js")
      .then(() => navigator.serviceWorker.ready), 5000);
    if (registration && !navigator.serviceWorker.controller) {
      await within(new Promise((ok) => navigator.serviceWorker.addEventListener(
        "controllerchange", ok, {once: true})), 3000);
    }
    return registration || null;
  } catch (e) {
    console.warn("no service worker: the page works, but not offline", e);
    return null;
  }
}

async function reloadIsolated(registration) {
  if (!registration || !navigator.serviceWorker.controller || self.crossOriginIsolated) return false;
  if (sessionStorage.getItem("reloaded-for-isolation") || !(await wantThreads())) return false;
  sessionStorage.setItem("reloaded-for-isolation", "1"); // once: a browser that ignores the headers
  location.reload(); //                                      runs one thread, never reloads again
  return true;
}

// Resolves true once the model and the build in use are kept (normally they already are).
async function keepForOffline(registration) {
  if (!registration || !registration.active) return false;
  const files = [`${state.build}.js`, `${state.build}.wasm`].map((f) =>
    new URL(SETTINGS.runtime + f, location.href).href).concat(state.modelUrl);
  const channel = new MessageChannel();
  const done = new Promise((ok) => { channel.port1.onmessage = (e) => ok(e.data === "kept"); });
  registration.active.postMessage({keep: files}, [channel.port2]);
  return done;
}

// --- Wiring, and what tests and bench/bench_web.py call -----------------------------------------
async function guarded(work) {
  try {
    await work();
  } catch (e) {
    if (e instanceof Problem) say(e.message, true);
    else {
      console.error(e);
      say(`Something failed: ${String(e.message || e).split("\n")[0]}`, true);
    }
  }
}

async function start() {
  const registration = await registerWorker();
  if (await reloadIsolated(registration)) return new Promise(() => {}); // this document ends
  state.threads = await loadRuntime();
  const params = new URLSearchParams(location.search);
  const url = params.get("model") || SETTINGS.released;
  state.modelUrl = new URL(url, location.href).href;
  const response = await fetch(url).catch((e) => {
    throw new Problem(`${url}: could not be fetched (${String(e.message || e).split("\n")[0]})`);
  });
  if (!response.ok) throw new Problem(`${url}: not found (HTTP ${response.status})`);
  await openModel(new Uint8Array(await response.arrayBuffer()), url.split("/").pop(), await reviewOf(url));
  for (const id of ["photo", "camera"]) {
    $(id).disabled = false;
    $(id).addEventListener("change", (e) => guarded(async () => {
      const [file] = e.target.files;
      e.target.value = ""; // the same photo picked again segments again
      if (file) await segment(file);
    }));
  }
  $("threshold").addEventListener("input", rerender);
  $("download").addEventListener("click", () => guarded(downloadMask));
  $("model").addEventListener("change", (e) => guarded(async () => {
    const files = [...e.target.files];
    e.target.value = "";
    if (files.length) await chooseModel(files);
    state.photo = null;
    $("figures").hidden = true;
    say(`${state.name} loaded: open a photo.`);
  }));
  say("Ready: open or take a photo. It stays on this device.");
  window.skinUnet.offline = keepForOffline(registration);
  document.body.dataset.ready = "true"; // tests wait for it: it survives the one reload
}

window.skinUnet = {
  settings: SETTINGS,
  state,
  maps, // mask.js: tests hold its resizes to Pillow's
  // The model-size uint8 output for a uint8 input tensor (S * S * 3): tests compare it with Python.
  run: async (values) => Array.from(await runModel(Uint8Array.from(values))),
  // Median ms of n model calls after 3 warm-up calls, on a fixed input (bench/bench_web.py).
  timeCalls: async (n) => {
    const rgb = new Uint8Array(state.size * state.size * 3).map((_, i) => (i * 2654435761 >>> 24) & 255);
    const times = [];
    for (let k = 0; k < n + 3; k++) {
      const t = performance.now();
      await runModel(rgb);
      if (k >= 3) times.push(performance.now() - t);
    }
    return times.sort((a, b) => a - b)[Math.floor(n / 2)];
  },
};
window.skinUnet.ready = guarded(start).then(() => {
  if (!state.model) document.body.dataset.ready = "false";
  return state.model !== null;
});
