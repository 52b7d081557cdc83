"""Capacity of one server on one GPU (issue #21): N aiortc clients at once, each a camera (default
640x480 at 30 fps), for N = 1..6; per session the output fps, the client-measured latency p50/p99
(pts-matched), jitter p99 and drops. An N passes when every session holds the SLO (default 30 fps,
p99 <= 300 ms); the row's figure is the largest N up to which every N passed.

    python -m bench.capacity --json out/capacity-512-1step-wan.json                  # GPU, 512², 1 step, Wan VAE
    python -m bench.capacity --height 480 --width 832 --steps 2 --decoder taehv --json out/cap.json
    python -m bench.capacity --model tiny --devices cpu --n 1-2 --duration 10 --fps 12 --camera 320x240 \\
        --slo-fps 1 --slo-p99-ms 5000                                                 # CPU smoke run

One server serves the whole row (one model, size, step count, encoder and decoder): it is started
with --max-sessions set to the largest N, the SLO's frame rate as its target (the engine batches
sessions by it) and admission control off (the benchmark measures what the server can hold;
admission is the server's guess of it). After an optional pre-warm session, each N streams N clients
at once for --duration seconds, their first --warmup seconds of output excluded, then ends them and
waits until the server lists no session. The N-loop stops at the first N that fails (--keep-going runs the rest). Everything goes to
--json; the table and the row's figure are printed last. The client-side measurements are the ones
of bench.server_bench (bench/server_bench/__init__.py says how pts matching works).
"""
