// The browser client: a video file or the webcam, streamed as JPEG frames at the chosen fps to a
// session, questions answered token by token, a status line and multiple-choice results.
// Transport: a WebSocket; plain HTTP (POST frames, questions read as server-sent events) when the
// server routes sessions by header (Ray Serve: a browser cannot set headers on a WebSocket) or
// when the page is opened with ?transport=http.
"use strict";

const $ = (id) => document.getElementById(id);
const MAGIC = [0x56, 0x53, 0x46, 0x31]; // "VSF1"
const HEADER_BYTES = 28;
const MAX_SIDE = 640; // frames are scaled down to this many pixels on their longer side
const page = {
  sid: null, ws: null, transport: "ws", routeHeader: null, key: "", fps: 2, nextK: 0, lastT: -1,
  sending: false, live: false, started: 0, webcam: null, questions: 0, sent: 0, localSkips: 0,
};

function headers(extra = {}) {
  const h = { ...extra };
  if (page.key) h["Authorization"] = "Bearer " + page.key;
  if (page.routeHeader && page.sid) h[page.routeHeader] = page.sid;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function frameRecord(t, payload) {
  const buffer = new ArrayBuffer(HEADER_BYTES + payload.byteLength);
  const view = new DataView(buffer);
  MAGIC.forEach((b, i) => view.setUint8(i, b));
  view.setUint8(4, 1); // 1 = JPEG/PNG
  view.setFloat64(8, t, true);
  view.setUint32(16, 0, true);
  view.setUint32(20, 0, true);
  view.setUint32(24, payload.byteLength, true);
  new Uint8Array(buffer, HEADER_BYTES).set(new Uint8Array(payload));
  return buffer;
}

// ------------------------------------------------------------------ session and transport
async function start() {
  page.key = $("apikey").value.trim();
  page.fps = Math.max(0.1, Math.min(30, parseFloat($("fps").value) || 2));
  const info = await (await api("/v1/info")).json();
  page.routeHeader = info.route_header;
  const wanted = new URLSearchParams(location.search).get("transport");
  page.transport = page.routeHeader || wanted === "http" ? "http" : "ws";
  $("transport").textContent = page.transport === "ws" ? "WebSocket" : "HTTP + server-sent events";
  const settings = { fps: page.fps };
  if ($("budget").value) settings.cache_budget_tokens = parseInt($("budget").value, 10);
  const created = await (await api("/v1/sessions", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(settings),
  })).json();
  page.sid = created.id;
  if (page.transport === "ws") await connect();
  else pollStatus();
  page.nextK = 0; page.lastT = -1; page.live = true; page.started = performance.now();
  $("askbtn").disabled = false; $("stop").disabled = false; $("start").disabled = true;
  const video = $("video");
  await video.play();
  if ("requestVideoFrameCallback" in video) {
    const onFrame = (now, meta) => { capture(meta.mediaTime); if (page.live) video.requestVideoFrameCallback(onFrame); };
    video.requestVideoFrameCallback(onFrame);
  } else {
    page.timer = setInterval(() => capture(video.currentTime), 250 / page.fps);
  }
}

function connect() {
  return new Promise((resolve, reject) => {
    const url = new URL("/v1/sessions/" + page.sid + "/stream", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const protocols = ["vsq.v1"].concat(page.key ? ["bearer." + page.key] : []);
    const ws = new WebSocket(url, protocols);
    ws.binaryType = "arraybuffer";
    ws.onmessage = (m) => handle(JSON.parse(m.data));
    ws.onopen = () => resolve();
    ws.onerror = () => reject(new Error("the WebSocket failed"));
    ws.onclose = (e) => { if (page.ws === ws) { page.ws = null; showStatus("disconnected (" + e.code + ")"); } };
    page.ws = ws;
  });
}

async function pollStatus() {
  while (page.sid && page.transport === "http") {
    try { handle((await (await api("/v1/sessions/" + page.sid)).json()).status); } catch (e) { showStatus(e.message); }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function stop() {
  page.live = false;
  clearInterval(page.timer);
  $("video").pause();
  if (page.webcam) page.webcam.getTracks().forEach((t) => t.stop());
  $("stop").disabled = true;
  $("start").disabled = !($("video").src || $("video").srcObject);
}

// ------------------------------------------------------------------ frames
function capture(mediaTime) {
  const video = $("video");
  if (!page.live || video.readyState < 2) return;
  const t = page.webcam ? (performance.now() - page.started) / 1000 : mediaTime;
  if (t <= page.lastT || t + 1e-6 < page.nextK / page.fps) return; // the server's rule: first frame at/after k/fps
  if (page.sending || (page.ws && page.ws.bufferedAmount > 4 * 1024 * 1024)) { page.localSkips++; return; }
  page.lastT = t;
  page.nextK = Math.floor((t + 1e-6) * page.fps) + 1;
  const scale = Math.min(1, MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(video.videoWidth * scale);
  canvas.height = Math.round(video.videoHeight * scale);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  page.sending = true;
  canvas.toBlob(async (blob) => {
    try {
      const record = frameRecord(t, await blob.arrayBuffer());
      if (page.transport === "ws" && page.ws) page.ws.send(record);
      else if (page.transport === "http") await api("/v1/sessions/" + page.sid + "/frames", { method: "POST", body: record });
      page.sent++;
    } catch (e) {
      showStatus("sending a frame failed: " + e.message);
    } finally {
      page.sending = false;
    }
  }, "image/jpeg", 0.85);
}

// ------------------------------------------------------------------ questions
async function ask() {
  const text = $("question").value.trim();
  if (!text || !page.sid) return;
  const choices = $("choices").value.split("\n").map((c) => c.trim()).filter((c) => c);
  const id = "q" + (++page.questions);
  const msg = { type: "question", id: id, text: text, max_new_tokens: parseInt($("maxtokens").value, 10) || 64 };
  if (choices.length >= 2) msg.choices = choices;
  const box = document.createElement("div");
  box.className = "answer"; box.id = "answer-" + id; box.dataset.state = "waiting";
  const q = document.createElement("div"); q.className = "q"; q.textContent = text;
  const a = document.createElement("div"); a.className = "a";
  const meta = document.createElement("div"); meta.className = "meta";
  box.append(q, a, meta);
  $("answers").prepend(box);
  if (page.transport === "ws" && page.ws) { page.ws.send(JSON.stringify(msg)); return; }
  try {
    const response = await api("/v1/sessions/" + page.sid + "/questions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(msg),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffered.indexOf("\n\n")) >= 0) {
        const block = buffered.slice(0, cut); buffered = buffered.slice(cut + 2);
        const data = block.split("\n").find((line) => line.startsWith("data: "));
        if (data) handle(JSON.parse(data.slice(6)));
      }
    }
  } catch (e) {
    handle({ type: "error", id: id, code: "request", message: e.message });
  }
}

// ------------------------------------------------------------------ events
function handle(event) {
  const box = event.id ? $("answer-" + event.id) : null;
  switch (event.type) {
    case "session": handle(event.status); break;
    case "status": showStatus(statusLine(event), event); break;
    case "response.text.delta":
      if (box) { box.dataset.state = "streaming"; box.querySelector(".a").textContent += event.delta; }
      break;
    case "response.done":
      if (box) {
        box.querySelector(".a").textContent = event.text; // the whole answer (equal to the deltas joined)
        box.querySelector(".meta").textContent =
          `TTFT ${(event.ttft_s * 1000).toFixed(0)} ms · ${event.tokens} tokens · saw ${event.seen.frames} frames ` +
          `up to ${fmt(event.seen.until_s)} s (kept ${fmt(event.seen.kept_video_seconds)} s, evicted ` +
          `${fmt(event.seen.evicted_seconds)} s${event.seen.recalled.length ? ", recalled " + event.seen.recalled.length : ""})`;
        box.dataset.tokens = event.tokens;
        box.dataset.state = "done";
      }
      break;
    case "response.choice":
      if (box) {
        const a = box.querySelector(".a");
        a.textContent = "";
        const probs = softmax(event.scores);
        event.choices.forEach((choice, i) => {
          const row = document.createElement("div");
          row.className = "bar" + (i === event.index ? " best" : "");
          const fill = document.createElement("span"); fill.className = "fill";
          fill.style.width = Math.max(2, Math.round(probs[i] * 200)) + "px";
          const label = document.createElement("span");
          label.textContent = `${choice} (${(probs[i] * 100).toFixed(1)}%)`;
          row.append(fill, label);
          a.append(row);
        });
        box.dataset.best = event.best;
        box.querySelector(".meta").textContent = `best: ${event.best} · ${(event.total_s * 1000).toFixed(0)} ms`;
        box.dataset.state = "done";
      }
      break;
    case "response.cancelled":
      if (box) { box.dataset.state = "cancelled"; box.querySelector(".meta").textContent = "cancelled"; }
      break;
    case "error":
      if (box) { box.dataset.state = "error"; box.querySelector(".a").textContent = event.message; }
      else showStatus("error: " + event.message);
      break;
    case "closed": showStatus("session closed: " + event.reason); break;
  }
}

function softmax(scores) {
  const top = Math.max(...scores);
  const e = scores.map((s) => Math.exp(s - top));
  const sum = e.reduce((x, y) => x + y, 0);
  return e.map((x) => x / sum);
}

function fmt(x) { return x === null || x === undefined ? "-" : Number(x).toFixed(1); }

function statusLine(s) {
  return `session ${page.sid} · video ${fmt(s.newest_frame_s)} s · frames ${s.frames_received} received, ` +
    `${s.frames_ingested} ingested, ${s.frames_dropped} dropped, ${s.frames_skipped} skipped · ` +
    `lag ${fmt(s.ingest_lag_s)} s · cache ${s.cache_tokens} tokens · evicted ${fmt(s.evicted_seconds)} s`;
}

function showStatus(text, s) {
  const el = $("status");
  el.textContent = text;
  if (s) { el.dataset.frames = s.frames_received; el.dataset.ingested = s.frames_ingested; }
}

// ------------------------------------------------------------------ wiring
$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (!file) return;
  page.webcam = null;
  $("video").srcObject = null;
  $("video").src = URL.createObjectURL(file);
  $("start").disabled = false;
});
$("webcam").addEventListener("click", async () => {
  try {
    page.webcam = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    $("video").src = "";
    $("video").srcObject = page.webcam;
    $("start").disabled = false;
  } catch (e) {
    showStatus("webcam: " + e.message);
  }
});
$("start").addEventListener("click", () => start().catch((e) => { showStatus("could not start: " + e.message); stop(); }));
$("stop").addEventListener("click", stop);
$("askbtn").addEventListener("click", ask);
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter") ask(); });
$("video").addEventListener("ended", () => { page.live = false; $("stop").disabled = true; });
