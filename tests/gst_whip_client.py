"""A WHIP publisher and a WHEP viewer built on GStreamer's webrtcbin, run by the system python3 (it
needs PyGObject and GStreamer's introspection data, which the venv does not have).

Debian's GStreamer 1.22 has no `whipsink`/`whepsrc` (gst-plugins-rs is not packaged), so this does
what they would do: webrtcbin makes the offer with every ICE candidate in it, the offer is POSTed
with urllib, the answer set. The publisher sends H.264 (x264enc) + Opus from test sources; the
viewer receives the session's output through `POST /whep/{session}` and counts decoded frames.

Prints one JSON report on stdout and exits 0 when `--frames` frames came back, 1 otherwise; every
wait is bounded by `--timeout`. Used by tests/test_gstreamer_whip.py; also a usable client:
`python3 tests/gst_whip_client.py --url http://127.0.0.1:8080 --token TOKEN --frames 30`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
from gi.repository import Gst, GstSdp, GstWebRTC  # noqa: E402

log = logging.getLogger("gst_whip_client")

# webrtcbin 1.22 writes an H.264 fmtp line (packetization-mode=1, which WebRTC peers require) only
# from caps set like this after the payloader, not from the caps the payloader negotiates.
PUBLISH = (
    "webrtcbin name=rtc bundle-policy=max-bundle "
    "videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},framerate={fps}/1 "
    "! videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} bitrate=600 "
    "! video/x-h264,profile=constrained-baseline ! rtph264pay config-interval=-1 aggregate-mode=zero-latency "
    "! application/x-rtp,media=video,encoding-name=H264,payload=102,clock-rate=90000,"
    "packetization-mode=(string)1 ! rtc. "
    "audiotestsrc is-live=true wave=sine ! audioconvert ! audioresample ! opusenc ! rtpopuspay "
    "! application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000 ! rtc."
)
# What the publisher and the viewer use; `--check` reports the missing ones (the Debian packages are
# installed by `make gstreamer`).
ELEMENTS = ("webrtcbin", "nicesrc", "dtlssrtpenc", "srtpenc", "videotestsrc", "x264enc", "rtph264pay",
            "audiotestsrc", "opusenc", "rtpopuspay", "decodebin", "avdec_h264", "vp8dec")
VIEWER_CAPS = (
    "application/x-rtp,media=video,encoding-name=H264,payload=102,clock-rate=90000,"
    "packetization-mode=(string)1,profile-level-id=(string)42e01f;"
    "application/x-rtp,media=video,encoding-name=VP8,payload=96,clock-rate=90000"
)


@dataclass
class Report:
    whip_status: int = 0
    whep_status: int = 0
    session_id: str = ""
    answer_setup: list[str] = field(default_factory=list)
    publisher_state: str = ""
    viewer_state: str = ""
    session_kind: str = ""
    session_frames_out: int = 0
    frames: int = 0
    frame_size: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Peer:
    """One webrtcbin in its own pipeline, driven synchronously (promises are waited on)."""

    def __init__(self, description: str, name: str) -> None:
        self.name = name
        parsed = Gst.parse_launch(description)
        if isinstance(parsed, Gst.Pipeline):
            self.pipeline = parsed
        else:  # a description of one element parses to that element alone
            self.pipeline = Gst.Pipeline.new(name)
            self.pipeline.add(parsed)
        self.rtc = self.pipeline.get_by_name("rtc")
        self.gathered = threading.Event()
        self.rtc.connect("notify::ice-gathering-state", self._on_gathering)

    def _on_gathering(self, rtc: Any, _pspec: Any) -> None:
        if rtc.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            self.gathered.set()

    def offer(self, timeout: float) -> str:
        """Create the offer, set it locally and return it once ICE gathering is complete (WHIP has
        no trickle here, so the offer carries every candidate)."""
        self.pipeline.set_state(Gst.State.PLAYING)
        promise = Gst.Promise.new()
        self.rtc.emit("create-offer", None, promise)
        if promise.wait() != Gst.PromiseResult.REPLIED:
            raise RuntimeError(f"{self.name}: create-offer gave no reply")
        reply = promise.get_reply()  # kept in a variable: the offer lives inside it
        offer = reply.get_value("offer")
        if offer is None or offer.sdp is None:
            raise RuntimeError(f"{self.name}: create-offer failed: {reply.to_string()}")
        self.rtc.emit("set-local-description", offer, None)
        if not self.gathered.wait(timeout):
            raise RuntimeError(f"{self.name}: ICE gathering did not complete in {timeout:.0f} s")
        return self.rtc.get_property("local-description").sdp.as_text()

    def answer(self, sdp: str) -> None:
        ok, message = GstSdp.SDPMessage.new_from_text(sdp)
        if ok != GstSdp.SDPResult.OK:
            raise RuntimeError(f"{self.name}: the answer does not parse as SDP")
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, message)
        self.rtc.emit("set-remote-description", answer, None)

    def state(self) -> str:
        return self.rtc.get_property("connection-state").value_nick

    def errors(self) -> list[str]:
        bus, found = self.pipeline.get_bus(), []
        while (msg := bus.pop_filtered(Gst.MessageType.ERROR)) is not None:
            err, debug = msg.parse_error()
            found.append(f"{self.name}: {msg.src.get_name()}: {err.message} ({debug})")
        return found

    def stop(self) -> None:
        self.pipeline.set_state(Gst.State.NULL)


class Viewer(Peer):
    """A recvonly webrtcbin whose incoming video is decoded and counted."""

    def __init__(self) -> None:
        super().__init__("webrtcbin name=rtc bundle-policy=max-bundle", "viewer")
        self.frames = 0
        self.size: list[int] = []
        self.rtc.emit("add-transceiver", GstWebRTC.WebRTCRTPTransceiverDirection.RECVONLY,
                      Gst.Caps.from_string(VIEWER_CAPS))
        self.rtc.connect("pad-added", self._on_rtc_pad)

    def _on_rtc_pad(self, _rtc: Any, pad: Gst.Pad) -> None:
        if pad.get_direction() != Gst.PadDirection.SRC:
            return
        decode = Gst.ElementFactory.make("decodebin")
        decode.connect("pad-added", self._on_decoded_pad)
        self.pipeline.add(decode)
        decode.sync_state_with_parent()
        pad.link(decode.get_static_pad("sink"))

    def _on_decoded_pad(self, _decode: Any, pad: Gst.Pad) -> None:
        if not pad.get_current_caps().to_string().startswith("video/x-raw"):
            return
        sink = Gst.ElementFactory.make("fakesink")
        sink.set_property("signal-handoffs", True)
        sink.set_property("sync", False)
        sink.connect("handoff", self._on_frame)
        self.pipeline.add(sink)
        sink.sync_state_with_parent()
        pad.link(sink.get_static_pad("sink"))

    def _on_frame(self, _sink: Any, _buffer: Gst.Buffer, pad: Gst.Pad) -> None:
        self.frames += 1
        if not self.size:
            s = pad.get_current_caps().get_structure(0)
            self.size = [s.get_value("width"), s.get_value("height")]


def missing_elements() -> list[str]:
    return [name for name in ELEMENTS if Gst.ElementFactory.find(name) is None]


def http(method: str, url: str, body: Optional[str], token: Optional[str], timeout: float) -> tuple[int, dict, str]:
    headers = {"Content-Type": "application/sdp"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = body.encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode(errors="replace")


def wait(predicate: Callable[[], bool], deadline: float, peers: list[Peer], report: Report) -> bool:
    """Poll until `predicate`, a pipeline error or `deadline`; errors go into the report."""
    while time.monotonic() < deadline:
        for peer in peers:
            report.errors += peer.errors()
        if predicate():
            return True
        if report.errors or any(p.state() == "failed" for p in peers):
            return False
        time.sleep(0.1)
    return False


def setups(sdp: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in sdp.splitlines() if line.startswith("a=setup:")]


def run(args: argparse.Namespace, report: Report) -> bool:
    deadline = time.monotonic() + args.timeout

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    publisher = Peer(PUBLISH.format(width=args.width, height=args.height, fps=args.fps), "publisher")
    for index in range(2):  # a WHIP publisher only sends
        transceiver = publisher.rtc.emit("get-transceiver", index)
        transceiver.set_property("direction", GstWebRTC.WebRTCRTPTransceiverDirection.SENDONLY)
    peers: list[Peer] = [publisher]
    try:
        status, headers, body = http("POST", f"{args.url}/whip", publisher.offer(left()), args.token, left())
        report.whip_status = status
        if status != 201:
            report.errors.append(f"POST /whip answered {status}: {body[:300]}")
            return False
        report.answer_setup = setups(body)
        report.session_id = headers["Location"].rsplit("/", 1)[-1]
        publisher.answer(body)
        connected = wait(lambda: publisher.state() == "connected", deadline, peers, report)
        report.publisher_state = publisher.state()
        if not connected:
            return False

        viewer = Viewer()
        peers.append(viewer)
        status, headers, body = http("POST", f"{args.url}/whep/{report.session_id}", viewer.offer(left()),
                                     args.token, left())
        report.whep_status = status
        if status != 201:
            report.errors.append(f"POST /whep answered {status}: {body[:300]}")
            return False
        viewer.answer(body)
        done = wait(lambda: viewer.frames >= args.frames, deadline, peers, report)
        report.viewer_state, report.frames, report.frame_size = viewer.state(), viewer.frames, viewer.size
        status, _, body = http("GET", f"{args.url}/api/sessions/{report.session_id}", None, args.token, 10)
        if status == 200:  # what the server says it sent, next to what came back
            info = json.loads(body)
            report.session_kind, report.session_frames_out = info["kind"], info["stats"]["frames_out"]
        http("DELETE", args.url + headers["Location"], None, args.token, 10)
        return done
    finally:
        if report.session_id:
            http("DELETE", f"{args.url}/whip/{report.session_id}", None, args.token, 10)
        for peer in peers:
            peer.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="the server's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--check", action="store_true", help="only check that the GStreamer elements exist")
    parser.add_argument("--token", default=None, help="Bearer token for WHIP/WHEP (default: none)")
    parser.add_argument("--frames", type=int, default=10, help="decoded WHEP frames to wait for (default 10)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds for the whole run (default 120)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    Gst.init(None)
    if args.check:
        missing = missing_elements()
        print("missing GStreamer elements: " + " ".join(missing) if missing else "ok")
        return 1 if missing else 0
    if not args.url:
        parser.error("--url is required")
    report = Report()
    try:
        ok = run(args, report)
    except Exception as exc:  # reported, not raised: the caller reads the JSON report
        report.errors.append(f"{type(exc).__name__}: {exc}")
        ok = False
    print(json.dumps(asdict(report)))
    log.info("%s: %d frames back", "ok" if ok else "failed", report.frames)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
