"""The output folder of a run: checks that nothing a user has is overwritten, and atomic saves.

- `check_output_dir(output_dir, reading)`: refuse a file, an unwritable place, the folder of a model being read, or a
  folder whose checkpoint rotation would delete a model being read (`reading`: `{what: path}`).
- `check_previous_run(output_dir, overwrite, resuming)`: refuse a folder that already holds a trained model or
  checkpoints, unless the run resumes or `overwrite` is set; `stale_checkpoints` lists what an overwrite deletes.
- `replace_files(staging, output_dir)`: move a save written in full to `staging` into `output_dir`, one
  `os.replace` per file (atomic on one filesystem), so an interrupted save leaves each file old or new, never partial;
  weights of the previous model that the new save does not have are removed after.
"""

import glob
import os
import re
import shutil
import tempfile

WEIGHT_PATTERNS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
CHECKPOINT = re.compile(r"checkpoint-\d+")
STAGING_DIR = ".trl-unlearn-saving"  # inside output_dir: the same filesystem, so `os.replace` is atomic


def weight_files(folder: str) -> list[str]:
    """Names of the model weight files at the top of `folder` (sorted)."""
    return sorted({os.path.basename(p) for pat in WEIGHT_PATTERNS for p in glob.glob(os.path.join(folder, pat))})


def checkpoints(folder: str) -> list[str]:
    """Names of the `checkpoint-N` folders in `folder`, by step."""
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if CHECKPOINT.fullmatch(n) and os.path.isdir(os.path.join(folder, n))]
    return sorted(names, key=lambda n: int(n.split("-")[1]))


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_dir(output_dir: str, reading: dict[str, str | None]) -> None:
    """One-line errors for an `output_dir` that cannot or must not be written: a file, a place without write
    permission, a folder of `reading` (`{"model_name_or_path": path, ...}`, the folders the run reads), or a folder
    holding one of them as `checkpoint-N` (rotation and `overwrite_output_dir` delete checkpoints)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"`output_dir` {output_dir!r} is a file, not a folder: give a folder path.")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"`output_dir` {output_dir!r} is inside a file ({existing}), not a folder: give a folder path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"`output_dir` {output_dir!r} cannot be written ({existing} is not writable): choose a "
            "folder you can write to."
        )
    for what, path in reading.items():
        if not path or not os.path.isdir(path):
            continue
        if _same(path, output_dir):
            raise ValueError(
                f"`output_dir` {output_dir!r} is the folder of `{what}` being read: saving there would "
                "overwrite it. Choose another `output_dir`."
            )
        if CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path))) and _same(
            os.path.dirname(os.path.abspath(path)), output_dir
        ):
            raise ValueError(
                f"`output_dir` {output_dir!r} holds `{what}` ({path}) as a checkpoint, which checkpoint "
                "rotation or `overwrite_output_dir` would delete. Choose another `output_dir`."
            )


def check_previous_run(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """Refuse to start a new run in a folder holding a trained model or checkpoints of an earlier run, unless it
    resumes (`resuming`) or the user asked to overwrite."""
    if resuming or overwrite or not os.path.isdir(output_dir):
        return
    found = weight_files(output_dir) + checkpoints(output_dir)
    if found:
        raise ValueError(
            f"`output_dir` {output_dir!r} already holds a trained model or checkpoints ({', '.join(found[:4])}): "
            "choose another folder, resume with `resume_from_checkpoint`, or pass `overwrite_output_dir=True` "
            "(`--overwrite_output_dir true`) to replace them."
        )


def stale_checkpoints(output_dir: str, overwrite: bool, resuming: bool) -> list[str]:
    """The checkpoint folders of an earlier run that an overwriting new run deletes before it starts (paths)."""
    if resuming or not overwrite:
        return []
    return [os.path.join(output_dir, n) for n in checkpoints(output_dir)]


def remove_folders(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path)


def staging_dir(output_dir: str) -> str:
    """A fresh, empty staging folder inside `output_dir` (a leftover of an interrupted save is removed first)."""
    path = os.path.join(output_dir, STAGING_DIR)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def replace_files(staging: str, output_dir: str) -> list[str]:
    """Move every file of `staging` into `output_dir` (`os.replace`, atomic per file; weights last, so a reader
    never sees new weights under an old config), then remove the previous model's weight files that the new save
    does not have (e.g. shards of a larger save) and `staging`. Returns the names moved."""
    new_weights = set(weight_files(staging))
    names = sorted(os.listdir(staging), key=lambda n: (n in new_weights, n))
    stale = [n for n in weight_files(output_dir) if n not in new_weights]
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    for name in stale:
        os.remove(os.path.join(output_dir, name))
    os.rmdir(staging)
    return names


def resume_flag(value):
    """`resume_from_checkpoint` as `Trainer.train` takes it: the strings "true" / "false" / "none" (a command line or
    YAML gives them) become True / None; anything else is kept."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "none", ""):
        return value.strip().lower() == "true" or None
    return value


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`: a reader sees the old
    file or the new one, never a part; the temporary file is removed if writing fails."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
