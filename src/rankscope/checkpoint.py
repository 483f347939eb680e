"""Checkpoints: plain tensors in safetensors files plus a JSON sidecar, written atomically.

Layout: `checkpoints/step_000100/{model,optimizer,extra}.safetensors` and `meta.json`.
A checkpoint is written into a temporary folder (each file fsynced), its `meta.json` records the
SHA-256 of every file and is written last, then the folder is renamed into place. Loading verifies
the hashes; a truncated or corrupt checkpoint is reported and the previous one is used. A folder
that is not complete never has the final name, so nothing finished is ever overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rankscope.errors import CheckpointError

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


def save_checkpoint(root: Path, step: int, files: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> Path:
    """Atomically write `files` (name -> tensors) and `meta` as the checkpoint of `step`."""
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    hashes, aliases = {}, {}
    for name, tensors in files.items():
        path = tmp / f"{name}.safetensors"
        stored, aliases[name] = _dedupe(tensors)
        save_file(stored, str(path))
        _fsync(path)
        hashes[path.name] = _sha256(path)
    meta = {**meta, "step": step, "files": hashes, "aliases": aliases}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    _fsync(tmp / "meta.json")
    if final.exists():  # re-saving the same step (e.g. after a resume): replace the whole folder
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    return final


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]

    def load(self, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        path = self.path / f"{name}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"checkpoint {self.path} has no {name}.safetensors")
        tensors = load_file(str(path), device=device)
        for alias, target in self.meta.get("aliases", {}).get(name, {}).items():
            tensors[alias] = tensors[target]
        return tensors

    def has(self, name: str) -> bool:
        return f"{name}.safetensors" in self.meta.get("files", {})


def verify(path: Path) -> Checkpoint:
    """Open and hash-check one checkpoint folder; CheckpointError names what is wrong."""
    mf = path / "meta.json"
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no meta.json)")
    try:
        meta = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} has a corrupt meta.json") from None
    for fname, digest in meta.get("files", {}).items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {fname}")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt ({fname} fails its SHA-256 check)")
    return Checkpoint(path, int(meta["step"]), meta)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_valid(root: Path, log=print) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped (never deleted)."""
    for step, path in reversed(list_checkpoints(root)):
        try:
            return verify(path)
        except CheckpointError as e:
            log(f"[checkpoint] {e}; falling back to the previous checkpoint")
    return None


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


def prune_checkpoints(root: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Keep the newest `keep_last` checkpoints and those in `keep_steps`; delete the rest."""
    ckpts = list_checkpoints(root)
    newest = {s for s, _ in ckpts[-keep_last:]} if keep_last else set()
    for s, p in ckpts:
        if s not in newest and s not in keep_steps:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp_step_*"):  # leftovers of a write that was killed
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- optimiser state
def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten any optimiser's state_dict: tensors into a dict, everything else into JSON."""
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                plain[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "plain_state": plain}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = t
    for key, v in meta.get("plain_state", {}).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    try:
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state does not match this run ({e}); resume with the config the run was started with") from None
