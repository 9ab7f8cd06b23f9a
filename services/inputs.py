"""Which files a job submitted over HTTP may read: corpora and models only from configured roots.

A job runs as the service's user, so without this check any file that user can read (the API token, the
job database, ``/etc/shadow``) could be copied into a dataset with ``format: text``. Every input path is made
absolute, its symlinks resolved, and then it must lie under one of the roots of its kind. Nothing inside the
state directory is readable unless a root itself lies inside it (the default ``<state_dir>/corpora`` and
``<state_dir>/models``). The spec handed to the job names the resolved paths, so the job reads what was checked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from services.config import Settings

# (section, field) of each spec path a job reads → the kind of root it must lie in.
INPUT_PATHS = {("corpus", "path"): "corpus", ("corpus", "target_path"): "corpus",
               ("teacher", "model"): "model", ("teacher", "tokenizer"): "model"}


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def allowed(path: Path, roots: list[Path], state: Path) -> bool:
    """Whether the resolved ``path`` lies under a root, and outside the state dir unless that root is in it."""
    for root in roots:
        if _inside(path, root) and (not _inside(path, state) or (root != state and _inside(root, state))):
            return True
    return False


def confine_inputs(spec: dict[str, Any], settings: Settings, *, cwd: Path | None = None) -> list[dict[str, Any]]:
    """Resolve the spec's input paths in place; return a 422-style error for every path outside its roots.

    Args:
        spec: The job spec as JSON data (changed in place: each input path becomes its resolved absolute path).
        settings: Where the roots and the state dir are.
        cwd: What relative paths are relative to (the service's working directory, which is also the embedded
            head's).
    """
    roots = {"corpus": settings.corpus_root_paths, "model": settings.model_root_paths}
    env = {"corpus": "DISTILLERY_CORPUS_ROOTS", "model": "DISTILLERY_MODEL_ROOTS"}
    errors = []
    for (section, field), kind in INPUT_PATHS.items():
        value = (spec.get(section) or {}).get(field)
        if value is None:
            continue
        try:
            resolved = Path(os.path.realpath(Path(cwd or Path.cwd()) / Path(value).expanduser()))
        except (ValueError, OSError, RuntimeError):  # a NUL byte, a symlink loop
            resolved = None
        if resolved is not None and allowed(resolved, roots[kind], settings.state_path):
            spec[section][field] = str(resolved)
            continue
        where = ", ".join(map(str, roots[kind]))
        errors.append({"type": "value_error", "loc": ["body", section, field], "input": value,
                       "msg": f"{kind} paths must lie under one of: {where} (symlinks resolved; set {env[kind]})"})
    return errors
