"""Groups: tensors locked under independent random content keys, chosen by name patterns, each opened by a licence
that holds its wrap; licences never mix silent (pre-aes) and detecting (aes, shuffle) groups."""

from __future__ import annotations

import pytest
import torch

import chiplock
from chiplock import (ContentKeys, GroupConfig, InvalidKey, InvalidTag, LockConfig, ProfileError,
                      UnsupportedConfig)
from chiplock.container.reader import open_container
from chiplock.license import License

pytestmark = pytest.mark.filterwarnings("ignore::chiplock.LowEntropyWarning")

SECRET = b"vendor secret for the group tests"


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"fc1.weight": torch.randn(32, 16, generator=g), "fc1.bias": torch.randn(32, generator=g),
            "fc2.weight": torch.randn(10, 32, generator=g), "fc2.bias": torch.randn(10, generator=g),
            "norm.scale": torch.randn(16, generator=g).half()}


def _head(name: str) -> bool:
    return name.startswith("fc2.")


def _check(got, want, names, assert_bit_exact):
    assert list(got) == [n for n in want if n in names]
    for n in names:
        assert_bit_exact(got[n], want[n], n)


# --- two groups of one kind -----------------------------------------------------------------------------------


@pytest.fixture
def two_pre_aes(tmp_path, profile, fast_kdf):
    cfg = LockConfig(transform="pre-aes", groups=(GroupConfig("head", "pre-aes", ("fc2.*",)),))
    path = tmp_path / "m.chiplock"
    info = chiplock.lock(_weights(), path, profile, config=cfg, secret=SECRET, kdf=fast_kdf)
    return path, info


def test_each_group_gets_its_own_content_key(two_pre_aes, container_io, tmp_path, profile, fast_kdf):
    path, info = two_pre_aes
    assert info["groups"] == {"main": {"transform": "pre-aes", "tensors": 3},
                              "head": {"transform": "pre-aes", "tensors": 2}}
    assert {n: t["group"] for n, t in info["tensors"].items()} == {n: "head" if _head(n) else "main"
                                                                   for n in _weights()}
    meta = container_io[0](path)[0]
    wraps = meta["license"]["wraps"]
    assert set(wraps) == {"main", "head"} and {w["alg"] for w in wraps.values()} == {"aes-256-ctr"}
    assert wraps["main"]["nonce"] != wraps["head"]["nonce"]
    # The content keys themselves (content mode writes them): two independent random keys.
    cfg = LockConfig(transform="pre-aes", groups=(GroupConfig("head", "pre-aes", ("fc2.*",)),))
    chiplock.lock(_weights(), tmp_path / "c.chiplock", config=cfg, content_keys_path=tmp_path / "c.keys")
    keys = ContentKeys.load(tmp_path / "c.keys")
    assert set(keys.groups) == {"main", "head"}
    assert keys.groups["main"].key != keys.groups["head"].key
    assert keys.content_id.hex() == chiplock.inspect(tmp_path / "c.chiplock")["content_id"]


def test_unlock_only_some_groups(two_pre_aes, profile, assert_bit_exact):
    path, _ = two_pre_aes
    w = _weights()
    _check(chiplock.unlock(path, profile=profile, secret=SECRET, groups=["head"]), w,
           [n for n in w if _head(n)], assert_bit_exact)
    _check(chiplock.unlock(path, profile=profile, secret=SECRET, groups=["main"]), w,
           [n for n in w if not _head(n)], assert_bit_exact)
    _check(chiplock.unlock(path, profile=profile, secret=SECRET), w, list(w), assert_bit_exact)
    with pytest.raises(UnsupportedConfig, match="the file has no group\\(s\\) 'tail'; it has 'head', 'main'"):
        chiplock.unlock(path, profile=profile, secret=SECRET, groups=["tail"])


def test_groups_given_as_one_string_is_a_caller_mistake(two_pre_aes, profile):
    path, _ = two_pre_aes
    with pytest.raises(TypeError, match="groups must be a list of group labels"):
        chiplock.unlock(path, profile=profile, secret=SECRET, groups="head")


def test_first_matching_group_wins_and_the_rest_is_main():
    cfg = LockConfig(transform="aes", groups=(GroupConfig("a", "shuffle", ("fc2.weight", "norm.*")),
                                              GroupConfig("b", "aes", ("fc2.*",))))
    assert [cfg.assign(n) for n in _weights()] == [("main", "aes"), ("main", "aes"), ("a", "shuffle"),
                                                    ("b", "aes"), ("a", "shuffle")]


@pytest.mark.parametrize("kwargs,match", [
    ({"label": "a b"}, "group label 'a b' is not 1 to 64 characters"),
    ({"label": "x", "patterns": "fc2.*"}, "patterns must be a tuple of non-empty strings"),
    ({"label": "x", "patterns": ()}, "patterns is empty"),
    ({"label": "x", "patterns": ("",)}, "patterns must be a tuple of non-empty strings"),
])
def test_group_config_is_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupConfig(**kwargs)


def test_lock_config_is_checked():
    with pytest.raises(ValueError, match="has a label twice"):
        LockConfig(groups=(GroupConfig("a"), GroupConfig("a")))
    with pytest.raises(ValueError, match="'main' is the default group"):
        LockConfig(transform="pre-aes", groups=(GroupConfig("main", "aes"),))
    with pytest.raises(ValueError, match="version 2 is not supported"):
        LockConfig(version=2)
    with pytest.raises(ValueError, match="must hold GroupConfig objects"):
        LockConfig(groups=({"label": "a"},))


def test_a_group_no_tensor_joins_is_left_out(tmp_path, profile, fast_kdf):
    cfg = LockConfig(transform="aes", groups=(GroupConfig("unused", "aes", ("nothing.*",)),))
    info = chiplock.lock(_weights(), tmp_path / "m.chiplock", profile, config=cfg, secret=SECRET, kdf=fast_kdf)
    assert set(info["groups"]) == {"main"}
    assert set(chiplock.unlock(tmp_path / "m.chiplock", profile=profile, secret=SECRET)) == set(_weights())


# --- mixed kinds: content mode and two licences -----------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path, profile):
    """A content-mode file with an aes group "secure" (fc2.*) and a pre-aes group "main", and its two licences."""
    cfg = LockConfig(transform="pre-aes", groups=(GroupConfig("secure", "aes", ("fc2.*",)),))
    path = tmp_path / "m.chiplock"
    keys_path = tmp_path / "m.keys"
    info = chiplock.lock(_weights(), path, config=cfg, content_keys_path=keys_path)
    assert info["license"].startswith("separate") and info["transform"] == ["aes", "pre-aes"]
    keys = ContentKeys.load(keys_path)
    secure = chiplock.issue_license(keys, profile, secret=SECRET, groups=["secure"])
    main = chiplock.issue_license(keys, profile, secret=SECRET, groups=["main"])
    secure.save(tmp_path / "secure.lic")
    main.save(tmp_path / "main.lic")
    return path, keys, tmp_path / "secure.lic", tmp_path / "main.lic"


def test_one_licence_cannot_mix_silent_and_detecting_groups(mixed, profile):
    _, keys, _, _ = mixed
    with pytest.raises(UnsupportedConfig, match="one licence cannot hold both silent groups \\(main.*"
                                                "\\(secure\\).*Issue the kinds to different devices"):
        chiplock.issue_license(keys, profile, secret=SECRET)


def test_each_licence_opens_only_its_group(mixed, profile, assert_bit_exact):
    path, _, secure, main = mixed
    w = _weights()
    assert License.load(secure).groups == ("secure",) and License.load(main).groups == ("main",)
    _check(chiplock.unlock(path, profile=profile, secret=SECRET, license=secure, groups=["secure"]), w,
           [n for n in w if _head(n)], assert_bit_exact)
    _check(chiplock.unlock(path, profile=profile, secret=SECRET, license=main, groups=["main"]), w,
           [n for n in w if not _head(n)], assert_bit_exact)
    # Without groups= unlock wants every group of the file: a partial licence names what it lacks.
    with pytest.raises(ProfileError, match="this licence does not hold group 'main' \\(it holds secure\\); ask "
                                           "the vendor for a licence that includes it"):
        chiplock.unlock(path, profile=profile, secret=SECRET, license=secure)
    with pytest.raises(ProfileError, match="does not hold group 'secure'"):
        chiplock.unlock(path, profile=profile, secret=SECRET, license=License.load(main))
    with pytest.raises(ProfileError, match="does not hold group 'secure'"):
        chiplock.unlock(path, profile=profile, secret=SECRET, license=main, groups=["secure"])
    # A content-mode file needs a licence.
    with pytest.raises(ProfileError, match="this file carries no licence"):
        chiplock.unlock(path, profile=profile, secret=SECRET)


def test_mixed_licences_on_another_device(mixed, wrong_profile):
    path, _, secure, main = mixed
    with pytest.raises(InvalidKey):
        chiplock.unlock(path, profile=wrong_profile, secret=SECRET, license=secure, groups=["secure"])
    # The pre-aes licence never says: another device gets weights, just not these.
    got = chiplock.unlock(path, profile=wrong_profile, secret=SECRET, license=main, groups=["main"])
    w = _weights()
    assert set(got) == {n for n in w if not _head(n)}
    assert (got["fc1.weight"] != w["fc1.weight"]).float().mean() > 0.9


def test_issue_license_for_an_unknown_group(mixed, profile):
    _, keys, _, _ = mixed
    with pytest.raises(UnsupportedConfig, match="unknown group\\(s\\) 'nope'; these content keys hold main, secure"):
        chiplock.issue_license(keys, profile, secret=SECRET, groups=["nope"])


def test_licence_of_another_model_is_refused(mixed, profile, tmp_path):
    path, _, _, _ = mixed
    other = tmp_path / "other.chiplock"
    chiplock.lock(_weights(), other, config=LockConfig(transform="pre-aes"), content_keys_path=tmp_path / "o.keys")
    lic = chiplock.issue_license(ContentKeys.load(tmp_path / "o.keys"), profile, secret=SECRET)
    with pytest.raises(chiplock.ContainerError, match="this licence is for another model file"):
        chiplock.unlock(path, profile=profile, secret=SECRET, license=lic, groups=["main"])


# --- independent keys: a wrap moved to another label opens nothing -----------------------------------------------


def _relabel(lic: License, mapping: dict[str, str]) -> License:
    data = lic.to_json()
    data["wraps"] = {mapping.get(k, k): v for k, v in data["wraps"].items()}
    return License.from_json(data)


def test_swapped_gcm_wraps_fail(tmp_path, profile, assert_bit_exact):
    # Two aes groups: the wrap's associated data names its label, so a wrap moved to the other label is refused.
    cfg = LockConfig(transform="aes", groups=(GroupConfig("head", "aes", ("fc2.*",)),))
    path = tmp_path / "m.chiplock"
    chiplock.lock(_weights(), path, config=cfg, content_keys_path=tmp_path / "m.keys")
    keys = ContentKeys.load(tmp_path / "m.keys")
    lic = chiplock.issue_license(keys, profile, secret=SECRET)
    _check(chiplock.unlock(path, profile=profile, secret=SECRET, license=lic), _weights(), list(_weights()),
           assert_bit_exact)
    swapped = _relabel(lic, {"main": "head", "head": "main"})
    for groups in (["main"], ["head"], None):
        with pytest.raises(InvalidKey):
            chiplock.unlock(path, profile=profile, secret=SECRET, license=swapped, groups=groups)
    # A licence for "head" only, relabelled as "main": it cannot open main.
    head_only = chiplock.issue_license(keys, profile, secret=SECRET, groups=["head"])
    with pytest.raises(InvalidKey):
        chiplock.unlock(path, profile=profile, secret=SECRET, license=_relabel(head_only, {"head": "main"}),
                        groups=["main"])


def test_swapped_ctr_wraps_give_garbage(two_pre_aes, container_io, profile, tmp_path):
    # Two pre-aes groups: nothing can tell a wrong key, by design; a swapped wrap unwraps the other group's key,
    # and each group decodes under the wrong key to useless weights.
    path, _ = two_pre_aes
    read, write = container_io
    meta, header, data = read(path)
    wraps = meta["license"]["wraps"]
    wraps["main"], wraps["head"] = wraps["head"], wraps["main"]
    bad = tmp_path / "swapped.chiplock"
    write(bad, meta, header, data)
    got = chiplock.unlock(bad, profile=profile, secret=SECRET)
    w = _weights()
    assert list(got) == list(w)
    for name, t in w.items():
        assert (got[name] != t).float().mean() > 0.9, name


def test_group_keys_are_independent_of_each_other(tmp_path):
    # The same tensor locked in two groups of one file is stored differently (its key comes from its group's key).
    cfg = LockConfig(transform="shuffle", groups=(GroupConfig("b", "shuffle", ("b.*",)),))
    t = torch.arange(4096, dtype=torch.float32)
    path = tmp_path / "m.chiplock"
    chiplock.lock({"a.w": t, "b.w": t}, path, config=cfg, content_keys_path=tmp_path / "m.keys")
    c = open_container(path)
    stored = {}
    for e in c.entries:
        with c.stored(e) as arr:
            stored[e.name] = arr.tobytes()
    assert stored["a.w"] != stored["b.w"]
    assert sorted(stored["a.w"]) == sorted(stored["b.w"])  # shuffle keeps the values: only the order differs


# --- group MACs -------------------------------------------------------------------------------------------------


def test_each_detecting_group_has_its_own_mac(tmp_path, profile, fast_kdf, container_io):
    cfg = LockConfig(transform="aes", groups=(GroupConfig("head", "shuffle", ("fc2.*",)),
                                              GroupConfig("plain", "pre-aes", ("norm.*",))))
    path = tmp_path / "m.chiplock"
    keys_path = tmp_path / "m.keys"
    chiplock.lock(_weights(), path, config=cfg, content_keys_path=keys_path)
    read, write = container_io
    meta, header, data = read(path)
    groups = meta["groups"]
    assert groups["plain"]["mac"] is None
    assert len(groups["main"]["mac"]) == 64 and len(groups["head"]["mac"]) == 64
    assert groups["main"]["mac"] != groups["head"]["mac"]
    keys = ContentKeys.load(keys_path)
    lic = chiplock.issue_license(keys, profile, secret=SECRET, groups=["main", "head"])
    chiplock.unlock(path, profile=profile, secret=SECRET, license=lic, groups=["main", "head"])
    # Each MAC covers the whole content description: rewriting a pre-aes tensor's parameters (which the pre-aes
    # group cannot authenticate) is caught by the MAC of any detecting group opened alongside.
    meta["tensors"]["norm.scale"]["params"]["mode"] = "other"
    write(path, meta, header, data)
    for groups in (["main"], ["head"]):
        with pytest.raises(InvalidTag):
            chiplock.unlock(path, profile=profile, secret=SECRET, license=lic, groups=groups)
    # The MACs of two groups are not interchangeable (each is keyed with its own group's content key).
    path2 = tmp_path / "m2.chiplock"
    chiplock.lock(_weights(), path2, config=cfg, content_keys_path=tmp_path / "m2.keys")
    lic2 = chiplock.issue_license(ContentKeys.load(tmp_path / "m2.keys"), profile, secret=SECRET,
                                  groups=["main", "head"])
    meta, header, data = read(path2)
    meta["groups"]["main"]["mac"], meta["groups"]["head"]["mac"] = (meta["groups"]["head"]["mac"],
                                                                    meta["groups"]["main"]["mac"])
    write(path2, meta, header, data)
    for groups in (["main"], ["head"]):
        with pytest.raises(InvalidTag):
            chiplock.unlock(path2, profile=profile, secret=SECRET, license=lic2, groups=groups)


def test_unlock_to_file_of_some_groups(two_pre_aes, profile, tmp_path, assert_bit_exact):
    from safetensors.torch import load_file

    path, _ = two_pre_aes
    out = tmp_path / "head.safetensors"
    chiplock.unlock_to_file(path, out, profile=profile, secret=SECRET, groups=["head"])
    w, got = _weights(), load_file(str(out))
    assert set(got) == {n for n in w if _head(n)}
    for n, t in got.items():
        assert_bit_exact(t, w[n], n)


def test_unlock_to_file_of_a_folder_honours_groups(tmp_path, profile, fast_kdf):
    import os

    from safetensors.torch import load_file, save_file

    src = tmp_path / "hf"
    src.mkdir()
    save_file(_weights(), str(src / "model.safetensors"))
    cfg = LockConfig(transform="pre-aes", groups=(GroupConfig("head", "pre-aes", ("fc2.*",)),))
    chiplock.lock(src, tmp_path / "locked", profile, config=cfg, secret=SECRET, kdf=fast_kdf)
    assert set(chiplock.unlock(tmp_path / "locked", profile=profile, secret=SECRET, groups=["head"])) == \
        {n for n in _weights() if _head(n)}
    chiplock.unlock_to_file(tmp_path / "locked", tmp_path / "plain", profile=profile, secret=SECRET,
                            groups=["head"])
    names = set()
    for f in os.listdir(tmp_path / "plain"):
        if f.endswith(".safetensors"):
            names |= set(load_file(str(tmp_path / "plain" / f)))
    assert names == {n for n in _weights() if _head(n)}
