"""The GPU benchmark tools that reach into the in-process engine's core run end to end on the CPU with
the tiny model (their GPU runs happen elsewhere; this keeps them in step with the engine's internals)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--device", "cpu", "--size", "32"]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_engine_bench_times_and_counts_every_stage_without_a_dtype(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    _run("bench.engine_bench", "--rows", "p1", *TINY, "--chunks", "2", "--warmup", "1", "--json", str(out))
    (r,) = json.loads(out.read_text())["results"]
    assert r["steps"] == 2 and r["fps"] > 0 and r["ttff_s"] > 0 and r["first_chunk_ms"] > 0
    # the DiT's count is one steady forward of 2 rows; a 1-step row's is one row: half of it
    assert r["vae_encode_tflop"] > 0 and r["dit_tflop"] > 0 and r["vae_decode_tflop"] > 0
    out1 = tmp_path / "p2.json"
    _run("bench.engine_bench", "--rows", "p2", *TINY, "--chunks", "2", "--warmup", "1", "--json", str(out1))
    (r1,) = json.loads(out1.read_text())["results"]
    assert r1["steps"] == 1
    assert r["dit_tflop"] == pytest.approx(2 * r1["dit_tflop"], rel=1e-6)
    assert r["vae_encode_tflop"] == r1["vae_encode_tflop"] and r["vae_decode_tflop"] == r1["vae_decode_tflop"]


def test_sessions_bench_gets_every_pushed_frame_back_from_every_session(tmp_path: Path) -> None:
    from bench.sessions_bench import main

    out = tmp_path / "sessions.json"
    main(["--row", "p1", *TINY, "--sessions", "1,2", "--chunks", "2", "--warmup", "0", "--json", str(out)])
    res = json.loads(out.read_text())["results"]
    assert [r["sessions"] for r in res] == [1, 2]
    for r in res:
        assert r["frames"] == 4 * 2 * r["sessions"] and len(r["per_session_fps"]) == r["sessions"]
        assert r["aggregate_fps"] == pytest.approx(sum(r["per_session_fps"]))
        assert (r["model"], r["size"], r["steps"]) == ("tiny", "32x32", 2)


def test_first_chunk_marks_every_part_of_a_fresh_sessions_first_chunk() -> None:
    out = _run("bench.first_chunk", "--rows", "p1", *TINY, "--sessions", "1").stdout
    for label in ("VAE encode 1 frame", "VAE encode 4 frames", "DiT blocks (first chunk, 1 session, 1 row; eager) #2",
                  "VAE decode 1 latent (1 frame) #2", "VAE decode 1 latent (3 frames)", "wall: to all 5 frames"):
        assert label in out, out


def test_profile_stages_and_check_fast_paths_run_their_cpu_dry_runs() -> None:
    out = _run("bench.profile_stages", "--rows", "p1", *TINY, "--top", "3").stdout
    assert "### dit (stage: embed, blocks, head, re-noise): wall" in out and "by op (eager)" in out
    out = _run("bench.check_fast_paths", "--model", "tiny", "--device", "cpu", "--height", "32", "--width", "32",
               "--chunks", "2").stdout
    assert "DiT + VAE CUDA graphs vs eager: 13 frames, max |diff| 0.0" in out  # eager both ways off CUDA


def test_ab_report_takes_the_median_of_each_sides_rounds_and_their_ratio(tmp_path: Path) -> None:
    from bench.ab_report import table

    def engine(fps: float, ttff: float) -> dict:
        return dict(results=[dict(row="p2", dtype="bfloat16", model="wan-1.3b", size="512x512", steps=1, fps=fps,
                                  ttff_s=ttff)])

    def sessions(*agg: float) -> dict:
        return dict(results=[dict(sessions=n + 1, row="p2", model="wan-1.3b", size="512x512", steps=1, aggregate_fps=a,
                                  min_session_fps=a / (n + 1)) for n, a in enumerate(agg)])

    files = {"engine-before-1": engine(40, 0.3), "engine-before-2": engine(50, 0.2), "engine-before-3": engine(90, 0.25),
             "engine-after-1": engine(100, 0.1), "engine-after-2": engine(80, 0.3),
             "sessions-before-1": sessions(50, 60), "sessions-after-1": sessions(50, 90)}
    for name, data in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    (tmp_path / "engine-after-3.json").write_text('{"results": [')  # a run cut off while writing: skipped
    lines = table(tmp_path).splitlines()
    (p2,) = [x for x in lines if x.startswith("p2 ")]
    # fps: median 50 before, 90 after (1.8); TTFF: 0.25 before, 0.2 after (0.8); 3 rounds before, 2 after
    assert p2.split()[5:] == ["50.00", "90.00", "1.800", "0.250", "0.200", "0.800", "3/2"]
    two = [x for x in lines if x.split()[:2] == ["2", "p2"]][0]
    assert two.split()[5:] == ["60.00", "90.00", "1.500", "30.00", "45.00", "1.500", "1/1"]


def test_results_name_the_tree_that_ran_not_the_one_on_pythonpath(tmp_path: Path) -> None:
    """A benchmark started from a copy of the code with PYTHONPATH naming this checkout runs the copy
    (`python -m` and `-c` put the current folder first): the recorded tree says so, and a commit is
    given only for a checkout's top level (not for a copy unpacked inside a checkout), with whether the
    tree that ran differs from it."""
    import shutil

    from bench.code_tree import code_tree

    copy = tmp_path / "before"
    (copy / "bench").mkdir(parents=True)
    for name in ("__init__.py", "code_tree.py"):
        shutil.copy(REPO / "bench" / name, copy / "bench" / name)
    r = subprocess.run([sys.executable, "-c", "from bench.code_tree import code_tree; print(code_tree())"],
                       cwd=copy, capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == repr({"tree": str(copy), "commit": None, "modified": None})

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(copy)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert code_tree(copy) == {"tree": str(copy), "commit": head, "modified": False}
    assert code_tree(copy / "bench")["commit"] is None  # inside a checkout, not its top level
    (copy / "bench" / "__init__.py").write_text("# changed\n")
    assert code_tree(copy) == {"tree": str(copy), "commit": head, "modified": True}
