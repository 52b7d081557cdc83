"""`python -m engine fetch` against a local stand-in for the Hugging Face Hub (tests/fake_hub.py), with
small repositories in the published layouts: the files land where `--weights DIR` reads them, the
engine loads them, a dropped connection resumes with a Range request, complete files are not fetched
again, a truncated file is, and a broken download or a hub error is one line and a non-zero exit."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine.checkpoint import T5_FILE, VAE_FILE, write_causal_dit
from tests.fake_hub import FakeHub
from tests.weights_fixture import write_small_weights

ROOT = Path(__file__).resolve().parent.parent
WAN_REPO, CAUSAL_REPO, TAEHV_REPO = "Wan-AI/Wan2.1-T2V-small", "jerryfeng/StreamDiffusionV2", "lightx2v/Autoencoders"
FOLDER = "Wan2.1-T2V-small"
FETCHED = {f"{FOLDER}/config.json", f"{FOLDER}/{T5_FILE}", f"{FOLDER}/{VAE_FILE}",
           f"{FOLDER}/google/umt5-xxl/tokenizer.json", f"{FOLDER}/google/umt5-xxl/tokenizer_config.json",
           f"{FOLDER}/google/umt5-xxl/special_tokens_map.json", "wan_causal_dmd_v2v/model.pt"}
TOKEN = "hf_fake_secret_token_123"


def _taehv_bytes() -> bytes:
    """taew2_1.pth in its format (the decoder's keys and shapes), zeros in half precision to stay small."""
    from engine.taehv import TAEHV

    with torch.device("meta"):
        shapes = TAEHV().state_dict()
    buf = io.BytesIO()
    torch.save({k: torch.zeros(v.shape, dtype=torch.float16) for k, v in shapes.items()}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The publishers' files, written by our writers in the real layouts, and a model config naming the
    (local) hub repositories."""
    src = tmp_path_factory.mktemp("publisher")
    cfg_path, states = write_small_weights(src)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["hub"] = {"wan": WAN_REPO, "causal": CAUSAL_REPO}
    cfg_path.write_text(yaml.safe_dump(cfg))
    folder = src / FOLDER
    wan = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert "diffusion_pytorch_model.safetensors" in wan  # published, but the engine does not read it
    wan["README.md"] = b"# Wan2.1 small\n"
    wan["google/umt5-xxl/spiece.model"] = b"\x00" * 5000
    causal = {"wan_causal_dmd_v2v/model.pt": (src / "wan_causal_dmd_v2v" / "model.pt").read_bytes(),
              "wan_causal_dmd_v2v_14b/model.pt": b"another model", "README.md": b"# StreamDiffusionV2\n"}
    taehv = {"taew2_1.pth": _taehv_bytes(), "lightvaew2_1.pth": b"not fetched", "README.md": b"# VAEs\n"}
    return {"cfg": cfg_path, "states": states, "wan": wan, "causal": causal, "taehv": taehv}


def fetch_cli(hub_url: str, model: str, to: Path, home: Path, token: str | None = None, timeout: float = 180):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "engine", "fetch", model, "--to", str(to)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("python -m engine")]


def landed(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(root).parts}


def test_fetch_lands_in_the_layout_resumes_and_skips_complete_files(published, tmp_path):
    from engine.runtime import EngineOptions, StreamEngine

    model_pt = "wan_causal_dmd_v2v/model.pt"
    with FakeHub() as hub:
        hub.add(WAN_REPO, published["wan"])
        hub.add(CAUSAL_REPO, published["causal"])
        weights, home = tmp_path / "weights", tmp_path / "hf_home"

        r = fetch_cli(hub.url, str(published["cfg"]), weights, home)
        assert r.returncode == 0, r.stderr
        assert "will fetch" in r.stderr and "in 7 files" in r.stderr  # the size is said before the transfer
        assert landed(weights) == FETCHED  # not the base DiT, the 14B checkpoint, READMEs or spiece.model
        for rel in FETCHED:
            repo, path = ("causal", rel) if rel == model_pt else ("wan", rel[len(FOLDER) + 1:])
            assert (weights / rel).read_bytes() == published[repo][path], rel
        assert len(hub.gets()) == len(FETCHED)

        # the engine starts from the fetched folder with these weights
        e = StreamEngine.create(EngineOptions(model=str(published["cfg"]), weights=weights, device="cpu"))
        assert not e.info.random_weights
        key = "blocks.1.ffn.0.weight"
        assert torch.equal(e.dit.state_dict()[key], published["states"]["dit"][key])
        assert all(torch.equal(e.vae.state_dict()[k], v) for k, v in published["states"]["vae"].items())

        # a second run fetches nothing: every file is complete
        before = len(hub.log)
        r = fetch_cli(hub.url, str(published["cfg"]), weights, home)
        assert r.returncode == 0, r.stderr
        assert "will fetch 0.0 MB in 0 files" in r.stderr
        assert not [q for q in hub.log[before:] if q.method == "GET" and "/resolve/" in q.path]

        # a file cut short on disk is fetched again, and only that one, even with its old mtime (which
        # makes huggingface_hub trust its own record that the file is complete)
        vae = weights / FOLDER / VAE_FILE
        st = vae.stat()
        vae.write_bytes(vae.read_bytes()[:1000])
        os.utime(vae, ns=(st.st_atime_ns, st.st_mtime_ns))
        before = len(hub.log)
        r = fetch_cli(hub.url, str(published["cfg"]), weights, home)
        assert r.returncode == 0, r.stderr
        assert "partial, fetched again" in r.stderr
        again = [q.path for q in hub.log[before:] if q.method == "GET" and "/resolve/" in q.path]
        assert len(again) == 1 and again[0].endswith(VAE_FILE)
        assert vae.read_bytes() == published["wan"][VAE_FILE]


def test_a_dropped_connection_resumes_with_a_range_request(published, tmp_path):
    data = published["taehv"]["taew2_1.pth"]
    chunk = 10 * 1024 * 1024  # huggingface_hub writes what it receives in chunks of 10 MiB
    assert len(data) > chunk + 4_000_000
    with FakeHub() as hub:
        hub.add(TAEHV_REPO, published["taehv"])
        hub.cut_once(TAEHV_REPO, "taew2_1.pth", at=chunk + 3_000_000)  # the connection drops past the first chunk
        r = fetch_cli(hub.url, "taehv", tmp_path / "w", tmp_path / "hf_home")
        assert r.returncode == 0, r.stderr
        assert "Trying to resume download" in r.stderr
        # resumed, not restarted: the second GET asks for the rest after the chunk already written
        assert [g.range for g in hub.gets("taew2_1.pth")] == [None, f"bytes={chunk}-"]
        assert hub.served[(TAEHV_REPO, "taew2_1.pth")] == len(data) + 3_000_000
        assert (tmp_path / "w" / "taew2_1.pth").read_bytes() == data


def test_a_broken_download_is_reported_in_one_line(published, tmp_path):
    home = tmp_path / "hf_home"
    good = published["taehv"]["taew2_1.pth"]
    with FakeHub() as hub:
        # the hub serves a cut-off copy (its listed size and hash are those of the bytes sent)
        hub.add(TAEHV_REPO, {**published["taehv"], "taew2_1.pth": good[: len(good) // 2]})
        r = fetch_cli(hub.url, "taehv", tmp_path / "w", home)
        assert r.returncode == 1
        [line] = error_lines(r.stderr)
        assert "taew2_1.pth" in line and "not a readable torch checkpoint" in line, line

        # a file of another architecture: keys and shapes are checked
        hub.add(TAEHV_REPO, {**published["taehv"], "taew2_1.pth": published["causal"]["wan_causal_dmd_v2v/model.pt"]})
        r = fetch_cli(hub.url, "taehv", tmp_path / "w", home)
        assert r.returncode == 1
        [line] = error_lines(r.stderr)
        assert "does not match the TAEHV architecture" in line and "missing keys: decoder." in line, line

        # the publisher's file fixes it; the broken copy is replaced
        hub.add(TAEHV_REPO, published["taehv"])
        r = fetch_cli(hub.url, "taehv", tmp_path / "w", home)
        assert r.returncode == 0, r.stderr
        assert landed(tmp_path / "w") == {"taew2_1.pth"}
        assert (tmp_path / "w" / "taew2_1.pth").read_bytes() == good

    # a wrong causal checkpoint for the model is caught at fetch time too
    wrong = tmp_path / "wrong.pt"
    state = {k: v[..., :1].clone() if v.dim() > 1 else v for k, v in published["states"]["dit"].items()}
    write_causal_dit(wrong, state)
    with FakeHub() as hub:
        hub.add(WAN_REPO, published["wan"])
        hub.add(CAUSAL_REPO, {**published["causal"], "wan_causal_dmd_v2v/model.pt": wrong.read_bytes()})
        r = fetch_cli(hub.url, str(published["cfg"]), tmp_path / "w2", home)
        assert r.returncode == 1
        [line] = error_lines(r.stderr)
        assert "wan_causal_dmd_v2v/model.pt does not match the WanDiT architecture" in line, line


def test_hub_and_usage_errors_are_one_line(published, tmp_path):
    home = tmp_path / "hf_home"
    with FakeHub() as hub:
        hub.add(TAEHV_REPO, published["taehv"], token=TOKEN)  # gated
        for token in (None, "hf_wrong_token_456"):
            r = fetch_cli(hub.url, "taehv", tmp_path / "w", home, token=token)
            assert r.returncode == 1
            [line] = error_lines(r.stderr)
            assert f"{TAEHV_REPO} is gated" in line and "HF_TOKEN" in line, line
            assert "hf_wrong_token_456" not in r.stderr + r.stdout
        assert not hub.gets()
        r = fetch_cli(hub.url, "taehv", tmp_path / "w", home, token=TOKEN)  # the library sends the token
        assert r.returncode == 0, r.stderr
        assert TOKEN not in r.stderr + r.stdout
        assert all(q.authorized for q in hub.log[-3:])

        hub.add(WAN_REPO, {"config.json": published["wan"]["config.json"]})  # published without the umT5 file
        hub.add(CAUSAL_REPO, published["causal"])
        r = fetch_cli(hub.url, str(published["cfg"]), tmp_path / "w3", home)
        assert r.returncode == 1
        [line] = error_lines(r.stderr)
        assert f"{WAN_REPO} has no file matching {T5_FILE}" in line, line

    with socket.socket() as s:  # a port nothing listens on: no network
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = fetch_cli(closed, "wan-1.3b", tmp_path / "w4", home)
    assert r.returncode == 1
    [line] = error_lines(r.stderr)
    assert "cannot reach the hub at " + closed in line, line

    r = fetch_cli(closed, "wan-2b", tmp_path / "w4", home)
    assert r.returncode == 2
    [line] = error_lines(r.stderr)
    assert "fetch wan-2b: unknown, choose one of wan-1.3b, wan-14b, taehv" in line
    (tmp_path / "afile").write_text("x")
    r = fetch_cli(closed, "taehv", tmp_path / "afile", home)
    assert r.returncode == 2 and "not a folder" in error_lines(r.stderr)[0]


def test_not_enough_disk_is_said_before_any_download(published, tmp_path, monkeypatch):
    import engine.fetch as fetch

    monkeypatch.setattr(fetch, "_free_bytes", lambda root: 1000)
    with FakeHub() as hub:
        hub.add(TAEHV_REPO, published["taehv"])
        with pytest.raises(fetch.FetchError, match=r"not enough disk space under .*: 19\.\d MB to fetch, 0\.0 MB free"):
            fetch.fetch("taehv", tmp_path / "w", endpoint=hub.url)
        assert not hub.gets() and not any(q.method == "HEAD" for q in hub.log)
        # a dry run lists and downloads nothing
        assert fetch.fetch("taehv", tmp_path / "w", dry_run=True, endpoint=hub.url) == []
        assert not hub.gets()


def test_lightvae_is_fetched_alone_and_checked(published, tmp_path):
    from engine.config import VAEConfig, lightvae_config
    from engine.vae import WanVAE

    with torch.device("meta"):
        shapes = WanVAE(lightvae_config(VAEConfig())).state_dict()
    buf = io.BytesIO()
    torch.save({k: torch.zeros(v.shape, dtype=torch.float16) for k, v in shapes.items()}, buf)
    home = tmp_path / "hf_home"
    with FakeHub() as hub:
        hub.add(TAEHV_REPO, {**published["taehv"], "lightvaew2_1.pth": published["taehv"]["taew2_1.pth"]})
        r = fetch_cli(hub.url, "lightvae", tmp_path / "w", home)  # a TAEHV file under LightVAE's name
        assert r.returncode == 1
        [line] = error_lines(r.stderr)
        assert "lightvaew2_1.pth" in line and "LightVAE" in line, line
        hub.add(TAEHV_REPO, {**published["taehv"], "lightvaew2_1.pth": buf.getvalue()})
        r = fetch_cli(hub.url, "lightvae", tmp_path / "w", home)
        assert r.returncode == 0, r.stderr
        assert landed(tmp_path / "w") == {"lightvaew2_1.pth"}
        assert "--lightvae-weights" in r.stderr
