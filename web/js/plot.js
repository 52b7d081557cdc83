// A small rolling plot of per-frame latency with the deadline drawn across it.

const MAX_POINTS = 300;

export class LatencyPlot {
  constructor(canvas) {
    this.canvas = canvas;
    this.points = [];
    this.lastSeq = 0;
    this.deadline = 1000;
  }

  // stats: the server's stats message; appends only the samples not seen yet.
  add(stats) {
    this.deadline = stats.deadline_ms ?? this.deadline;
    const fresh = Math.min(stats.latency_seq - this.lastSeq, stats.recent_latency_ms.length);
    if (stats.latency_seq < this.lastSeq) this.points = []; // a new session
    if (fresh > 0) this.points.push(...stats.recent_latency_ms.slice(-fresh));
    this.lastSeq = stats.latency_seq;
    if (this.points.length > MAX_POINTS) this.points.splice(0, this.points.length - MAX_POINTS);
    this.draw();
  }

  reset() {
    this.points = [];
    this.lastSeq = 0;
    this.draw();
  }

  draw() {
    const { canvas } = this;
    const ctx = canvas.getContext('2d');
    const w = canvas.width;
    const h = canvas.height;
    ctx.clearRect(0, 0, w, h);
    const top = Math.max(this.deadline * 1.25, ...this.points, 100);
    const y = (ms) => h - 14 - (ms / top) * (h - 24);

    ctx.font = '11px system-ui, sans-serif';
    ctx.fillStyle = '#8b94a3';
    ctx.fillText(`${Math.round(top)} ms`, 6, 12);
    ctx.fillText('0', 6, h - 4);

    ctx.strokeStyle = '#ff6b6b';
    ctx.setLineDash([5, 4]);
    ctx.beginPath();
    ctx.moveTo(0, y(this.deadline));
    ctx.lineTo(w, y(this.deadline));
    ctx.stroke();
    ctx.setLineDash([]);

    if (this.points.length < 2) return;
    ctx.strokeStyle = '#4f8cff';
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    // Fill the width once there are enough points; until then grow from the left.
    const step = w / (Math.max(this.points.length, 60) - 1);
    this.points.forEach((ms, i) => {
      const x = i * step;
      if (i === 0) ctx.moveTo(x, y(ms)); else ctx.lineTo(x, y(ms));
    });
    ctx.stroke();
  }
}
