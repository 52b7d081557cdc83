"""WHIP/WHEP/outputs pieces without a server: authorization, ICE server parsing, targets of
recordings and restreams, the bounded hand-off queue, configuration."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from server.ops.auth import authorize, bearer, is_loopback
from server.config import ServerConfig, parse_args
from server.errors import ApiError
from server.media.ice import IceServer, link_headers, rtc_configuration
from server.outputs.restream import recording_path, redact_url, restream_target
from server.media.signaling import _answer, _set_offer, as_dtls_server
from server.outputs.sinks import DropOldestQueue

TOKEN = SecretStr("s3cret-token")


# -- authorization -----------------------------------------------------------------------------------


@pytest.mark.parametrize("remote", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_loopback_addresses(remote: str) -> None:
    assert is_loopback(remote)


@pytest.mark.parametrize("remote", ["10.0.0.2", "192.168.1.5", "::ffff:10.0.0.1", "2001:db8::1", "", None, "nonsense"])
def test_other_addresses(remote) -> None:
    assert not is_loopback(remote)


def test_bearer_header_parsing() -> None:
    assert bearer("Bearer abc") == "abc" and bearer("bearer   abc ") == "abc"
    assert bearer(None) is None and bearer("") is None and bearer("Basic abc") is None and bearer("Bearer") is None


def test_with_a_token_every_client_needs_it() -> None:
    authorize(TOKEN, "Bearer s3cret-token", "203.0.113.7")
    for header in (None, "", "Bearer wrong", "Bearer s3cret-toke", "Basic s3cret-token", "s3cret-token"):
        for remote in ("127.0.0.1", "203.0.113.7"):  # loopback is no exception once a token is set
            with pytest.raises(ApiError) as err:
                authorize(TOKEN, header, remote)
            assert err.value.status == 401 and err.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_without_a_token_only_loopback_clients() -> None:
    authorize(None, None, "127.0.0.1")
    authorize(None, "Bearer anything", "::1")
    with pytest.raises(ApiError) as err:
        authorize(None, "Bearer anything", "192.168.1.20")
    assert err.value.status == 403 and "--token" in err.value.message


# -- ICE servers ---------------------------------------------------------------------------------------


def test_ice_server_urls() -> None:
    stun = IceServer.model_validate("stun:stun.example.org:3478")
    assert stun.urls == ["stun:stun.example.org:3478"] and stun.username is None
    turn = IceServer.model_validate("turn:1700000000%3Aalice:p%40ss@turn.example.org:3478?transport=udp")
    assert turn.urls == ["turn:turn.example.org:3478?transport=udp"]
    assert (turn.username, turn.credential) == ("1700000000:alice", "p@ss")
    mapping = IceServer.model_validate({"urls": "turns:turn.example.org:5349", "username": "u", "credential": "c"})
    assert mapping.urls == ["turns:turn.example.org:5349"]
    # A TURN URL alone is valid here: whether it needs credentials depends on --turn-secret (config).
    assert IceServer.model_validate("turn:turn.example.org:3478").is_turn
    for bad in ("http://example.org", "stun:", "", {"urls": []}, {"urls": "turn:t.example:1", "username": "u"}):
        with pytest.raises(ValidationError):
            IceServer.model_validate(bad)

    config = rtc_configuration([stun, turn])
    assert config is not None and [s.username for s in config.iceServers] == [None, "1700000000:alice"]
    assert rtc_configuration([]) is None
    links = link_headers([stun, turn])
    assert links[0] == '<stun:stun.example.org:3478>; rel="ice-server"'
    assert links[1].startswith('<turn:turn.example.org:3478?transport=udp>; rel="ice-server"; username="1700000000:alice"')
    assert 'credential="p@ss"' in links[1]


def test_config_token_and_ice_servers_from_the_command_line(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STREAM_TOKEN", raising=False)
    config = parse_args(["--ice-server", "stun:a.example:3478", "--ice-server", "turn:u:p@b.example:3478"])
    assert [s.urls[0] for s in config.ice_servers] == ["stun:a.example:3478", "turn:b.example:3478"]
    assert config.token is None and config.virtual_camera is False
    monkeypatch.setenv("STREAM_TOKEN", "from-env")
    assert parse_args([]).token.get_secret_value() == "from-env"
    assert parse_args(["--token", "from-flag"]).token.get_secret_value() == "from-flag"
    assert "from-flag" not in repr(parse_args(["--token", "from-flag"]))  # never in logs or reprs
    file = tmp_path / "c.yaml"
    file.write_text("token: from-file\nice_servers:\n  - {urls: [stun:c.example:1], username: x, credential: y}\n")
    assert parse_args(["--config", str(file)]).token.get_secret_value() == "from-env"  # env beats the file
    monkeypatch.delenv("STREAM_TOKEN")
    assert parse_args(["--config", str(file)]).token.get_secret_value() == "from-file"
    with pytest.raises(SystemExit):
        parse_args(["--ice-server", "turn:no-credentials.example:3478"])
    with pytest.raises(ValidationError):
        ServerConfig(token="  ")


# -- restream and recording targets -----------------------------------------------------------------


def test_restream_targets() -> None:
    assert restream_target("rtmp://live.example.com/app/KEY") == ("rtmp://live.example.com/app/KEY", "flv")
    assert restream_target("rtmps://live.example.com:443/app/KEY")[1] == "flv"
    assert restream_target("tcp://127.0.0.1:9000")[1] == "mpegts"
    assert restream_target("udp://239.0.0.1:1234")[1] == "mpegts"
    for bad in ("http://x/y", "file:///etc/passwd", "rtmp:///app", "rtmp://h:70000/a", "RTMP", "rtmp://h/a b"):
        with pytest.raises(ApiError) as err:
            restream_target(bad)
        assert err.value.status == 422


def test_redacted_urls_hide_stream_keys() -> None:
    assert redact_url("rtmp://a.rtmp.youtube.com/live2/abcd-efgh-ijkl") == "rtmp://a.rtmp.youtube.com/live2/***"
    assert redact_url("srt://host:9000?streamid=secret&passphrase=pw") == "srt://host:9000/***"
    assert redact_url("rtmp://user:pw@host/app") == "rtmp://host/app/***"
    assert redact_url("tcp://127.0.0.1:9000") == "tcp://127.0.0.1:9000"


def test_recording_paths_stay_in_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    assert recording_path(root, "show/take 1.mp4", "abcdef0123") == (root / "show" / "take 1.mp4").resolve()
    generated = recording_path(root, None, "abcdef0123")
    assert generated.parent == root.resolve() and generated.name.startswith("abcdef01-") and generated.suffix == ".mp4"
    for bad in ("../x.mp4", "/abs.mp4", ".x.mp4", "a/../b.mp4", "a/.git/x.mp4", "x.mkv", "", "a\x00b.mp4", "c:\\x.mp4"):
        with pytest.raises(ApiError) as err:
            recording_path(root, bad, "abcdef0123")
        assert err.value.status == 422, bad
    root.mkdir()
    (root / "taken.mp4").write_bytes(b"")
    with pytest.raises(ApiError) as err:
        recording_path(root, "taken.mp4", "abcdef0123")
    assert err.value.status == 409


# -- the hand-off queue ------------------------------------------------------------------------------


def test_drop_oldest_queue_is_bounded_and_never_blocks_the_producer() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(3)
    dropped = sum(queue.put(i) for i in range(10))
    assert dropped == 7 and len(queue) == 3
    assert [queue.get(), queue.get()] == [7, 8]
    queue.close()
    assert queue.put(99) == 1  # closed: refused, counted as dropped
    assert queue.get() == 9 and queue.get() is None

    waiting: DropOldestQueue[int] = DropOldestQueue(2)
    got: list = []
    consumer = threading.Thread(target=lambda: got.append(waiting.get()))
    consumer.start()
    waiting.put(5)
    consumer.join(5)
    assert got == [5]
    with pytest.raises(ValueError):
        DropOldestQueue(0)


# -- DTLS role of our answers ---------------------------------------------------------------------------


def _setups(sdp: str) -> list[str]:
    return re.findall(r"(?m)^a=setup:(\w+)", sdp)


async def _offer_and_answer(setup: str) -> tuple[str, str]:
    """A browser-like offer (video + data channel) with its `a=setup` forced to `setup`, and
    aiortc's own answer to it (before as_dtls_server)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
    offerer.addTransceiver("video", direction="sendrecv")
    offerer.createDataChannel("control")
    await offerer.setLocalDescription(await offerer.createOffer())
    offer = re.sub(r"(?m)^a=setup:\w+", f"a=setup:{setup}", offerer.localDescription.sdp)
    await answerer.setRemoteDescription(RTCSessionDescription(offer, "offer"))
    answer = (await answerer.createAnswer()).sdp
    await asyncio.gather(offerer.close(), answerer.close())
    return offer, answer


async def test_actpass_offers_are_answered_as_the_dtls_server() -> None:
    offer, answer = await _offer_and_answer("actpass")
    assert _setups(answer) == ["active", "active"]  # aiortc's own choice: the DTLS client
    ours = as_dtls_server(offer, answer)
    assert _setups(ours) == ["passive", "passive"]
    # Nothing but the setup lines changes.
    strip = lambda sdp: re.sub(r"(?m)^a=setup:\w+\r?\n", "", sdp)  # noqa: E731
    assert strip(ours) == strip(answer)


@pytest.mark.parametrize("setup, answered", [("active", "passive"), ("passive", "active")])
async def test_an_offer_that_chose_its_role_keeps_the_opposite(setup: str, answered: str) -> None:
    offer, answer = await _offer_and_answer(setup)
    assert as_dtls_server(offer, answer) == answer and set(_setups(answer)) == {answered}


async def test_answered_as_the_dtls_server_the_peers_connect() -> None:
    from aiortc import RTCPeerConnection, RTCSessionDescription

    offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
    try:
        offerer.addTransceiver("video", direction="sendrecv")
        channel = offerer.createDataChannel("control")
        opened = asyncio.Event()
        channel.on("open", opened.set)
        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(offerer.localDescription)
        await _answer(answerer)
        assert set(_setups(answerer.localDescription.sdp)) == {"passive"}
        await offerer.setRemoteDescription(RTCSessionDescription(answerer.localDescription.sdp, "answer"))
        await asyncio.wait_for(opened.wait(), 30)  # DTLS (and SCTP over it) came up
        assert offerer.connectionState == answerer.connectionState == "connected"
    finally:
        await asyncio.gather(offerer.close(), answerer.close())


async def test_an_h264_offer_in_packetization_mode_0_is_refused_saying_so() -> None:
    # What webrtcbin 1.22 offers when the caps after rtph264pay do not carry packetization-mode.
    from aiortc import RTCPeerConnection, RTCRtpSender

    offerer = RTCPeerConnection()
    video = offerer.addTransceiver("video", direction="sendonly")
    video.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/H264"])
    await offerer.setLocalDescription(await offerer.createOffer())
    mode_0 = re.sub(r"packetization-mode=1;?", "", offerer.localDescription.sdp)
    await offerer.close()
    answerer = RTCPeerConnection()
    try:
        with pytest.raises(ApiError) as err:
            await _set_offer(answerer, mode_0)
        assert err.value.status == 400 and "packetization-mode=1" in str(err.value)
        await _set_offer(answerer, offerer.localDescription.sdp)  # the same offer in mode 1 is taken
    finally:
        await answerer.close()
