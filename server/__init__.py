"""The server process: aiohttp + aiortc signaling, sessions, media tracks, pacing, metrics, web UI;
WHIP ingest and WHEP egress (OBS), recordings, restreams and the virtual camera (docs/OBS.md).

It never imports torch: the engine runs in its own process (engine/worker.py) and the two meet in
`interface` (pydantic messages + shared-memory frame rings).
"""
