// The playground: microphone (and camera) in, streamed speech out, over the OpenAI Realtime
// protocol at /v1/realtime. The server decides turns (server VAD); speaking over a reply
// interrupts it, and the page tells the server how much of the reply was heard.
const RATE = 24000;
const $ = (id) => document.getElementById(id);

// What the browser test (and a curious person) can read.
const stats = (window.iomniStats = {
  playedSamples: 0, responses: 0, transcript: "", ttfaMs: [], events: 0, interrupted: 0,
});

let ws = null;
let micContext = null;
let micStream = null;
let cameraTimer = null;
let speaker = null;

class Speaker {
  // Gapless playback: each chunk is scheduled right after the one before.
  constructor() {
    this.context = new AudioContext({ sampleRate: RATE });
    this.next = 0;
    this.sources = [];
    this.item = null; // the assistant item playing, and when its first sample started
    this.itemStart = 0;
    this.itemSamples = 0;
  }

  play(itemId, pcm16) {
    const samples = new Float32Array(pcm16.length);
    for (let i = 0; i < pcm16.length; i++) samples[i] = pcm16[i] / 32768;
    const buffer = this.context.createBuffer(1, samples.length, RATE);
    buffer.copyToChannel(samples, 0);
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    const now = this.context.currentTime;
    if (this.next < now) this.next = now + 0.03;
    if (this.item !== itemId) {
      this.item = itemId;
      this.itemStart = this.next;
      this.itemSamples = 0;
    }
    source.start(this.next);
    source.onended = () => {
      stats.playedSamples += samples.length;
      $("played").textContent = (stats.playedSamples / RATE).toFixed(1) + " s";
      this.sources = this.sources.filter((s) => s !== source);
    };
    this.sources.push(source);
    this.next += buffer.duration;
    this.itemSamples += samples.length;
  }

  // Barge-in: stop now; returns [item id, ms of it heard] for the truncate event.
  stop() {
    const heard = this.item === null ? 0 : Math.max(0, this.context.currentTime - this.itemStart);
    const total = this.itemSamples / RATE;
    for (const source of this.sources) {
      source.onended = null; // cut short: not counted as played
      source.stop();
    }
    this.sources = [];
    this.next = 0;
    const item = this.item;
    this.item = null;
    return [item, Math.round(Math.min(heard, total) * 1000)];
  }

  playing() {
    return this.sources.length > 0;
  }
}

function log(text) {
  const line = document.createElement("div");
  line.textContent = text;
  $("log").prepend(line);
}

function turn(kind, text) {
  const div = document.createElement("div");
  div.className = "turn " + kind;
  div.textContent = text;
  $("transcript").append(div);
  $("transcript").scrollTop = 1e9;
  return div;
}

function base64(bytes) {
  let binary = "";
  const view = new Uint8Array(bytes);
  for (let i = 0; i < view.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, view.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

const replies = new Map(); // response id -> {div, stoppedAt, first}
let speechStoppedAt = 0;

function onEvent(event) {
  stats.events++;
  switch (event.type) {
    case "session.created":
      $("status").textContent = "listening…";
      break;
    case "conversation.created":
      $("session").textContent = event.conversation.id;
      break;
    case "input_audio_buffer.speech_started": {
      $("status").textContent = "hearing you…";
      if (speaker && speaker.playing()) {
        const [item, ms] = speaker.stop();
        if (item) {
          send({ type: "conversation.item.truncate", item_id: item, content_index: 0, audio_end_ms: ms });
          stats.interrupted++;
        }
      }
      break;
    }
    case "input_audio_buffer.speech_stopped":
      speechStoppedAt = performance.now();
      $("status").textContent = "thinking…";
      break;
    case "input_audio_buffer.committed":
      turn("user", "You spoke (audio)");
      break;
    case "response.created":
      replies.set(event.response.id, { div: turn("assistant", ""), stoppedAt: speechStoppedAt, first: true });
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta": {
      const reply = replies.get(event.response_id);
      if (reply) reply.div.textContent += event.delta;
      stats.transcript += event.delta;
      break;
    }
    case "response.output_audio.delta": {
      const reply = replies.get(event.response_id);
      if (reply && reply.first) {
        reply.first = false;
        if (reply.stoppedAt) {
          const ms = Math.round(performance.now() - reply.stoppedAt);
          stats.ttfaMs.push(ms);
          $("ttfa").textContent = ms + " ms";
        }
        $("status").textContent = "speaking…";
      }
      const raw = atob(event.delta);
      const pcm = new Int16Array(raw.length / 2);
      for (let i = 0; i < pcm.length; i++) {
        pcm[i] = raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8);
      }
      speaker.play(event.item_id, pcm);
      break;
    }
    case "response.done": {
      stats.responses++;
      $("turns").textContent = stats.responses;
      const reply = replies.get(event.response.id);
      if (reply && event.response.status === "cancelled") reply.div.classList.add("interrupted");
      $("status").textContent = "listening…";
      break;
    }
    case "conversation.item.truncated":
      log(`reply cut at ${event.audio_end_ms} ms (what you heard)`);
      break;
    case "error":
      log("error: " + event.error.message);
      break;
  }
  if (!event.type.endsWith(".delta")) log(event.type);
}

async function startMicrophone() {
  micStream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
  });
  micContext = new AudioContext();
  await micContext.audioWorklet.addModule("/static/capture-worklet.js");
  const source = micContext.createMediaStreamSource(micStream);
  const capture = new AudioWorkletNode(micContext, "iomni-capture");
  capture.port.onmessage = (message) => {
    const pcm = new Int16Array(message.data);
    let peak = 0;
    for (let i = 0; i < pcm.length; i += 8) peak = Math.max(peak, Math.abs(pcm[i]));
    $("level").firstElementChild.style.width = Math.min(100, (peak / 16384) * 100) + "%";
    send({ type: "input_audio_buffer.append", audio: base64(message.data) });
  };
  source.connect(capture);
}

async function startCamera() {
  const stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
  $("preview").srcObject = stream;
  const canvas = document.createElement("canvas");
  canvas.width = 640;
  canvas.height = 480;
  cameraTimer = setInterval(() => {
    canvas.getContext("2d").drawImage($("preview"), 0, 0, 640, 480);
    const jpeg = canvas.toDataURL("image/jpeg", 0.7).split(",")[1];
    send({ type: "iomni.input_frame.append", image: jpeg });
  }, 1000);
}

async function connect() {
  const key = $("key").value.trim();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const protocols = ["realtime"];
  if (key) protocols.push("openai-insecure-api-key." + key);
  ws = new WebSocket(`${scheme}://${location.host}/v1/realtime?model=interactiveomni`, protocols);
  speaker = new Speaker();
  ws.onmessage = (message) => onEvent(JSON.parse(message.data));
  ws.onclose = (close) => {
    $("status").textContent = "disconnected" + (close.reason ? ": " + close.reason : "");
    stop();
  };
  ws.onerror = () => log("connection failed (key? server?)");
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    setTimeout(() => reject(new Error("timeout")), 10000);
  });
  await startMicrophone();
  if ($("camera").checked) await startCamera();
  $("connect").textContent = "Stop";
  $("connect").classList.add("live");
}

function stop() {
  if (cameraTimer) clearInterval(cameraTimer);
  cameraTimer = null;
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  if (micContext) micContext.close();
  micStream = micContext = null;
  if (ws && ws.readyState === WebSocket.OPEN) ws.close();
  ws = null;
  $("connect").textContent = "Talk";
  $("connect").classList.remove("live");
}

$("key").value = new URLSearchParams(location.hash.slice(1)).get("key") || localStorage.getItem("iomni-key") || "";
$("key").addEventListener("change", () => localStorage.setItem("iomni-key", $("key").value));
$("connect").addEventListener("click", () => (ws ? stop() : connect().catch((e) => log(String(e)))));
if (new URLSearchParams(location.hash.slice(1)).get("autostart")) connect().catch((e) => log(String(e)));
