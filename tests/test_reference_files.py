"""The random-weight tree that the side-by-side benchmark writes (bench/reference_files.py) is read by
the reference package's own loaders and by ours, with the same tensors (small sizes, CPU)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from bench.reference_files import write_tree
from engine.checkpoint import T5_FILE, VAE_FILE, WeightsLayout
from engine.config import load_model_config
from engine.build import build_dit, build_vae
from tests.weights_fixture import SMALL

pytest.importorskip("models.wan.causal_model")


def _reference_loader():
    """streamv2v.inference_common.load_generator_state_dict, taken from its source (the module imports
    torchvision at the top, which this machine cannot install)."""
    spec = importlib.util.find_spec("streamv2v")
    src = (Path(list(spec.submodule_search_locations)[0]) / "inference_common.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "load_generator_state_dict")
    ns: dict = {"torch": torch, "os": __import__("os")}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "streamv2v/inference_common.py", "exec"), ns)
    return ns["load_generator_state_dict"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    cfg_path = root / "small-real.yaml"
    # the reference's CausalWanModel has no text_dim setting (umT5's 4096 is built in): a wide, shallow encoder
    small = {**SMALL, "text": {**SMALL["text"], "dim": 4096, "num_heads": 32}}
    cfg_path.write_text(yaml.safe_dump(small))
    weights = write_tree(root, str(cfg_path), seed=3, device="cpu")

    def files() -> dict:
        return {p: (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*")) if not p.is_dir()}

    before = files()
    assert write_tree(root, str(cfg_path), seed=3, device="cpu") == weights
    assert files() == before  # a finished tree is reused: nothing rewritten
    return root, load_model_config(cfg_path), weights


def test_reference_reads_the_dit_folder_and_causal_checkpoint(tree):
    from models.wan.causal_model import CausalWanModel

    root, cfg, weights = tree
    folder = weights / cfg.weights_folder
    ref = CausalWanModel.from_pretrained(str(folder))  # the reference's own loader (diffusers)
    ours = build_dit(cfg, None, torch.device("cpu"), torch.bfloat16, seed=3).state_dict()
    ref_sd = ref.state_dict()
    assert set(ref_sd) == set(ours)
    for k in ours:
        assert torch.equal(ref_sd[k].to(torch.bfloat16), ours[k]), k

    path, state = _reference_loader()(str(weights / Path(cfg.causal_checkpoint).parent))
    assert path.endswith("model.pt") and all(k.startswith("model.") for k in state)
    wrapper = torch.nn.Module()
    wrapper.model = ref
    wrapper.load_state_dict(state, strict=True)  # what SingleGPUInferencePipeline.load_model does


def test_reference_reads_vae_t5_and_tokenizer(tree):
    from models.wan.wan_base.modules import t5 as ref_t5
    from models.wan.wan_base.modules.tokenizers import HuggingfaceTokenizer
    from models.wan.wan_base.modules.vae import _video_vae

    root, cfg, weights = tree
    folder = weights / cfg.weights_folder
    vae = _video_vae(pretrained_path=str(folder / VAE_FILE), z_dim=16, dim=cfg.vae.dim)
    ours = build_vae(cfg, None, torch.device("cpu"), torch.bfloat16, seed=3).state_dict()  # written as float32
    for k, v in vae.state_dict().items():
        assert torch.equal(v, ours[k].float()), k
    assert (folder / VAE_FILE).stat().st_size > 0 and (folder / T5_FILE).is_file()

    tc = cfg.text
    enc = ref_t5._t5("umt5-small", encoder_only=True, vocab_size=tc.vocab_size, dim=tc.dim, dim_attn=tc.dim,
                     dim_ffn=tc.ffn_dim, num_heads=tc.num_heads, encoder_layers=tc.num_layers, decoder_layers=0,
                     num_buckets=tc.num_buckets, shared_pos=False, dropout=0.0)
    enc.load_state_dict(torch.load(folder / T5_FILE, map_location="cpu"))  # strict, like WanTextEncoder
    tok = HuggingfaceTokenizer(name=str(folder / "google" / "umt5-xxl"), seq_len=512, clean="whitespace")
    ids, mask = tok(["a red fox"], return_mask=True, add_special_tokens=True)
    assert ids.shape == (1, 512) and int(mask.sum()) == 4 and int(ids.max()) < tc.vocab_size


def test_our_loader_reads_the_same_tree(tree):
    root, cfg, weights = tree
    layout = WeightsLayout(weights, cfg)
    loaded = build_dit(cfg, layout, torch.device("cpu"), torch.bfloat16, seed=99).state_dict()
    fresh = build_dit(cfg, None, torch.device("cpu"), torch.bfloat16, seed=3).state_dict()
    assert all(torch.equal(loaded[k], fresh[k]) for k in fresh)
