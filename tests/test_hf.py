"""Hugging Face integration: tiny random transformers models saved sharded, locked as a folder, loaded back.

Offline: the models are built from random configs, never downloaded.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import chiplock
from chiplock.container.shards import LOCKED_INDEX
from chiplock.errors import ContainerError, InvalidKey, OutputError, UnsupportedConfig
from chiplock.keys import INSECURE_FAST, KdfParams

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
from chiplock import hf

SECRET = b"vendor secret for the hf tests"
TOKENS = torch.tensor([[1, 5, 17, 99, 3, 64, 127, 0, 42, 8]])


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: torch's thread pool only adds spin-waiting on a busy machine."""


def _save(model: torch.nn.Module, folder: Path) -> torch.Tensor:
    """Save ``model`` in at least three safetensors shards; return its logits on :data:`TOKENS`."""
    model.save_pretrained(folder, max_shard_size="50KB")
    assert len([n for n in os.listdir(folder) if n.endswith(".safetensors")]) >= 3
    with torch.no_grad():
        return model.eval()(TOKENS).logits


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "llama"
    logits = _save(transformers.LlamaForCausalLM(cfg), folder)
    (folder / "tokenizer.json").write_text('{"model": {"vocab": {}}}')
    return folder, logits


def _lock(src: Path, out: Path, profile, transform: str, **kw) -> dict:
    return hf.lock_pretrained(src, out, profile, transform=transform, secret=SECRET, kdf=KdfParams(**INSECURE_FAST),
                              **kw)


@pytest.mark.parametrize("transform", ["aes", "shuffle", "pre-aes"])
def test_round_trip_logits(llama, tmp_path: Path, profile, transform: str) -> None:
    src, want = llama
    r = _lock(src, tmp_path / "locked", profile, transform)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(r["shards"]) >= 3 and r["transform"] == transform and set(r["tensors"]) == set(index["weight_map"])
    model = hf.from_pretrained(tmp_path / "locked", profile=profile, secret=SECRET)
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        got = model(TOKENS).logits
    assert torch.equal(got, want)


def test_locked_folder_contents(llama, tmp_path: Path, profile) -> None:
    src, _ = llama
    (src / "pytorch_model.bin").write_bytes(b"plaintext pickle weights")  # must never travel with the lock
    try:
        _lock(src, tmp_path / "locked", profile, "aes", workers=2)
    finally:
        os.remove(src / "pytorch_model.bin")
    names = sorted(os.listdir(tmp_path / "locked"))
    assert not [n for n in names if n.endswith((".safetensors", ".bin"))], names
    assert sum(n.endswith(".chiplock") for n in names) >= 3 and LOCKED_INDEX in names
    for side in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "locked" / side).read_bytes() == (src / side).read_bytes()
    # Every weight byte is encrypted: no tensor of the source appears in a locked shard.
    from safetensors.torch import load_file

    first = min(n for n in os.listdir(src) if n.endswith(".safetensors"))
    t = next(iter(load_file(str(src / first)).values()))
    needle = t.reshape(-1)[:8].contiguous().view(torch.uint8).numpy().tobytes()
    assert all(needle not in (tmp_path / "locked" / n).read_bytes() for n in names if n.endswith(".chiplock"))


def test_wrong_device(llama, tmp_path: Path, profile, wrong_profile) -> None:
    src, want = llama
    _lock(src, tmp_path / "aes", profile, "aes")
    with pytest.raises(InvalidKey):
        hf.from_pretrained(tmp_path / "aes", profile=wrong_profile, secret=SECRET)
    _lock(src, tmp_path / "pre", profile, "pre-aes")
    model = hf.from_pretrained(tmp_path / "pre", profile=wrong_profile, secret=SECRET)
    with torch.no_grad():
        got = model(TOKENS).logits
    assert got.shape == want.shape and not torch.allclose(got, want, atol=1e-3)


def test_tied_embeddings_gpt2(tmp_path: Path, profile) -> None:
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    torch.manual_seed(1)
    want = _save(transformers.GPT2LMHeadModel(cfg), tmp_path / "gpt2")
    index = json.loads((tmp_path / "gpt2" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: saved once, as the embedding
    _lock(tmp_path / "gpt2", tmp_path / "locked", profile, "pre-aes")
    model = hf.from_pretrained(tmp_path / "locked", transformers.GPT2LMHeadModel, profile=profile, secret=SECRET,
                               device="cpu")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, want)


def test_torch_dtype(llama, tmp_path: Path, profile) -> None:
    src, want = llama
    _lock(src, tmp_path / "locked", profile, "aes")
    model = hf.from_pretrained(tmp_path / "locked", profile=profile, secret=SECRET, torch_dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with torch.no_grad():
        assert torch.allclose(model(TOKENS).logits.float(), want, atol=1e-4)


def _state_dict_folder(folder: Path, model: torch.nn.Module, edit) -> None:
    from safetensors.torch import save_file

    model.save_pretrained(folder)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_and_unexpected_tensors(tmp_path: Path, profile, wrong_profile) -> None:
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    _state_dict_folder(tmp_path / "extra", model, lambda sd: sd.update({"extra.weight": torch.zeros(2)}))
    _lock(tmp_path / "extra", tmp_path / "extra-locked", profile, "aes")
    # The index is public: a folder for another model is refused before any key work (the wrong device would
    # otherwise get InvalidKey).
    with pytest.raises(ContainerError, match="does not have: 'extra.weight'"):
        hf.from_pretrained(tmp_path / "extra-locked", profile=wrong_profile, secret=SECRET)
    _state_dict_folder(tmp_path / "missing", model, lambda sd: sd.pop("model.norm.weight"))
    _lock(tmp_path / "missing", tmp_path / "missing-locked", profile, "aes")
    with pytest.raises(ContainerError, match="lacks weights this LlamaForCausalLM needs: 'model.norm.weight'"):
        hf.from_pretrained(tmp_path / "missing-locked", profile=profile, secret=SECRET)


def test_folder_rules(llama, tmp_path: Path, profile) -> None:
    src, _ = llama
    with pytest.raises(OutputError, match="inside the input folder"):
        _lock(src, src / "locked", profile, "aes")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not empty"):
        _lock(src, tmp_path / "out", profile, "aes")
    _lock(src, tmp_path / "out", profile, "aes", force=True)
    assert not (tmp_path / "out" / "notes.txt").exists()


def test_index_escape_refused(llama, tmp_path: Path, profile) -> None:
    import shutil

    src = Path(shutil.copytree(llama[0], tmp_path / "src"))
    doc = json.loads((src / "model.safetensors.index.json").read_text())
    name = next(iter(doc["weight_map"]))
    doc["weight_map"][name] = "../" + doc["weight_map"][name]
    (src / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(ContainerError, match="not a plain file name"):
        _lock(src, tmp_path / "locked", profile, "aes")
    assert not (tmp_path / "locked").exists()


def test_no_config(tmp_path: Path) -> None:
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "model.chiplock").write_bytes(b"x")
    with pytest.raises(ContainerError, match="has no config.json"):
        hf.from_pretrained(tmp_path / "locked")


def test_transformers_missing(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(UnsupportedConfig, match=r"pip install chiplock\[hf\]"):
        hf.from_pretrained(tmp_path)


def test_content_mode_with_license(llama, tmp_path: Path, profile, wrong_profile) -> None:
    """A folder locked without a profile opens with a licence issued afterwards, for one device only."""
    from chiplock.license import ContentKeys, issue_license

    src, want = llama
    hf.lock_pretrained(src, tmp_path / "locked", transform="aes", content_keys_path=tmp_path / "model.keys")
    keys = ContentKeys.load(tmp_path / "model.keys")
    lic = issue_license(keys, profile, secret=SECRET, kdf=KdfParams(**INSECURE_FAST))
    with pytest.raises(chiplock.ProfileError):
        hf.from_pretrained(tmp_path / "locked", profile=profile, secret=SECRET)  # no licence in the files
    model = hf.from_pretrained(tmp_path / "locked", profile=profile, secret=SECRET, license=lic)
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, want)
    with pytest.raises(InvalidKey):
        hf.from_pretrained(tmp_path / "locked", profile=wrong_profile, secret=SECRET, license=lic)
