#!/usr/bin/env python
"""The project's Python requirements for a GPU node without network, where torch comes with the node.

    python tools/wheelhouse.py download-command [--python-version 3.12] [--dest DIR]
        prints the one `pip download` command to run on a machine with network (a login node): it fetches
        every pinned requirement of tools/gpu_node_lock.txt for the GPU node's Python, never torch
    python tools/wheelhouse.py install --wheelhouse DIR --target DIR
        on the GPU node, offline: installs from DIR into the folder DIR (put it on PYTHONPATH) what the
        node's own packages do not already satisfy; torch, triton and the CUDA runtime wheels that came
        with torch are pinned to the installed versions, so pip can never replace or shadow them
    python tools/wheelhouse.py lock
        rewrites tools/gpu_node_lock.txt from this environment (the tested stack): requirements.txt less
        torch and triton, plus megatron-core, and everything they need, at the installed versions

Transformer Engine is optional: its wheels, when the wheelhouse holds them, are installed too (they must
be built for the node's CUDA and torch); without it the GPU run uses megatron-core's local spec.

install exits 0 when installed (one JSON line: target, installed, torch, transformer_engine), 2 on bad
input (no wheelhouse, no torch, torch older than 2.11), 4 when the wheelhouse lacks a requirement
(nothing installed; the message names what is missing and the command that fetches it).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")
LOCK = os.path.join(ROOT, "tools", "gpu_node_lock.txt")
# scripts/setup.sh installs it apart from requirements.txt (its wheel metadata says Requires-Python>=3.12
# although it runs on 3.11); tests/test_gpu_smoke.py checks the two pins agree
MEGATRON_CORE = "megatron-core==0.19.2"
# the node's CUDA stack: torch and what came with it; never installed from the wheelhouse
SITE_STACK = ("torch", "triton", "pytorch-triton")
SITE_STACK_PREFIXES = ("nvidia-", "cuda-")
TORCH_MIN = (2, 11)
TORCH_TESTED = "2.13"  # CI runs the CPU wheel of this version (requirements.txt)
OPTIONAL_PREFIXES = ("transformer-engine", "transformer_engine")
# platform tags of manylinux x86_64 wheels; pip download matches each tag exactly
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "manylinux1_x86_64")
EXIT_BAD_INPUT = 2
EXIT_MISSING = 4

try:  # the node's image may lack `packaging` before the install: pip carries a copy of it
    importlib.import_module("packaging.requirements")
except ImportError:  # pragma: no cover
    try:
        import pip._vendor.packaging as _packaging

        sys.modules["packaging"] = _packaging
        for _sub in ("requirements", "version", "markers", "specifiers", "utils", "tags"):
            __import__(f"pip._vendor.packaging.{_sub}")
            sys.modules[f"packaging.{_sub}"] = sys.modules[f"pip._vendor.packaging.{_sub}"]
    except ImportError:  # no pip either: install() says what is missing before it needs either
        pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def site_stack(name: str) -> bool:
    n = canonical(name)
    return n in SITE_STACK or n.startswith(SITE_STACK_PREFIXES)


# ---- the lock ---------------------------------------------------------------------------------------------
def direct_requirements(path: str = REQUIREMENTS) -> list[str]:
    """requirements.txt less the node's CUDA stack, plus megatron-core: what the GPU node installs."""
    from packaging.requirements import Requirement

    out = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line and not site_stack(Requirement(line).name):
                out.append(line)
    return out + [MEGATRON_CORE]


def closure(roots: list[str], python_versions=("3.11", "3.12")) -> dict[str, str]:
    """{canonical name: installed version} of the roots and everything they require (extras and
    environment markers evaluated for each Python version), from this environment's installed
    distributions, without the node's CUDA stack."""
    from importlib.metadata import distribution, PackageNotFoundError
    from packaging.requirements import Requirement

    found, missing = {}, []
    todo = [(Requirement(r), frozenset(Requirement(r).extras)) for r in roots]
    seen = set()
    while todo:
        req, extras = todo.pop()
        key = (canonical(req.name), extras)
        if key in seen or site_stack(req.name):
            continue
        seen.add(key)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            missing.append(req.name)
            continue
        found[canonical(req.name)] = dist.version
        for spec in dist.requires or []:
            sub = Requirement(spec)
            for py in python_versions:
                envs = [{"python_version": py, "python_full_version": py + ".0", "extra": e} for e in (extras or {""})]
                if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                    todo.append((sub, frozenset(sub.extras)))
                    break
    if missing:
        raise SystemExit(f"lock: not installed in this environment: {sorted(set(missing))} (run scripts/setup.sh)")
    return found


def write_lock(path: str = LOCK) -> dict[str, str]:
    pins = closure(direct_requirements())
    with open(path, "w") as f:
        f.write("# Written by `python tools/wheelhouse.py lock` from the tested environment: requirements.txt less\n"
                "# torch/triton, plus megatron-core, and everything they need, at the tested versions (Python 3.11 and\n"
                "# 3.12 markers). A GPU node's wheelhouse holds these: `python tools/wheelhouse.py download-command`.\n")
        for name in sorted(pins):
            f.write(f"{name}=={pins[name]}\n")
    return pins


def read_lock(path: str = LOCK) -> dict[str, str]:
    pins = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==", 1)
                pins[canonical(name)] = version.strip()
    return pins


def download_command(python_version: str | None = None, dest: str = "wheelhouse", lock: str = LOCK) -> str:
    py = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    lock_rel = os.path.relpath(lock, ROOT)
    if lock_rel.startswith(".."):
        lock_rel = os.path.abspath(lock)
    platforms = " ".join(f"--platform {p}" for p in PLATFORMS)
    return (f"python3 -m pip download --no-deps --ignore-requires-python --python-version {py} --implementation cp {platforms} "
            f"-d {dest} -r {lock_rel}")


# ---- the wheelhouse -----------------------------------------------------------------------------------------
_ARCHIVE = re.compile(r"^(?P<name>.+?)-(?P<version>\d[^-]*?)(-.*\.whl|\.tar\.gz|\.zip|\.tar\.bz2)$")


def wheelhouse_index(folder: str) -> dict[str, set[str]]:
    """{canonical name: {versions}} of the wheels and source archives in ``folder``."""
    out: dict[str, set[str]] = {}
    for f in os.listdir(folder):
        m = _ARCHIVE.match(f)
        if m:
            out.setdefault(canonical(m.group("name")), set()).add(m.group("version"))
    return out


def absent(pins: dict[str, str], index: dict[str, set[str]]) -> list[str]:
    from packaging.version import Version

    out = []
    for name, version in sorted(pins.items()):
        have = {Version(v) for v in index.get(name, set()) if _is_version(v)}
        if Version(version) not in have:
            out.append(f"{name}=={version}")
    return out


def _is_version(v: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        Version(v)
        return True
    except InvalidVersion:
        return False


def installed_stack() -> dict[str, str]:
    """The node's CUDA stack as installed: {name: version}."""
    from importlib.metadata import distributions

    return {canonical(d.metadata["Name"]): d.version for d in distributions()
            if d.metadata["Name"] and site_stack(d.metadata["Name"])}


def _env(target: str, with_target: bool) -> dict:
    """This environment with ``target`` taken off PYTHONPATH (a site that provides torch through
    PYTHONPATH keeps it), and put first when ``with_target``."""
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and os.path.abspath(p) != os.path.abspath(target)]
    env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env["PYTHONPATH"] = os.pathsep.join(([target] if with_target else []) + keep)
    return env


def torch_identity(python: str, env: dict) -> dict:
    code = "import json, torch; print(json.dumps({'version': torch.__version__, 'file': torch.__file__}))"
    res = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["import torch failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _missing_from_pip(text: str) -> list[str]:
    pats = (r"No matching distribution found for ([^\s]+)", r"Could not find a version that satisfies the requirement ([^\s]+)")
    out = []
    for pat in pats:
        out += [m.rstrip(")") for m in re.findall(pat, text)]
    return sorted(set(out))


def stop_missing(missing: list[str], also: list[str], wheelhouse: str, lock: str) -> int:
    cmd = download_command(dest=wheelhouse, lock=lock)
    lines = [f"wheelhouse: {wheelhouse} lacks {len(missing)} requirement(s) this node needs: " + ", ".join(missing)]
    if also:
        lines.append("also absent from it (the node's own packages may cover some): " + ", ".join(also))
    lines += ["nothing was installed and nothing was run. On a machine with network (a login node), in this",
              "repository, fetch them for this node's Python with:", "", "    " + cmd, "",
              "then copy the folder here and run again (docs/gpu.md)."]
    print("\n".join(lines), file=sys.stderr)
    return EXIT_MISSING


def _pip(args: list[str], target: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], env=_env(target, False), capture_output=True, text=True)


def optional_wheels(wheelhouse: str) -> list[str]:
    return sorted(os.path.join(wheelhouse, f) for f in os.listdir(wheelhouse)
                  if canonical(f).startswith(tuple(canonical(p) for p in OPTIONAL_PREFIXES)) and f.endswith(".whl"))


def install(wheelhouse: str, target: str, lock: str = LOCK) -> int:
    if not os.path.isdir(wheelhouse):
        print(f"--wheelhouse {wheelhouse!r} is not a folder; make it on a login node: {download_command()}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    before = torch_identity(sys.executable, _env(target, False))
    if "error" in before:
        print(f"wheelhouse: this Python ({sys.executable}) has no torch ({before['error']}): the wheelhouse "
              "installs everything but torch; use the node's Python with its CUDA build of torch (PYTHON=...)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    version = tuple(int(x) for x in re.findall(r"\d+", before["version"])[:2])
    if version < TORCH_MIN:
        print(f"wheelhouse: torch {before['version']} is older than {'.'.join(map(str, TORCH_MIN))}; "
              f"this project runs on torch 2.11-2.13 (CI tests {TORCH_TESTED})", file=sys.stderr)
        return EXIT_BAD_INPUT
    pins = read_lock(lock)
    stamp = hashlib.sha1(json.dumps([sorted(pins.items()), sorted(os.listdir(wheelhouse)), before["version"],
                                     sys.version]).encode()).hexdigest()[:12]
    stamp_file = os.path.join(target, f".zeda-wheelhouse-{stamp}")
    if os.path.isfile(stamp_file):
        print(json.dumps({"target": target, "installed": [], "up_to_date": True, "torch": before["version"],
                          "transformer_engine": te_version(target)}))
        return 0
    index = wheelhouse_index(wheelhouse)
    mcore = canonical(MEGATRON_CORE.split("==")[0])
    # megatron-core's metadata claims Python >= 3.12 (it runs on 3.11): there, as scripts/setup.sh does,
    # it is installed on its own with --ignore-requires-python (its requirements are in the lock)
    apart = sys.version_info < (3, 12) and mcore in pins
    reqs = [f"{n}=={v}" for n, v in sorted(pins.items()) if not (apart and n == mcore)]
    with tempfile.TemporaryDirectory() as tmp:
        constraints = os.path.join(tmp, "constraints.txt")
        with open(constraints, "w") as f:  # the node's torch stack stays exactly as it is
            f.writelines(f"{n}=={v}\n" for n, v in sorted(installed_stack().items()))
        req_file = os.path.join(tmp, "requirements.txt")
        with open(req_file, "w") as f:
            f.writelines(r + "\n" for r in reqs)
        report = os.path.join(tmp, "report.json")
        # resolve against the node's installed packages (pip's --prefix mode sees them; --target does not,
        # and would pull torch again for every package that names it): what is left to install
        common = ["--no-index", "--find-links", wheelhouse, "--no-build-isolation", "-c", constraints]
        res = _pip(["install", "--dry-run", "--quiet", "--prefix", os.path.join(tmp, "prefix"), "--report", report,
                    *common, "-r", req_file], target)
        if res.returncode != 0:
            missing = _missing_from_pip(res.stderr + res.stdout)
            if missing:
                names = {canonical(re.split(r"[<>=!~;\[ ]", m)[0]) for m in missing}
                return stop_missing(missing, [a for a in absent(pins, index) if a.split("==")[0] not in names],
                                    wheelhouse, lock)
            print("wheelhouse: pip could not resolve the requirements offline (nothing was installed):\n"
                  + (res.stderr or res.stdout)[-4000:], file=sys.stderr)
            return EXIT_MISSING
        with open(report) as f:
            todo = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.load(f)["install"]]
        leaked = [t for t in todo if site_stack(t.split("==")[0])]
        if leaked:  # the constraints make this unreachable; kept as the last guard for the node's torch
            print(f"wheelhouse: refusing to install {leaked}: the node's torch stack is never replaced", file=sys.stderr)
            return EXIT_BAD_INPUT
        if apart:
            missing = absent({mcore: pins[mcore]}, index)
            if missing:
                return stop_missing(missing, [], wheelhouse, lock)
        os.makedirs(target, exist_ok=True)
        batches = [todo] if todo else []
        if apart:
            batches.append(["--ignore-requires-python", f"{mcore}=={pins[mcore]}"])
        te = optional_wheels(wheelhouse)
        if te:
            batches.append(te)
        for batch in batches:
            res = _pip(["install", "--quiet", "--target", target, "--upgrade", "--no-deps", *common, *batch], target)
            if res.returncode != 0:
                print("wheelhouse: pip install failed:\n" + (res.stderr or res.stdout)[-4000:], file=sys.stderr)
                return EXIT_MISSING
    after = torch_identity(sys.executable, _env(target, True))
    if after != before:
        print(f"wheelhouse: torch changed ({before} -> {after}); remove {target} and report this", file=sys.stderr)
        return EXIT_BAD_INPUT
    for old in os.listdir(target):
        if old.startswith(".zeda-wheelhouse-"):
            os.remove(os.path.join(target, old))
    open(stamp_file, "w").close()
    print(json.dumps({"target": target, "installed": todo + ([f"{mcore}=={pins[mcore]}"] if apart else []) + [os.path.basename(w) for w in te],
                      "torch": before["version"], "torch_file": before["file"],
                      "transformer_engine": te_version(target)}))
    return 0


def te_version(target: str) -> str | None:
    code = ("import importlib.metadata as m\nfor n in ('transformer-engine', 'transformer_engine'):\n"
            "    try:\n        print(m.version(n)); break\n    except m.PackageNotFoundError:\n        pass\n")
    res = subprocess.run([sys.executable, "-c", code], env=_env(target, True), capture_output=True, text=True)
    out = res.stdout.strip()
    return out or None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download-command")
    d.add_argument("--python-version", default=None, help="the GPU node's Python (default: this one's)")
    d.add_argument("--dest", default="wheelhouse")
    i = sub.add_parser("install")
    i.add_argument("--wheelhouse", required=True)
    i.add_argument("--target", required=True)
    i.add_argument("--lock", default=LOCK)
    sub.add_parser("lock")
    a = p.parse_args(argv)
    if a.cmd == "download-command":
        print(download_command(a.python_version, a.dest))
        return 0
    if a.cmd == "lock":
        pins = write_lock()
        print(f"wrote {LOCK}: {len(pins)} pins")
        return 0
    return install(os.path.abspath(a.wheelhouse), os.path.abspath(a.target), a.lock)


if __name__ == "__main__":
    sys.exit(main())
