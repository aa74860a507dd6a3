"""llama.cpp builds for the CPU they run on: flags from the CPU's features, records that catch a build made for
another CPU, and a smoke check that turns a crash into one line."""

import os
import stat
import sys

import pytest

from flashback.engines import native
from flashback.errors import FlashbackError

# What /proc/cpuinfo says on the machines this project meets (flags abridged to what matters).
EPYC_AVX2 = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2
"""
XEON_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: sse4_2 avx avx2 fma f16c bmi2 avx512f avx512dq avx512cd avx512bw avx512vl avx512vbmi avx512_vnni \
avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8
"""
OLD_X86 = """model name\t: QEMU Virtual CPU
flags\t\t: fpu sse sse2
"""


def options(flags: list[str]) -> dict[str, str]:
    return dict(f.removeprefix("-D").split("=") for f in flags)


def test_an_avx2_only_cpu_gets_no_avx512_and_every_option_is_named():
    opts = options(native.cmake_flags(native.read_cpu(EPYC_AVX2, "x86_64")))
    assert opts["GGML_NATIVE"] == "OFF"
    assert opts["GGML_AVX2"] == opts["GGML_FMA"] == opts["GGML_F16C"] == opts["GGML_BMI2"] == "ON"
    assert all(opts[o] == "OFF" for o in opts if "AVX512" in o or "AMX" in o or o == "GGML_AVX_VNNI")
    # llama.cpp turns AVX2/FMA/F16C/BMI2 on by default when native is off: every option must be explicit
    assert set(native.X86_OPTIONS) | set(native.NEVER) <= set(opts)


def test_an_amx_cpu_gets_avx512_and_never_amx():
    opts = options(native.cmake_flags(native.read_cpu(XEON_AMX, "x86_64")))
    for option in ("GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX_VNNI"):
        assert opts[option] == "ON"
    assert opts["GGML_AMX_TILE"] == opts["GGML_AMX_INT8"] == opts["GGML_AMX_BF16"] == "OFF"


def test_fallback_ceilings_and_other_machines():
    xeon = native.read_cpu(XEON_AMX, "x86_64")
    avx2 = options(native.cmake_flags(xeon, "avx2"))
    assert avx2["GGML_AVX2"] == "ON" and avx2["GGML_AVX512"] == "OFF" and avx2["GGML_AVX512_VNNI"] == "OFF"
    baseline = options(native.cmake_flags(xeon, "baseline"))
    assert all(baseline[o] == "OFF" for o in native.X86_OPTIONS)
    old = options(native.cmake_flags(native.read_cpu(OLD_X86, "x86_64")))
    assert all(old[o] == "OFF" for o in native.X86_OPTIONS)
    assert native.cmake_flags(native.read_cpu("Features\t: fp asimd sve", "aarch64")) == ["-DGGML_NATIVE=ON"]
    with pytest.raises(ValueError, match="ceiling"):
        native.cmake_flags(xeon, "avx10")


def test_a_build_recorded_for_another_cpu_is_stale(tmp_path):
    xeon, epyc = native.read_cpu(XEON_AMX, "x86_64"), native.read_cpu(EPYC_AVX2, "x86_64")
    native.write_record(tmp_path, native.cmake_flags(xeon), xeon, "llama-server")
    record = native.read_record(tmp_path)
    assert record["cpu_model"] == "Intel(R) Xeon(R) Processor" and "amx_tile" in record["cpu_flags"]
    assert native.stale(record, xeon) is None
    why = native.stale(record, epyc)
    assert why is not None and "avx512f" in why and "AMD EPYC 7B13" in why
    assert native.missing_instructions(record["cmake_flags"], epyc)[:2] == ["avx512_bf16", "avx512_vnni"]
    # an AVX2 build runs on the AVX-512 machine, but its flags are not that machine's: rebuilt there too
    native.write_record(tmp_path, native.cmake_flags(epyc), epyc, "llama-server")
    assert "flags differ" in native.stale(native.read_record(tmp_path), xeon)
    assert native.stale(None, xeon) == "no record of the flags it was built with"
    identity = {"lib/libllama.so": [1, 2]}
    native.write_record(tmp_path, native.cmake_flags(xeon), xeon, "llama-cpp-python", identity)
    assert native.stale(native.read_record(tmp_path), xeon, identity) is None
    assert "not the one" in native.stale(native.read_record(tmp_path), xeon, {"lib/libllama.so": [1, 3]})


def fake_interpreter(tmp_path, body: str) -> str:
    """An executable standing in for Python in the smoke check's child process."""
    path = tmp_path / "python"
    path.write_text(f"#!{sys.executable}\nimport os, signal, sys\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """llama-cpp-python and a GGUF as the smoke check sees them, without either being real."""
    monkeypatch.setattr(native, "llama_cpp_dir", lambda: tmp_path)
    monkeypatch.setattr(native, "smoke_gguf", lambda: tmp_path / "model.gguf")
    return tmp_path


def test_a_library_that_dies_with_sigill_is_one_clear_line(installed, tmp_path):
    cpu = native.read_cpu()
    native.write_record(native.llama_cpp_record_dir(tmp_path), ["-DGGML_AVX512=ON"], cpu, "llama-cpp-python")
    python = fake_interpreter(tmp_path, "os.kill(os.getpid(), signal.SIGILL)")
    smoke = native.check_llama_cpp(python=python, cache=tmp_path)
    assert not smoke.ok
    assert "\n" not in smoke.message
    assert "died with SIGILL" in smoke.message and "-DGGML_AVX512=ON" in smoke.message
    assert "setup_engines.sh" in smoke.message
    assert smoke.crashed  # the setup script then tries safer flags


def test_a_library_that_fails_otherwise_names_its_error(installed, tmp_path):
    python = fake_interpreter(tmp_path, "print('llama_model_load: bad file', file=sys.stderr); sys.exit(3)")
    smoke = native.check_llama_cpp(python=python)
    assert not smoke.ok and "exited with status 3" in smoke.message and "bad file" in smoke.message
    assert not smoke.crashed  # a missing module or a bad file: other flags would not help
    ok = native.check_llama_cpp(python=fake_interpreter(tmp_path, "print('ok 4')"))
    assert ok.ok, ok.message


def test_the_engine_refuses_a_library_that_would_crash_the_process(installed, tmp_path, monkeypatch):
    calls = []

    def failing(**kw):
        calls.append(kw)
        return native.Smoke(False, "llama-cpp-python died with SIGILL on X; rebuild it")

    monkeypatch.setattr(native, "check_llama_cpp", failing)
    monkeypatch.setattr(native, "_checked", {})
    with pytest.raises(FlashbackError, match="died with SIGILL"):
        native.ensure_llama_cpp_runs(tmp_path)
    with pytest.raises(FlashbackError, match="died with SIGILL"):
        native.ensure_llama_cpp_runs(tmp_path)
    assert len(calls) == 1  # once per process
    # a pass is remembered on disk for this library and CPU
    monkeypatch.setattr(native, "_checked", {})
    monkeypatch.setattr(native, "check_llama_cpp", lambda **kw: calls.append(kw) or native.Smoke(True, "ok"))
    native.ensure_llama_cpp_runs(tmp_path)
    monkeypatch.setattr(native, "_checked", {})
    native.ensure_llama_cpp_runs(tmp_path)
    assert len(calls) == 2
    assert len(os.listdir(native.llama_cpp_record_dir(tmp_path) / "smoke-passed")) == 1


def test_the_setup_commands_speak_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLASHBACK_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "llama_cpp_dir", lambda: None)
    assert native.main(["python-stale"]) == 0
    assert capsys.readouterr().out.strip() == "llama-cpp-python is not installed"
    assert native.main(["stale", str(tmp_path)]) == 0
    assert "no record" in capsys.readouterr().out
    assert native.main(["record", str(tmp_path), "llama-server", *native.cmake_flags(native.read_cpu())]) == 0
    assert native.main(["stale", str(tmp_path)]) == 1
    assert native.main(["flags"]) == 0
    assert capsys.readouterr().out.startswith("-DGGML_NATIVE=")
    assert native.main(["nonsense"]) == 2
