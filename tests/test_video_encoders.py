"""The output's video encoders are aiortc's (the server sends through its RTCRtpSender): VP8 with
`deadline=realtime`, `lag-in-frames=0`; H.264 Baseline with `tune=zerolatency`. Real time means each frame
comes out as packets in the call that encodes it, with no B-frames: if an aiortc upgrade changed that, the
paced output would leave a frame (or more) late, and this fails."""

from __future__ import annotations

import fractions

import numpy as np
import pytest
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from av import VideoFrame


@pytest.mark.parametrize("encoder_type", [Vp8Encoder, H264Encoder], ids=["vp8", "h264"])
def test_every_frame_leaves_the_encoder_in_its_own_call(encoder_type: type) -> None:
    encoder = encoder_type()
    rng = np.random.default_rng(0)
    for n in range(8):
        frame = VideoFrame.from_ndarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), format="rgb24")
        frame.pts, frame.time_base = n * 3000, fractions.Fraction(1, 90_000)
        payloads, timestamp = encoder.encode(frame)
        assert payloads, f"frame {n} produced no packets: the encoder holds frames back"
        assert abs(timestamp - n * 3000) <= 1  # the packets are this frame's, not an earlier one's
    assert encoder.codec.max_b_frames == 0
