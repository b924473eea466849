"""Precision source: stability, probe-by-probe comparison, declared dependencies, environment variants."""

import json
import os
import subprocess
import sys

import pytest
import torch

from chiplock.errors import FingerprintError
from chiplock.fingerprint import get_source
from chiplock.fingerprint import precision as p


@pytest.fixture(scope="module")
def enrollment():
    return get_source("precision").enroll()


def test_reproduces_identically_and_probe_by_probe(enrollment):
    src = get_source("precision")
    assert all(src.reproduce(enrollment.helper) == enrollment.material for _ in range(2))
    a, b = p.probe_digests(), p.probe_digests()
    assert p.compare(a, b) == []
    assert p.compare(p.probe_ids(a), p.probe_ids(b)) == []


def test_probe_ids_with_a_salt_do_not_match_unsalted_ones():
    a = p.probe_digests()
    plain, salted = p.probe_ids(a), p.probe_ids(a, os.urandom(16))
    assert set(plain) == set(salted) and not set(plain.values()) & set(salted.values())
    assert all(len(v) == 8 for v in salted.values())


def test_compare_names_the_differing_probes():
    a = {"x": "00", "y": "11"}
    assert p.compare(a, {"x": "00", "y": "12"}) == ["y"]
    assert p.compare(a, {"x": "00"}) == ["y"]


def test_info_is_public(enrollment):
    text = json.dumps({"helper": enrollment.helper, "info": enrollment.info})
    digests = p.probe_digests()
    # Nothing an enumerator can match: no material, digest or (unsalted) probe id, and no configuration facts.
    for value in [enrollment.material.hex(), *digests.values(), *p.probe_ids(digests).values()]:
        assert value not in text
    facts = p.config_facts()
    for fact in (facts["torch"], facts["numpy"], facts["cpu_capability"], facts.get("cpu") or "no cpu model"):
        assert fact not in text
    assert set(enrollment.info) == {"seconds", "entropy_note"}
    assert enrollment.entropy_bits == p.PRECISION_ENTROPY_BITS and 0 < p.PRECISION_ENTROPY_BITS < 64
    assert f"{p.PRECISION_ENTROPY_BITS:.1f} bits" in enrollment.info["entropy_note"]


def test_suite_has_numpy_probes_and_every_probe_declares_known_facts():
    deps = p.probe_dependencies()
    assert {"np_dgemm", "np_sgemm", "np_sum_f32", "conv2d", "matmul_64"} <= set(deps)
    for name, facts in deps.items():
        assert facts and set(facts) <= set(p.FACTS), name


def test_suite_1_files_still_reproduce():
    legacy = {"suite": 1, "device": "cpu"}
    src = get_source("precision")
    first = src.reproduce(legacy)
    assert first == src.reproduce(legacy) != src.reproduce({"suite": 2, "device": "cpu"})
    with pytest.raises(FingerprintError, match="upgrade chiplock"):
        src.reproduce({"suite": 99})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without a GPU")
def test_cuda_without_gpu_says_what_to_do():
    with pytest.raises(FingerprintError, match="no GPU"):
        get_source("precision").reproduce({"suite": 2, "device": "cuda"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")
def test_cuda_probes_are_stable():
    a, b = p.probe_digests("cuda"), p.probe_digests("cuda")
    assert any(n.startswith("cuda_") for n in a) and p.compare(a, b) == []


CHILD = ("import json, sys, torch; torch.set_num_threads(int(sys.argv[1])); "
         "from chiplock.fingerprint.precision import probe_digests; print(json.dumps(probe_digests()))")


def test_isa_variant_changes_only_probes_that_declare_it():
    # One fresh process with ATen's vector kernels forced to the baseline ISA (the same thread count as here);
    # benchmarks/fingerprint_precision.py runs the full set of variants.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(torch.get_num_threads())], env=env,
                         capture_output=True, text=True, check=True)
    changed = p.compare(p.probe_digests(), json.loads(out.stdout))
    deps = p.probe_dependencies()
    assert changed, "ATEN_CPU_CAPABILITY=default changed no probe"
    assert all("cpu.isa" in deps[n] for n in changed), changed
