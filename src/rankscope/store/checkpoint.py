"""Checkpoints: plain tensors in safetensors files plus a JSON sidecar, written atomically.

Layout: `checkpoints/step_000100/{model,optimizer,extra}.safetensors` and `meta.json`.
A checkpoint is written into a temporary folder (each file fsynced), its `meta.json` records the
SHA-256 of every file and is written last, then the folder is renamed into place. `meta.json` is
covered too: `meta_sha256` is the SHA-256 of its canonical form (sorted keys, no spaces) without
that key. Loading checks `meta.json` against META_SCHEMA and every hash; a folder that fails is
reported and the previous checkpoint used. A folder that is not complete never has the final
name, so nothing finished is ever overwritten.

Re-saving a step that already has a folder (a resumed run reaching it again) replaces it in two
renames: the old folder goes aside (`invalid-step_N-<time>` when it fails verification, kept for
good; `.old_step_N_<pid>` when it verifies, deleted once the new one is in), then the new one is
renamed in. A kill between the two leaves both complete; `recover` (run before every resume and
prune) renames the new one in, or the old one back.

Retention (`prune_checkpoints`) counts only checkpoints that verify: it keeps the newest
`keep_last` of them (so never the newest good one) and every `keep_steps` / log-spaced step, and
sets invalid folders aside as `invalid-step_NNNNNN-<time>` (renamed, never deleted).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rankscope.core.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage (tied embeddings): keep one copy, record aliases."""
    out, aliases, seen = {}, {}, {}
    for k, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = t.detach().contiguous().cpu()
    return out, aliases


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, written to a temporary name and renamed: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def canonical_sha256(meta: dict[str, Any]) -> str:
    """SHA-256 of `meta` without its own `meta_sha256`, in canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Write `meta.json` with its own hash (fsynced). Tools that edit a checkpoint's metadata on
    purpose re-seal it with this; a hand edit without it makes the checkpoint invalid."""
    meta = {**meta, "meta_sha256": canonical_sha256(meta)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    _fsync(folder / "meta.json")


def save_checkpoint(root: Path, step: int, files: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any], log=print) -> Path:
    """Atomically write `files` (name -> tensors) and `meta` as the checkpoint of `step`; a folder
    of that step already there is set aside (never deleted while it is the only copy)."""
    if not files:
        raise CheckpointError(f"a checkpoint needs at least one file (step {step})")
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        hashes, aliases = {}, {}
        for name, tensors in files.items():
            path = tmp / f"{name}.safetensors"
            stored, aliases[name] = _dedupe(tensors)
            _save_file(stored, path)
            _fsync(path)
            hashes[path.name] = _sha256(path)
        write_meta(tmp, {**meta, "step": step, "files": hashes, "aliases": aliases})
    except BaseException:  # disk full, read-only, killed: the half-written folder goes (the old ones are untouched)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():  # re-saving the same step (e.g. after a resume): old aside, then new in (both renames)
        try:
            verify(final)
            old = root / f".old_step_{step:06d}_{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        except CheckpointError as e:
            log(f"[checkpoint] {e}; set aside as {set_aside(final).name}")
    os.replace(tmp, final)
    _fsync(root)
    if old is not None:  # the new folder is in place: the replaced copy is no longer the only one
        shutil.rmtree(old, ignore_errors=True)
    _VERIFIED[str(final.resolve())] = _fingerprint(final)  # hashed just now: retention need not read it back
    return final


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file; its I/O failures (reported as SafetensorError) as the OSError they are."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as e:
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]

    def load(self, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        path = self.path / f"{name}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"checkpoint {self.path} has no {name}.safetensors")
        try:
            tensors = load_file(str(path), device=device)
        except SafetensorError as e:
            raise CheckpointError(f"checkpoint {self.path}: {name}.safetensors cannot be read ({str(e)[:120]})") from None
        for alias, target in self.meta.get("aliases", {}).get(name, {}).items():
            if target not in tensors:
                raise CheckpointError(f"checkpoint {self.path}: alias {alias!r} names a missing tensor {target!r} in {name}.safetensors")
            tensors[alias] = tensors[target]
        return tensors

    def has(self, name: str) -> bool:
        return f"{name}.safetensors" in self.meta.get("files", {})


# --------------------------------------------------------------------------- meta.json schema
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_hex64(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _is_aliases(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(d, dict) and all(isinstance(a, str) and isinstance(b, str) for a, b in d.items())
                                       for d in v.values())


# key -> (required, check, what it must be). Keys beyond these are allowed (other writers' facts).
META_SCHEMA: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "step": (True, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "files": (True, lambda v: isinstance(v, dict) and bool(v) and all(isinstance(k, str) and _is_hex64(h) for k, h in v.items()),
              "a non-empty mapping of file name -> SHA-256"),
    "meta_sha256": (True, _is_hex64, "the SHA-256 of meta.json's canonical form"),
    "aliases": (False, _is_aliases, "a mapping of file -> {alias: tensor}"),
    "config": (False, lambda v: isinstance(v, dict), "a mapping (the run config)"),
    "optimizer": (False, lambda v: isinstance(v, dict), "a mapping"),
    "method": (False, lambda v: isinstance(v, dict), "a mapping"),
    "method_name": (False, lambda v: isinstance(v, str), "a string"),
    "adapters": (False, lambda v: isinstance(v, dict) and all(isinstance(f, dict) and _is_int(f.get("rank")) and isinstance(f.get("scaling"), (int, float))
                                                              for f in v.values()),
                 "a mapping of layer -> {rank, scaling}"),
    "world_size": (False, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "tokens": (False, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "tokenizer_hash": (False, lambda v: isinstance(v, str), "a string"),
    "corpus": (False, lambda v: isinstance(v, str), "a string"),
}


def check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """`meta` fits META_SCHEMA, its own hash and its folder's name; else CheckpointError (one line)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: meta.json holds a {type(meta).__name__}, not a mapping")
    for key, (required, ok, what) in META_SCHEMA.items():
        if key not in meta:
            if required:
                raise CheckpointError(f"checkpoint {path} is corrupt: meta.json has no {key!r}")
        elif not ok(meta[key]):
            raise CheckpointError(f"checkpoint {path} is corrupt: meta.json's {key!r} must be {what}")
    if canonical_sha256(meta) != meta["meta_sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt (meta.json fails its SHA-256 check)")
    m = STEP_DIR.match(path.name)
    if m and int(m.group(1)) != meta["step"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: meta.json says step {meta['step']}")
    bad = [f for f in meta["files"] if Path(f).name != f or f == "meta.json"]
    if bad:
        raise CheckpointError(f"checkpoint {path} is corrupt: meta.json lists {bad[0]!r}, not a file of the folder")
    return meta


# (folder, file sizes and mtimes) of folders whose hashes were checked in this process: a
# checkpoint is immutable once renamed into place, so retention need not re-hash it at every save
_VERIFIED: dict[str, tuple] = {}


def _fingerprint(path: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()))


def verify(path: Path) -> Checkpoint:
    """Open and check one checkpoint folder (schema, every file's SHA-256, meta.json's own);
    CheckpointError names what is wrong."""
    mf = path / "meta.json"
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no meta.json)")
    try:
        meta = check_meta(json.loads(mf.read_text()), path)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"checkpoint {path} has a corrupt meta.json") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path}: meta.json cannot be read ({e.strerror})") from None
    try:
        fingerprint = _fingerprint(path)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror})") from None
    if _VERIFIED.get(str(path.resolve())) != fingerprint:
        unlisted = sorted(p.name for p in path.iterdir() if p.name != "meta.json" and p.name not in meta["files"])
        if unlisted:
            raise CheckpointError(f"checkpoint {path} is corrupt: {unlisted[0]} is not covered by meta.json's hashes")
        for fname, digest in meta["files"].items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"checkpoint {path} is missing {fname}")
            if _sha256(f) != digest:
                raise CheckpointError(f"checkpoint {path} is corrupt ({fname} fails its SHA-256 check)")
        _VERIFIED[str(path.resolve())] = fingerprint
    return Checkpoint(path, meta["step"], meta)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_valid(root: Path, log=print, set_aside_invalid: bool = False) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped (never deleted).
    `set_aside_invalid` (the run's writer, when it resumes): the corrupt folders newer than the one
    found are renamed `invalid-step_N-<time>` at once, so a later save of their step cannot touch them.
    When none verifies, nothing is renamed (the caller refuses to start over in silence)."""
    bad: list[Path] = []
    for step, path in reversed(list_checkpoints(root)):
        try:
            found = verify(path)
        except CheckpointError as e:
            log(f"[checkpoint] {e}; falling back to the previous checkpoint")
            bad.append(path)
            continue
        for p in bad if set_aside_invalid else []:
            log(f"[checkpoint] {p.name} set aside as {set_aside(p).name} (kept for inspection)")
        return found
    return None


def _verifies(path: Path) -> bool:
    try:
        verify(path)
        return True
    except CheckpointError:
        return False


def recover(root: Path, log=print) -> None:
    """Finish a re-save that was killed between its two renames (see the module docstring): a complete
    `.tmp_step_N_*` whose step has no folder is renamed in, else a `.old_step_N_*` is renamed back.
    Only the run's writer (who holds its lock) calls this; it never deletes a folder that is the only copy."""
    if not root.is_dir():
        return
    for prefix in (".tmp_step_", ".old_step_"):
        for p in sorted(root.glob(prefix + "*")):
            m = re.match(re.escape(prefix) + r"(\d{6,})_\d+$", p.name)
            if m is None or not p.is_dir():
                continue
            final = step_dir(root, int(m.group(1)))
            if final.exists():
                continue
            try:
                meta = json.loads((p / "meta.json").read_text()) if (p / "meta.json").is_file() else None
                complete = isinstance(meta, dict) and meta.get("step") == int(m.group(1))
            except (OSError, ValueError):
                complete = False
            if complete:  # verify() checks the folder's name against its step: rename first, then check
                os.replace(p, final)
                if _verifies(final):
                    log(f"[checkpoint] {p.name} (a save interrupted between its renames) restored as {final.name}")
                    continue
                os.replace(final, p)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A run directory (its newest valid checkpoint) or one checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a run directory or a checkpoints/step_N folder")
    if (path / "meta.json").exists():
        return verify(path)
    ck = latest_valid(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if ck is None:
        raise CheckpointError(f"no valid checkpoint under {path}; train first or give a checkpoints/step_N folder")
    return ck


def set_aside(path: Path, prefix: str = "invalid") -> Path:
    """Rename a checkpoint folder out of the step_N namespace (kept for inspection, never deleted)."""
    target = path.with_name(f"{prefix}-{path.name}-{time.strftime('%Y%m%dT%H%M%S')}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{prefix}-{path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{n}")
    os.replace(path, target)
    return target


def prune_checkpoints(root: Path, keep_last: int, keep_steps: set[int], log=print) -> None:
    """Retention: keep the newest `keep_last` checkpoints that verify and every one in
    `keep_steps`; delete the other verified ones; set invalid folders aside (reported)."""
    kept = 0
    for step, path in reversed(list_checkpoints(root)):
        try:
            verify(path)
        except CheckpointError as e:
            log(f"[checkpoint] {e}; set aside as {set_aside(path).name}")
            continue
        kept += 1
        if kept > keep_last and step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)
            _VERIFIED.pop(str(path.resolve()), None)
    recover(root, log)
    for p in root.glob(".tmp_step_*"):  # leftovers of a write that was killed (never the only copy: see recover)
        m = re.match(r"\.tmp_step_(\d{6,})_\d+$", p.name)
        if m is None or _verifies(step_dir(root, int(m.group(1)))) or not (p / "meta.json").is_file():
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".old_step_*"):  # the replaced copy of a re-save, once the new folder verifies
        m = re.match(r"\.old_step_(\d{6,})_\d+$", p.name)
        if m is not None and _verifies(step_dir(root, int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)
