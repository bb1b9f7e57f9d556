"""The build host's CPU features: flags parsed from the OS, AMX probed for real, and the preflight
warning for int8 profiles on CPUs without int8 dot products."""

from __future__ import annotations

from edgelm.config import load_profile
from edgelm.hardware import computes_in_int8, preflight_warnings
from edgelm_runtime.hardware import amx_probe, cpu_flags, cpu_model, host_features

X86 = "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni amx_tile amx_int8\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimddp i8mm\nCPU part\t: 0xd0c\n"
OLD_X86 = "model name\t: Old Core\nflags\t\t: fpu sse4_2 avx avx2 fma\n"


def test_flags_from_cpuinfo():
    assert cpu_flags(X86) == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"]
    assert cpu_flags(ARM) == ["asimd", "asimddp", "i8mm"] and cpu_model(ARM) == "0xd0c"
    assert cpu_model(X86) == "Some Xeon"


def test_amx_is_probed_not_read_from_cpuid():
    usable, why = amx_probe()
    if "amx_tile" not in cpu_flags():
        assert not usable and why in ("not advertised", "not Linux x86-64")
    else:  # advertised: the probe ran tile instructions in a child process and says what happened
        assert why.startswith("advertised")
        assert usable == ("ran correctly" in why)
    host = host_features()
    assert host["amx_usable"] == usable and set(host["isa"]) <= set(cpu_flags())


def test_int8_profiles_warn_on_a_cpu_without_int8_dot_products():
    old = {"cpu": "Old Core", "isa": cpu_flags(OLD_X86), "int8_dot_product": False, "amx_usable": False}
    new = {**old, "isa": cpu_flags(X86), "int8_dot_product": True}
    for name in ("cpu-int8", "cpu-w8a8", "cpu-int4"):
        profile = load_profile(name)
        assert computes_in_int8(profile)
        assert "no int8 dot-product instructions" in preflight_warnings(profile, old)[0]
        assert preflight_warnings(profile, new) == []
    assert not computes_in_int8(load_profile("cpu-fp32")) and preflight_warnings(load_profile("cpu-fp32"), old) == []
