"""The checkpoint of a run: written atomically after every epoch, and read back with ``weights_only=True``
(tensors and plain Python data only), so that a crafted file cannot run code on --resume. A file that is
not a checkpoint of this command is reported by name, with what is wrong, before anything is restored."""
import os
import pickle
import re

import torch

# entry -> the type it must have (the scaler's state is None without --amp fp16)
ENTRIES = {"model": dict, "optimizer": dict, "scheduler": dict, "scaler": (dict, type(None)), "rng": dict,
           "history": list, "epoch": int, "config": dict}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong."""


def save(state: dict, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: str) -> dict:
    """The checkpoint at ``path``, its tensors on the CPU. Memory-mapped: --resume checks every checkpoint
    (its settings) before the first run, and each run loads its own again, so only what is used is read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch.load raises anything (EOFError, KeyError, ...) on a file it cannot parse
        raise CheckpointError(f"checkpoint {path}: {_why_unreadable(err)}") from None
    problem = _problem(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    return ckpt


def _why_unreadable(err: Exception) -> str:
    refused_global = re.search(r"GLOBAL (\S+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if refused_global:
        return (f"refused: it holds Python objects ({refused_global[1]}) besides tensors and plain data, and "
                f"would run code if loaded")
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return "not a readable torch.save file (empty, truncated or another format)"


def _problem(ckpt) -> str | None:
    """What makes ``ckpt`` no checkpoint of this command, or None."""
    if not isinstance(ckpt, dict):
        return f"holds a {type(ckpt).__name__}, not the dict of a training run ({', '.join(ENTRIES)})"
    missing = [key for key in ENTRIES if key not in ckpt]
    if missing:
        return f"not a checkpoint of this command: no {', '.join(missing)}"
    wrong = [key for key, kind in ENTRIES.items() if not isinstance(ckpt[key], kind)]
    if wrong:
        return f"not a checkpoint of this command: {', '.join(wrong)} of the wrong type"
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        return "not a checkpoint of this command: its model holds more than tensors"
    if not isinstance(ckpt["rng"].get("torch"), torch.Tensor):
        return "not a checkpoint of this command: no torch RNG state"
    if ckpt["epoch"] != len(ckpt["history"]) or not all(isinstance(r, dict) for r in ckpt["history"]):
        return f"inconsistent: epoch {ckpt['epoch']} but {len(ckpt['history'])} records of epochs"
    if not isinstance(ckpt["config"].get("settings"), dict):
        return "no settings recorded (written by an older version of the command; start over in another --out-dir)"
    return None
