// Line charts drawn on a canvas by hand: a few dozen lines instead of a
// vendored chart library (no licence to carry, nothing to update, and the
// console's Content-Security-Policy stays 'self' only).

const PAD = { left: 48, right: 10, top: 10, bottom: 20 };

/** A chart of one or more series over the last `capacity` samples. */
export class LineChart {
  constructor(canvas, series, capacity = 120) {
    this.canvas = canvas;
    this.series = series; // [{ name, color }]
    this.capacity = capacity;
    this.data = series.map(() => []);
  }

  /** Adds one sample per series (null: no value, drawn as a gap). */
  push(values) {
    values.forEach((v, i) => {
      const d = this.data[i];
      d.push(v);
      if (d.length > this.capacity) d.shift();
    });
    this.canvas.dataset.points = String(this.data.reduce((n, d) => n + d.filter((v) => v !== null).length, 0));
    this.draw();
  }

  draw() {
    const c = this.canvas.getContext("2d");
    const { width: w, height: h } = this.canvas;
    c.clearRect(0, 0, w, h);
    const all = this.data.flat().filter((v) => v !== null && Number.isFinite(v));
    const max = niceMax(Math.max(this.floor ?? 1, ...all));
    const x = (i) => PAD.left + ((w - PAD.left - PAD.right) * i) / (this.capacity - 1);
    const y = (v) => h - PAD.bottom - ((h - PAD.top - PAD.bottom) * v) / max;
    c.font = "11px system-ui, sans-serif";
    c.fillStyle = "#6e6e73";
    c.strokeStyle = "#e5e5ea";
    c.lineWidth = 1;
    for (let k = 0; k <= 4; k++) {
      const v = (max * k) / 4;
      c.beginPath();
      c.moveTo(PAD.left, y(v));
      c.lineTo(w - PAD.right, y(v));
      c.stroke();
      c.fillText(format(v), 4, y(v) + 4);
    }
    c.fillText(`${this.capacity} s`, PAD.left, h - 4);
    c.fillText("now", w - PAD.right - 20, h - 4);
    this.data.forEach((d, s) => {
      const offset = this.capacity - d.length;
      c.strokeStyle = this.series[s].color;
      c.lineWidth = 2;
      c.beginPath();
      let pen = false;
      d.forEach((v, i) => {
        if (v === null || !Number.isFinite(v)) {
          pen = false;
          return;
        }
        if (pen) c.lineTo(x(offset + i), y(v));
        else c.moveTo(x(offset + i), y(v));
        pen = true;
      });
      c.stroke();
      const last = d.findLast((v) => v !== null);
      if (last !== undefined) {
        c.fillStyle = this.series[s].color;
        c.fillText(format(last), w - PAD.right - 60, PAD.top + 12 + 14 * s);
      }
    });
  }
}

function niceMax(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 4, 8, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function format(v) {
  if (v >= 1000) return `${(v / 1000).toFixed(1)}k`;
  if (v >= 10 || v === 0) return v.toFixed(0);
  return v.toPrecision(2);
}
