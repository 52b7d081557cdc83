"""server/media/jitter_buffer.py: a video frame leaves the receive buffer on its marker bit, not a frame later;
installed on aiortc's receivers (its private attribute checked here), and on the server's camera receiver."""

from __future__ import annotations

import asyncio
import fractions
import statistics
import time
from typing import Any, Optional

import numpy as np
import pytest
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from server.media.jitter_buffer import RECEIVER_ATTRIBUTE, MarkerJitterBuffer, install, install_for_track
from tests.conftest import RtcClient, ServerProcess


def packet(seq: int, ts: int, marker: bool = False, data: bytes = b"") -> RtpPacket:
    p = RtpPacket(payload_type=96, marker=int(marker), sequence_number=seq, timestamp=ts)
    p._data = data or f"{seq}|".encode()  # type: ignore[attr-defined]  # what aiortc's depayloader leaves
    return p


def frame_of(seqs: range) -> bytes:
    return b"".join(f"{s}|".encode() for s in seqs)


def test_a_frame_leaves_on_its_marker_packet() -> None:
    jb = MarkerJitterBuffer()
    assert jb.add(packet(100, 3000))[1] is None
    assert jb.add(packet(101, 3000))[1] is None
    _, frame = jb.add(packet(102, 3000, marker=True))
    assert frame is not None and frame.timestamp == 3000 and frame.data == frame_of(range(100, 103))
    # The next frame does not bring the old one again, and completes on its own marker.
    assert jb.add(packet(103, 6000))[1] is None
    _, frame = jb.add(packet(104, 6000, marker=True))
    assert frame is not None and frame.timestamp == 6000 and frame.data == frame_of(range(103, 105))
    assert (jb.frames_on_marker, jb.frames_on_next) == (2, 0)


def test_stock_buffer_waits_for_the_next_frame() -> None:
    """What the cut is for: aiortc's own buffer holds the same complete frame back."""
    jb = JitterBuffer(capacity=512, is_video=True)
    for seq in (100, 101):
        assert jb.add(packet(seq, 3000))[1] is None
    assert jb.add(packet(102, 3000, marker=True))[1] is None
    _, frame = jb.add(packet(103, 6000))
    assert frame is not None and frame.timestamp == 3000


def test_a_missing_packet_holds_the_frame_until_it_comes() -> None:
    jb = MarkerJitterBuffer()
    jb.add(packet(200, 3000))
    # 201 is lost (or late): the marker packet alone does not make a frame.
    assert jb.add(packet(202, 3000, marker=True))[1] is None
    assert jb.add(packet(203, 6000))[1] is None
    _, frame = jb.add(packet(201, 3000))  # the retransmission arrives
    assert frame is not None and frame.timestamp == 3000 and frame.data == frame_of(range(200, 203))
    _, frame = jb.add(packet(204, 6000, marker=True))
    assert frame is not None and frame.timestamp == 6000 and frame.data == frame_of(range(203, 205))


def test_packets_out_of_order_make_one_frame_in_sequence_order() -> None:
    jb = MarkerJitterBuffer()
    jb.add(packet(300, 9000))  # the frame's first packet sets the origin
    assert jb.add(packet(303, 9000, marker=True))[1] is None
    assert jb.add(packet(302, 9000))[1] is None
    _, frame = jb.add(packet(301, 9000))
    assert frame is not None and frame.data == frame_of(range(300, 304))


def test_a_frame_without_a_marker_still_completes_the_stock_way() -> None:
    jb = MarkerJitterBuffer()
    jb.add(packet(400, 3000))
    assert jb.add(packet(401, 3000))[1] is None  # the sender never sets the marker
    _, frame = jb.add(packet(402, 6000))
    assert frame is not None and frame.timestamp == 3000 and frame.data == frame_of(range(400, 402))
    assert (jb.frames_on_marker, jb.frames_on_next) == (0, 1)
    _, frame = jb.add(packet(403, 6000, marker=True))  # the next one has a marker again
    assert frame is not None and frame.timestamp == 6000 and frame.data == frame_of(range(402, 404))


def test_padding_after_a_marker_is_not_a_frame() -> None:
    jb = MarkerJitterBuffer()
    jb.add(packet(500, 3000, marker=True))
    assert jb.add(packet(501, 3000, data=b"\x00"))[1] is None  # padding with the frame's timestamp
    _, frame = jb.add(packet(502, 6000, marker=True))
    assert frame is not None and frame.timestamp == 6000 and frame.data == frame_of(range(502, 503))
    assert jb.frames_on_next == 0


def test_sequence_numbers_wrap() -> None:
    jb = MarkerJitterBuffer()
    jb.add(packet(65534, 3000))
    jb.add(packet(65535, 3000))
    _, frame = jb.add(packet(0, 3000, marker=True))
    assert frame is not None and frame.data == b"65534|65535|0|"
    _, frame = jb.add(packet(1, 6000, marker=True))
    assert frame is not None and frame.timestamp == 6000


async def test_aiortc_keeps_the_video_buffer_where_install_replaces_it() -> None:
    """Fails loudly when aiortc moves its receiver's jitter buffer (the server would log and keep the stock one)."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    try:
        receiver = pc.addTransceiver("video").receiver
        stock = getattr(receiver, RECEIVER_ATTRIBUTE)
        assert type(stock) is JitterBuffer and stock.capacity == 512
        buffer = install(receiver)
        assert getattr(receiver, RECEIVER_ATTRIBUTE) is buffer and buffer.capacity == stock.capacity
        assert install(receiver) is buffer
    finally:
        await pc.close()


class _Camera:
    """A video track at a low frame rate that notes when each frame went to the encoder."""

    def __init__(self, fps: float) -> None:
        from aiortc.mediastreams import VideoStreamTrack

        self.sent: dict[int, float] = {}
        camera = self

        class Track(VideoStreamTrack):
            async def recv(self) -> Any:
                from av import VideoFrame

                n = len(camera.sent)
                await asyncio.sleep(1 / fps if n else 0)
                img = np.full((96, 128, 3), (n * 23) % 256, dtype=np.uint8)
                frame = VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts, frame.time_base = n * 3000, fractions.Fraction(1, 90_000)
                camera.sent[n] = time.monotonic()
                return frame

        self.track = Track()


async def _receive_delays(marker: bool, fps: float = 4.0, frames: int = 8) -> tuple[list[float], Optional[MarkerJitterBuffer]]:
    """Two aiortc peers over loopback; the receiving one's buffer installed as the server does. Returns
    each received frame's delay from its encode to its decode, and the installed buffer."""
    from aiortc import RTCPeerConnection
    from aiortc.mediastreams import MediaStreamError

    sender, receiver = RTCPeerConnection(), RTCPeerConnection()
    camera = _Camera(fps)
    delays: list[float] = []
    installed: list[MarkerJitterBuffer] = []
    done = asyncio.Event()

    def on_track(track: Any) -> None:
        if marker:
            buffer = install_for_track(receiver, track)
            assert buffer is not None
            installed.append(buffer)

        async def receive() -> None:
            first_pts: Optional[int] = None
            while len(delays) < frames:
                try:
                    f = await track.recv()
                except MediaStreamError:
                    return
                first_pts = f.pts if first_pts is None else first_pts
                n = round((f.pts - first_pts) / 3000)  # RTP's clock may round the pts by a tick
                delays.append(time.monotonic() - camera.sent[n])
            done.set()

        asyncio.ensure_future(receive())

    receiver.on("track", on_track)
    sender.addTrack(camera.track)
    try:
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await sender.close()
        await receiver.close()
    return delays[1:], installed[0] if installed else None  # the first frame waits for the connection


@pytest.mark.parametrize("marker", [True, False], ids=["marker", "stock"])
async def test_over_loopback_a_frame_is_decoded_before_the_next_is_sent(marker: bool) -> None:
    """At 4 fps the stock buffer holds each frame until the next one's first packet (~250 ms later);
    ours hands it on at once. The stock case runs too, so the test shows it can tell them apart."""
    delays, buffer = await _receive_delays(marker)
    median = statistics.median(delays)
    if marker:
        assert buffer is not None and buffer.frames_on_marker >= len(delays) and buffer.frames_on_next == 0
        assert median < 0.125, delays
    else:
        assert median > 0.2, delays


async def test_the_servers_camera_receiver_completes_frames_on_the_marker(server: ServerProcess, rtc_clients) -> None:
    client: RtcClient = rtc_clients()
    sid = await client.connect(width=160, height=120, fps=10)
    await client.wait_for(lambda: len(client.frames) >= 2, 90, "generated frames")
    assert f"session {sid}: the camera's receiver completes frames on the RTP marker bit" in server.log.read_text()
