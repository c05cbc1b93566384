// The page's service worker: it keeps the page, LiteRT.js and the model, so the page works with
// the network off, and it makes the page cross-origin isolated (the headers a plain static server
// does not send), which is what lets the threaded WebAssembly build run. Same-origin GETs only:
// the page asks for nothing else, and nothing here ever sends a photo anywhere.
// The runtime's files are kept cache-first, so the name carries LiteRT.js's version (its lock file's,
// tests/test_web.py checks): a new version is a new cache, and the old one is dropped on activation.
const CACHE = "skin-unet-page-1-litertjs-2.5.3";
// What the first visit fetched before this worker was installed; everything fetched after passes
// through it (app.js waits for it, then reloads once, isolated) and is kept as it goes by.
const SHELL = ["./", "index.html", "app.js", "mask.js", "manifest.webmanifest", "icon.svg",
  "icon-192.png", "icon-512.png", "node_modules/@litertjs/core/dist/index.js",
  "node_modules/@litertjs/wasm-utils/dist/index.js"];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(caches.keys()
    .then((names) => Promise.all(names.filter((n) => n !== CACHE).map((n) => caches.delete(n))))
    .then(() => self.clients.claim()));
});

// app.js: "keep these" (the runtime build in use, the model), if not yet kept; answers "kept".
self.addEventListener("message", (event) => {
  const files = event.data && event.data.keep;
  if (!Array.isArray(files)) return;
  event.waitUntil(caches.open(CACHE).then(async (cache) => {
    for (const file of files) {
      if (new URL(file).origin === location.origin && !(await cache.match(file))) await cache.add(file);
    }
    event.ports[0]?.postMessage("kept");
  }).catch(() => event.ports[0]?.postMessage("failed")));
});

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET" || new URL(request.url).origin !== location.origin) return;
  event.respondWith(respond(request, event));
});

// The runtime's files are pinned by web/package-lock.json: cache first. The rest (page, model,
// review threshold): network first, so a new release shows as soon as the phone is online.
async function respond(request, event) {
  const cache = await caches.open(CACHE);
  const pinned = new URL(request.url).pathname.includes("/node_modules/");
  const kept = () => cache.match(request, {ignoreSearch: request.mode === "navigate"});
  let response = pinned ? await kept() : undefined;
  if (!response) {
    try {
      response = await fetch(request);
      if (response.ok && response.status === 200) event.waitUntil(cache.put(request, response.clone()));
    } catch {
      response = await kept();
      if (!response) return Response.error();
    }
  }
  return isolated(response);
}

// COOP + COEP on every response: the page and its workers become cross-origin isolated.
function isolated(response) {
  if (response.type === "opaque" || response.status === 0) return response;
  const headers = new Headers(response.headers);
  headers.set("Cross-Origin-Opener-Policy", "same-origin");
  headers.set("Cross-Origin-Embedder-Policy", "require-corp");
  return new Response(response.body, {status: response.status, statusText: response.statusText, headers});
}
