"""The WebRTC server end to end: the real server and its engine on one
GPU, one aiortc client sending a synthetic 30 fps camera over loopback, the generated video coming
back. Reports TTFF, per-frame latency (mean/p50/p95/p99), jitter p99, the miss rate at the 1.0 s
deadline, FPS in/out, drops and engine stage times.

    python -m bench.server_bench --json out/server_bench.json            # GPU: wan-1.3b, 512², 1 step, 60 s
    python -m bench.server_bench --model tiny --devices cpu --duration 15 --json /tmp/sb.json

How it works:
- starts `python -m server --model M --devices D --host 127.0.0.1 --port P --config CFG` in its own
  process group (CFG, a JSON file, sets height/width/deadline: the CLI has no flags for them),
  logs to --log, and waits for /healthz (the engine warms up first);
- optionally (--prewarm S, default 5) streams a throwaway session for S seconds, because the
  engine's own warm-up runs the model's default step count and a 1-step session has other shapes;
  server counters are then taken as differences from after the pre-warm;
- connects one client (POST /api/offer with `params.steps`) with a `control` data channel, sends
  a camera (moving stripes and a frame counter drawn as blocks) at --fps for --duration seconds
  and records every generated frame that comes back;
- polls GET /api/sessions/{id} every 0.5 s: its `latency_seq` / `recent_latency_ms` let the whole
  series of per-frame server latencies (camera frame arrival -> generated frame handed to the
  encoder, matched by pts inside the server) be rebuilt, not only the server's last-600 window;
- client side: TTFF (first frame handed to our encoder -> first generated frame decoded) and an
  end-to-end latency per frame. The server carries each frame's pts through to its output, and
  RTP keeps pts differences, so the client tags its frames with pts n*step + 10*c_n (c_n a seeded
  random digit, < 1 ms) and finds the one offset that maps the received pts onto the sent ones;
- at the end reads the final session stats and /metrics (Prometheus text);
- breaks each frame's time down, camera to client decoder, by stage (bench/server_bench/breakdown.py:
  the server's per-frame stage stamps, polled with the latencies, matched to the camera's frames by pts;
  client and server share CLOCK_MONOTONIC on one host): upstream, chunk fill, engine, server output,
  pacing wait, downstream. Per frame the stages add up to its client end-to-end latency.

Where the numbers differ: the server's latency runs from a camera frame's arrival at the server to
the generated frame being handed to its encoder. The client's adds both encodes, decodes and the
transport and both receive jitter buffers. The server's camera receiver, and by default the client's,
completes a frame on its RTP marker bit as a browser's does (server/media/jitter_buffer.py);
--stock-receiver gives the client aiortc's own, which releases a frame only when the first packet of
the next one arrives (a frame interval later, more after a chunk's last frame).

Everything goes to --json; a short table and the breakdown (stage, p50, p99, mean ms) are printed last. A hard timeout bounds the whole run and
the server's process group is killed on every exit path.
"""


class BenchError(RuntimeError):
    """The run cannot go on (the server failed, a session was refused or ended, a timeout)."""
