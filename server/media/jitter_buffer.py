"""A video jitter buffer that hands a frame to the decoder as soon as it is complete (docs/ARCHITECTURE.md §8).

aiortc's `JitterBuffer` knows a frame is complete only when a packet of the next frame arrives, so
every aiortc receiver holds each frame back by one frame interval. Senders (browsers, OBS, aiortc
itself) set the RTP marker bit on a frame's last packet, as browsers' receivers rely on: this buffer
also completes a frame when the packets from its origin up to one with the marker bit are all there
and share one timestamp. Anything else (a gap, a frame sent without a marker) goes the stock way.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpreceiver import RTCRtpReceiver

log = logging.getLogger(__name__)

# aiortc keeps a receiver's buffer in this name-mangled attribute, made in RTCRtpReceiver.__init__.
RECEIVER_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"
VIDEO_CAPACITY = 512  # aiortc's own for video


class ReceiverInternalsChanged(RuntimeError):
    """aiortc no longer keeps its video jitter buffer where this module replaces it."""


class MarkerJitterBuffer(JitterBuffer):
    def __init__(self, capacity: int = VIDEO_CAPACITY) -> None:
        super().__init__(capacity=capacity, prefetch=0, is_video=True)
        self._emitted_timestamp: Optional[int] = None
        self.frames_on_marker = 0  # frames completed by their marker bit
        self.frames_on_next = 0  # frames completed the stock way (a packet of the next frame)

    def _remove_frame(self, sequence_number: int) -> Optional[JitterFrame]:
        self._skip_emitted()
        frame = self._complete_on_marker()
        if frame is None:
            frame = super()._remove_frame(sequence_number)
            if frame is not None:
                self.frames_on_next += 1
        if frame is not None:
            self._emitted_timestamp = frame.timestamp
        return frame

    def _complete_on_marker(self) -> Optional[JitterFrame]:
        if self._origin is None:
            return None
        packets = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None or (packets and packet.timestamp != packets[0].timestamp):
                return None  # a gap, or the frame ended without a marker: the stock rule decides
            packets.append(packet)
            if packet.marker:
                self.remove(count + 1)
                self.frames_on_marker += 1
                return JitterFrame(data=b"".join(p._data for p in packets), timestamp=packets[0].timestamp)  # type: ignore[attr-defined]
        return None

    def _skip_emitted(self) -> None:
        """Packets at the origin of a frame already handed on (padding a sender adds after a frame's
        marker, with its timestamp) would otherwise reach the decoder as a frame of their own."""
        count = 0
        while self._origin is not None and count < self.capacity:
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None or packet.timestamp != self._emitted_timestamp:
                break
            count += 1
        if count:
            self.remove(count)


def install(receiver: RTCRtpReceiver) -> MarkerJitterBuffer:
    """Give a video receiver a MarkerJitterBuffer; call before media flows (on the "track" event).
    Raises ReceiverInternalsChanged if aiortc keeps its buffer elsewhere now."""
    current: Any = getattr(receiver, RECEIVER_ATTRIBUTE, None)
    if not isinstance(current, JitterBuffer):
        raise ReceiverInternalsChanged(
            f"aiortc's RTCRtpReceiver has no JitterBuffer in {RECEIVER_ATTRIBUTE} (found {type(current).__name__})"
        )
    if isinstance(current, MarkerJitterBuffer):
        return current
    if getattr(current, "_origin", None) is not None:
        raise ReceiverInternalsChanged("the receiver's jitter buffer already holds packets")
    buffer = MarkerJitterBuffer(current.capacity)
    setattr(receiver, RECEIVER_ATTRIBUTE, buffer)
    return buffer


def install_for_track(pc: Any, track: Any) -> Optional[MarkerJitterBuffer]:
    """The receiver of `track` on `pc` gets a MarkerJitterBuffer. None (logged) when the track has no
    receiver there or aiortc's internals changed: the stock buffer then stays, one frame later."""
    receiver = next((t.receiver for t in pc.getTransceivers() if t.receiver.track is track), None)
    if receiver is None:
        log.error("no receiver for track %s: the stock jitter buffer stays", getattr(track, "id", "?"))
        return None
    try:
        return install(receiver)
    except ReceiverInternalsChanged as exc:
        log.error("%s: the stock jitter buffer stays (a frame interval later)", exc)
        return None
