"""Recording to MP4 and restreaming to RTMP/SRT: H.264 through PyAV in an output's worker thread.

Targets are checked before anything starts: a recording is a relative `.mp4` name under the
configured recordings folder (the API must not become a way to write anywhere on the disk); a
restream URL is rtmp(s):// (FLV, what YouTube/Twitch ingest), srt:// (MPEG-TS) or tcp:// / udp://
(MPEG-TS, for a local relay or player). URLs carry stream keys, so the API and the logs only ever
show them masked.
"""

from __future__ import annotations

import fractions
import functools
import logging
import re
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import av
from av import VideoFrame

from server.errors import ApiError
from interface.imaging import scale
from server.media.pacing import CLOCK_RATE
from server.outputs.sinks import FrameSink

log = logging.getLogger(__name__)

FORMATS = {"rtmp": "flv", "rtmps": "flv", "srt": "mpegts", "tcp": "mpegts", "udp": "mpegts"}
NOMINAL_FPS = 30  # for the encoder's rate control; timestamps are the real (variable) pts
GOP_SECONDS = 2  # a keyframe every 2 s: what streaming services ask for
IO_TIMEOUT_S = 10.0  # a network peer that stops answering fails the output instead of hanging it
# Fragmented MP4: every fragment is playable on its own, so a recording cut short by a crash or
# a killed server keeps all but its last fragment (a plain MP4 is unreadable without its index).
MP4_OPTIONS = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")


def redact_url(url: str) -> str:
    """scheme://host:port/first-segment/*** : what the API and logs show of a restream URL."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid URL>"
    if ":" in host:
        host = f"[{host}]"
    segments = [s for s in parts.path.split("/") if s]
    path = f"/{segments[0]}" if segments else ""
    hidden = len(segments) > 1 or parts.query or parts.username or parts.password or parts.fragment
    return f"{parts.scheme}://{host}{port}{path}{'/***' if hidden else ''}"


@functools.lru_cache(maxsize=None)
def has_protocol(scheme: str) -> bool:
    """Whether this FFmpeg build has a protocol (libsrt is often left out). Opening the bare
    scheme fails at once either way; only a missing protocol says ProtocolNotFound."""
    try:
        av.open(f"{scheme}://", "r", timeout=0.5).close()
    except av.error.ProtocolNotFoundError:
        return False
    except Exception:
        pass
    return True


def restream_target(url: str) -> tuple[str, str]:
    """(url, container format) for a restream URL, or ApiError 422 saying what is wrong."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ApiError(422, f"invalid restream URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in FORMATS:
        raise ApiError(422, f"unsupported restream URL scheme {scheme!r}: use one of {', '.join(FORMATS)}")
    if not host:
        raise ApiError(422, "the restream URL has no host")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ApiError(422, "the restream URL contains whitespace or control characters")
    if scheme == "srt" and not has_protocol("srt"):
        raise ApiError(422, "this server's FFmpeg (PyAV) is built without SRT; restream over rtmp:// instead")
    return url, FORMATS[scheme]


def recording_path(root: Path, name: Optional[str], session_id: str) -> Path:
    """The file a recording writes: `name` (relative, .mp4) under `root`, or a generated name.
    ApiError 422 for a name that could leave the folder, 409 when the file exists."""
    if name is None:
        name = f"{session_id[:8]}-{time.strftime('%Y%m%d-%H%M%S')}.mp4"
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or any(not _SAFE_NAME.match(p) for p in parts):
        raise ApiError(
            422, "a recording path is a relative file name of letters, digits, '.', '_', '-' and ' ' "
            "(sub-folders allowed; no '..', no leading dot)"
        )
    if not name.lower().endswith(".mp4"):
        raise ApiError(422, "a recording path must end with .mp4")
    root = root.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ApiError(422, "the recording path leaves the recordings folder")
    if path.exists():
        raise ApiError(409, f"{name} exists already; choose another name")
    return path


class EncoderSink(FrameSink):
    """H.264 (libx264, zero-latency tuning) into a container: an MP4 file or a live URL."""

    def __init__(
        self, output_id: str, kind: str, destination: str, container_format: str, bitrate_kbps: int,
        label: str,
    ) -> None:
        self.kind = kind  # type: ignore[assignment]  # "record" or "restream"
        super().__init__(output_id, label)
        self._destination = destination
        self._format = container_format
        self._bitrate = bitrate_kbps * 1000
        self._container: Optional[av.container.OutputContainer] = None
        self._stream: Optional[av.video.stream.VideoStream] = None
        self._first_source_pts: Optional[int] = None

    def _redact(self, text: str) -> str:
        return text.replace(self._destination, self.target)

    def _open(self, width: int, height: int) -> None:
        options = dict(MP4_OPTIONS) if self._format == "mp4" else {}
        if self.kind == "record":
            Path(self._destination).parent.mkdir(parents=True, exist_ok=True)
        container = av.open(self._destination, "w", format=self._format, options=options, timeout=IO_TIMEOUT_S)
        try:
            stream = container.add_stream("libx264", rate=NOMINAL_FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.time_base = fractions.Fraction(1, CLOCK_RATE)  # pts pass through as they are
            stream.bit_rate = self._bitrate
            stream.gop_size = GOP_SECONDS * NOMINAL_FPS
            stream.options = {
                "preset": "veryfast",
                "tune": "zerolatency",  # no lookahead, no B-frames: a frame out per frame in
                "maxrate": str(self._bitrate),
                "bufsize": str(2 * self._bitrate),
            }
        except Exception:
            container.close()
            raise
        self._container, self._stream = container, stream

    def _write(self, frame: VideoFrame) -> None:
        assert self._container is not None and self._stream is not None
        pts = frame.pts if frame.pts is not None else self.frames_written * CLOCK_RATE // NOMINAL_FPS
        if self._first_source_pts is None:
            self._first_source_pts = pts
        out = self._private_copy(frame)
        out.pts = pts - self._first_source_pts  # the output starts at 0, spaced as the session's frames
        out.time_base = fractions.Fraction(1, CLOCK_RATE)
        for packet in self._stream.encode(out):
            self._container.mux(packet)

    def _private_copy(self, frame: VideoFrame) -> VideoFrame:
        """The frame at this output's size, as a new frame: the shared one is being encoded for
        WebRTC viewers at the same time, and its pts must not change under them."""
        width, height = self.size or (frame.width, frame.height)
        scaled = scale(frame, width, height, "yuv420p")
        if scaled is frame:
            scaled = VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")  # to_ndarray copies
        return scaled

    def _abandon(self) -> None:
        """A recording that never got a frame leaves no empty file behind (its name was claimed)."""
        if self.kind == "record":
            path = Path(self._destination)
            if path.is_file() and path.stat().st_size == 0:
                path.unlink()

    def _close(self) -> None:
        container, stream = self._container, self._stream
        self._container = self._stream = None
        if container is None:
            return
        try:
            if stream is not None:
                for packet in stream.encode():  # flush
                    container.mux(packet)
        finally:
            container.close()
