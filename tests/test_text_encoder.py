"""umT5 encoder and tokenizers: parity with the reference package, checkpoint keys, tokenizer conventions."""

from __future__ import annotations

import re

import pytest
import torch

from engine.checkpoint import STAND_IN_WORDS, write_tokenizer_folder
from engine.config import TextConfig, load_model_config
from engine.text_encoder import TextEncoder, UMT5Encoder, load_umt5_encoder, relative_position_buckets
from engine.tokenizer import ByteTokenizer, UMT5Tokenizer, clean_prompt

REAL = TextConfig(vocab_size=256384, dim=4096, ffn_dim=10240, num_heads=64, num_layers=24, num_buckets=32)
SMALL = TextConfig(vocab_size=384, dim=64, ffn_dim=128, num_heads=4, num_layers=2, num_buckets=32, text_len=512)


def _reference_t5():
    return pytest.importorskip("models.wan.wan_base.modules.t5", reason="reference package not installed")


def _small_reference(t5):
    torch.manual_seed(0)
    ref = t5.T5Encoder(vocab=SMALL.vocab_size, dim=SMALL.dim, dim_attn=SMALL.dim, dim_ffn=SMALL.ffn_dim,
                       num_heads=SMALL.num_heads, num_layers=SMALL.num_layers, num_buckets=SMALL.num_buckets,
                       shared_pos=False, dropout=0.0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
    return ref


@pytest.mark.parity
def test_parity_with_reference_t5_encoder():
    t5 = _reference_t5()
    ref = _small_reference(t5)
    ours = UMT5Encoder(SMALL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)

    g = torch.Generator().manual_seed(1)
    length = 200  # past max_distance 128 so the log buckets are exercised
    ids = torch.randint(3, SMALL.vocab_size, (3, length), generator=g)
    mask = torch.zeros(3, length, dtype=torch.long)
    for row, n in enumerate((length, 57, 1)):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        want = ref(ids, mask)
        got = ours(ids, mask)
        want_nomask, got_nomask = ref(ids), ours(ids)
    assert got.shape == (3, length, SMALL.dim)
    assert ((got - want).norm() / want.norm()).item() <= 1e-4
    assert ((got_nomask - want_nomask).norm() / want_nomask.norm()).item() <= 1e-4
    # Real tokens depend only on real tokens: a row gives the same result alone or padded.
    with torch.no_grad():
        alone = ours(ids[1:2, :57], mask[1:2, :57])
    torch.testing.assert_close(alone, got[1:2, :57], rtol=1e-4, atol=1e-4)


@pytest.mark.parity
def test_relative_position_buckets_match_reference():
    t5 = _reference_t5()
    rel = t5.T5RelativeEmbedding(32, 4, bidirectional=True)
    for lq, lk in ((1, 1), (7, 300), (512, 512)):
        rp = torch.arange(lk)[None, :] - torch.arange(lq)[:, None]
        assert torch.equal(relative_position_buckets(lq, lk, 32), rel._relative_position_bucket(rp))


@pytest.mark.parity
def test_keys_match_real_checkpoint_layout():
    t5 = _reference_t5()
    with torch.device("meta"):
        ref = t5.umt5_xxl(encoder_only=True, return_tokenizer=False, device="meta")
        ours = UMT5Encoder(REAL)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert all(our_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    assert our_sd["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    assert sum(t.numel() for t in our_sd.values()) == pytest.approx(5.68e9, rel=0.01)


def test_real_config_keys_without_reference():
    with torch.device("meta"):
        sd = UMT5Encoder(REAL).state_dict()
    want = {"token_embedding.weight", "norm.weight"}
    for i in range(24):
        want |= {f"blocks.{i}.{n}.weight" for n in ("norm1", "attn.q", "attn.k", "attn.v", "attn.o", "norm2",
                                                     "ffn.gate.0", "ffn.fc1", "ffn.fc2",
                                                     "pos_embedding.embedding")}
    assert set(sd) == want


def test_load_checkpoint_strict(tmp_path):
    enc = UMT5Encoder(SMALL)
    sd = enc.state_dict()
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    loaded = load_umt5_encoder(tmp_path, SMALL)
    assert loaded.token_embedding.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.token_embedding.weight.float(), sd["token_embedding.weight"].to(torch.bfloat16).float())
    bad = dict(sd)
    bad.pop("norm.weight")
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"norm\.weight.*extra\.weight"):
        load_umt5_encoder(tmp_path / "bad.pth", SMALL)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_umt5_encoder(tmp_path / "nowhere", SMALL)


# ---------------------------------------------------------------- tokenizers

WORDS = STAND_IN_WORDS


def _write_tiny_umt5_folder(root):
    """A small Unigram tokenizer in the T5 layout (<pad>=0, </s>=1, <unk>=2) saved like the HF files."""
    pytest.importorskip("tokenizers")
    return write_tokenizer_folder(root)


PROMPTS = ["a red fox jumps on the moon", "  hello\n\tworld  ", "", "cat " * 700, "zzz qq hello &amp; x"]


def test_umt5_tokenizer_from_folder(tmp_path):
    folder = _write_tiny_umt5_folder(tmp_path)
    tok = UMT5Tokenizer.from_folder(tmp_path)  # the Wan folder
    tok2 = UMT5Tokenizer.from_folder(folder)  # or the tokenizer folder itself
    ids, mask = tok(PROMPTS)
    assert ids.shape == mask.shape == (len(PROMPTS), 512) and ids.dtype == mask.dtype == torch.long
    assert torch.equal(ids, tok2(PROMPTS)[0])
    lens = mask.sum(1)
    for row in range(len(PROMPTS)):
        n = int(lens[row])
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert ids[row, n - 1] == 1 and (ids[row, n:] == 0).all()
    assert lens[2] == 1  # empty prompt -> just </s>
    assert lens[3] == 512  # truncated, still ends with </s>
    # whitespace cleaning: same ids as the collapsed text
    assert torch.equal(tok("hello world")[0], ids[1:2])
    # single string works
    assert tok("cat")[0].shape == (1, 512)


def test_umt5_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = _write_tiny_umt5_folder(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                              eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    ours = UMT5Tokenizer.from_folder(tmp_path)
    cleaned = [clean_prompt(p) for p in PROMPTS]  # the reference cleans before calling HF
    want = hf(cleaned, return_tensors="pt", padding="max_length", truncation=True, max_length=512,
              add_special_tokens=True)
    ids, mask = ours(PROMPTS)
    assert torch.equal(ids, want.input_ids)
    assert torch.equal(mask, want.attention_mask)


def test_umt5_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "google" / "umt5-xxl"))):
        UMT5Tokenizer.from_folder(tmp_path)
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        UMT5Tokenizer.from_folder(tmp_path)


def test_clean_prompt():
    assert clean_prompt("  a\n\n b\t c  ") == "a b c"
    assert clean_prompt("fish &amp;amp; chips") == "fish & chips"


def test_byte_tokenizer():
    tok = ByteTokenizer(384, 16)
    ids, mask = tok(["héllo", "", "x" * 100])
    assert ids.shape == mask.shape == (3, 16)
    assert ((ids >= 0) & (ids < 384)).all()
    n = len("héllo".encode("utf-8")) + 1
    assert mask[0].tolist() == [1] * n + [0] * (16 - n)
    assert ids[0, n - 1] == ByteTokenizer.EOS and (ids[0, n:] == ByteTokenizer.PAD).all()
    assert ids[0, 0] == ord("h") + ByteTokenizer.OFFSET
    assert mask[1].sum() == 1 and ids[1, 0] == ByteTokenizer.EOS
    assert mask[2].all() and ids[2, -1] == ByteTokenizer.EOS and (ids[2, :-1] == ord("x") + 3).all()
    with pytest.raises(ValueError):
        ByteTokenizer(200, 16)


def test_text_encoder_tiny_zeroes_padding():
    cfg = load_model_config("tiny").text
    te = TextEncoder.random(cfg, seed=0)
    out = te.encode_prompts(["a cat on the moon", "hello"])
    assert out.shape == (2, cfg.text_len, cfg.dim)
    assert torch.isfinite(out).all()
    n0, n1 = len("a cat on the moon") + 1, len("hello") + 1
    assert (out[0, n0:] == 0).all() and (out[1, n1:] == 0).all()
    assert (out[0, :n0].abs().sum(-1) > 0).all()
    # deterministic for a seed, and the second prompt is unaffected by batching
    again = TextEncoder.random(cfg, seed=0).encode_prompts(["hello"])
    torch.testing.assert_close(again[0], out[1], rtol=1e-5, atol=1e-5)
