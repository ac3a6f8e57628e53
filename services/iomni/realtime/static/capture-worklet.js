// Microphone capture: the audio thread resamples to 24 kHz and posts 40 ms PCM16 chunks.
const RATE = 24000;
const CHUNK = 960; // 40 ms at 24 kHz

class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / RATE; // input samples per output sample
    this.position = 0; // fractional read position into `this.input`
    this.input = new Float32Array(0);
    this.out = new Int16Array(CHUNK);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    const joined = new Float32Array(this.input.length + channel.length);
    joined.set(this.input);
    joined.set(channel, this.input.length);
    let pos = this.position;
    while (pos + 1 < joined.length) {
      const i = Math.floor(pos);
      const frac = pos - i;
      const sample = joined[i] * (1 - frac) + joined[i + 1] * frac; // linear interpolation
      this.out[this.filled++] = Math.max(-32768, Math.min(32767, Math.round(sample * 32767)));
      if (this.filled === CHUNK) {
        this.port.postMessage(this.out.buffer.slice(0));
        this.filled = 0;
      }
      pos += this.step;
    }
    const keep = Math.floor(pos);
    this.input = joined.slice(keep);
    this.position = pos - keep;
    return true;
  }
}

registerProcessor("iomni-capture", Capture);
