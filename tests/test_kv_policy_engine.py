"""kv_policy reference through the engines: the option and the model config field reach the caches and the
schedule, a ring of ranks (blocks moving, restarts, step changes) gives the frames of one process, and each
session keeps its own reference state. Its parity with the reference package: tests/test_reference_mode.py."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import load_model_config
from engine.runtime import EngineOptions, StreamEngine
from engine.worker import engine_options
from interface.controls import StreamParams
from interface.messages import WorkerOptions
from server.config import parse_args, worker_options
from tests.streams import push_interleaved
from tests.test_parallel import SIZE, UPDATES, assert_same, drive, tiny4, video  # noqa: F401

WRAP = 8  # rope_reset_frames: 41 frames = 10 chunks wrap once


@pytest.fixture(scope="module")
def configs(tiny4, tmp_path_factory):  # noqa: F811
    """tiny4 with the wrap lowered, under each policy (the model config field)."""
    text = open(tiny4).read()
    assert "stream:" in text
    out = {}
    for policy in ("ours", "reference"):
        path = tmp_path_factory.mktemp(policy) / f"tiny4-{policy}.yaml"
        path.write_text(text.replace("stream:", f"stream:\n  rope_reset_frames: {WRAP}\n  kv_policy: {policy}", 1))
        assert load_model_config(path).stream.kv_policy == policy
        out[policy] = str(path)
    return out


@pytest.fixture(scope="module")
def frames():
    return video(41, seed=4)


@pytest.fixture(scope="module")
def one_process(configs, frames):
    """In-process frames: ours, reference by config, reference by option, with UPDATES (restart included)."""
    out = {}
    with StreamEngine.create(EngineOptions(model=configs["ours"], device="cpu", **SIZE)) as e:
        out["ours"] = drive(e, frames, updates=UPDATES)
        out["plain"] = drive(e, frames, steps=2)
    with StreamEngine.create(EngineOptions(model=configs["ours"], device="cpu", kv_policy="reference", **SIZE)) as e:
        out["reference"] = drive(e, frames, updates=UPDATES)
        a, b = e.open_session("a cat", StreamParams(seed=3, steps=2)), e.open_session("a dog", StreamParams(seed=5))
        out["pair"] = push_interleaved([a, b], [frames, video(41, seed=8)])
        out["a"] = drive(e, frames, "a cat", seed=3)
        out["b"] = drive(e, video(41, seed=8), "a dog", seed=5)
    with StreamEngine.create(EngineOptions(model=configs["reference"], device="cpu", **SIZE)) as e:
        out["by_config"] = drive(e, frames, updates=UPDATES)
        out["by_config_plain"] = drive(e, frames, steps=2)
    return out


def test_reference_policy_changes_the_frames_and_the_config_field_equals_the_option(one_process):
    got = one_process
    assert_same(got["by_config"], got["reference"])
    differ = [p for (x, p), (y, _) in zip(got["ours"], got["reference"]) if not np.array_equal(x, y)]
    assert differ  # the tiny model at strength 0.8 (both prime at 700): only the KV cache's choices differ


def test_each_session_keeps_its_own_reference_state(one_process):
    """Two sessions interleaved on one engine equal each alone (the reference shares its queues and step
    list between sessions; we do not)."""
    a_out, b_out = one_process["pair"]
    assert_same(a_out, one_process["a"])
    assert_same(b_out, one_process["b"])


def test_a_ring_gives_the_reference_policy_frames_of_one_process(configs, frames, one_process):
    """cpu:2, with restarts and step changes (UPDATES), and blocks moving both ways once the window is
    full: the eviction queues of a moved layer go with it (lost, the next eviction finds an empty queue)."""
    with StreamEngine.create(EngineOptions(model=configs["reference"], device="cpu:2", **SIZE,
                                           parallel=dict(rebalance=False))) as e:
        assert_same(drive(e, frames, updates=UPDATES), one_process["by_config"])
        assert_same(drive(e, frames, steps=2, moves={7: (0, 1), 9: (1, -2)}), one_process["by_config_plain"])


def test_the_server_option_reaches_the_engine():
    config = parse_args(["--model", "tiny", "--kv-policy", "reference"])
    assert worker_options(config).kv_policy == "reference"
    with pytest.raises(SystemExit):
        parse_args(["--model", "tiny", "--kv-policy", "theirs"])
    opts = engine_options(WorkerOptions(model="tiny", kv_policy="reference"))
    assert opts.kv_policy == "reference"
    assert engine_options(WorkerOptions(model="tiny")).kv_policy is None
