"""The on-disk index of a photo folder: which files, embedded by which model, and their embeddings.

An index directory holds `index.json` (the folder, the model directory and its fingerprint, one
entry per file: path relative to the folder, size, modification time) and the embeddings, one
row per entry, in a `.npy` file whose name `index.json` gives. A save writes a new embeddings
file first and then replaces `index.json` in one rename, so an interrupted run leaves the old
index whole.

`update` makes the index match the folder again: files whose (path, size, mtime) are unchanged
keep their rows, new and changed files are embedded, removed files are dropped.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dualencoder.apps.photos import find_images, open_all

INDEX_FILE = "index.json"
FORMAT = 1


@dataclass
class UpdateReport:
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list = field(default_factory=list)  # one message per unreadable image

    def summary(self) -> str:
        text = (f"{self.added} new, {self.changed} changed, {self.removed} removed, {self.unchanged} unchanged; "
                f"{len(self.skipped)} unreadable image(s) skipped")
        return text + "".join(f"\n  skipped {message}" for message in self.skipped)


@dataclass
class PhotoIndex:
    directory: Path
    images_dir: Path
    model_dir: str
    model_fingerprint: str
    entries: list  # dicts: path (relative to images_dir), size, mtime_ns
    embeddings: np.ndarray  # [len(entries), D] float32, L2-normalised

    @classmethod
    def load(cls, directory) -> "PhotoIndex":
        directory = Path(directory)
        manifest = directory / INDEX_FILE
        if not manifest.is_file():
            raise SystemExit(f"{directory}: no {INDEX_FILE}, so no photo index there; make one with "
                             "`python -m dualencoder.apps.index --model_dir MODEL --images FOLDER --index_dir "
                             f"{directory}`")
        data = json.loads(manifest.read_text())
        embeddings = np.load(directory / data["embeddings_file"])
        return cls(directory, Path(data["images_dir"]), data["model_dir"], data["model_fingerprint"], data["entries"],
                   embeddings)

    @classmethod
    def open_or_create(cls, directory, images_dir, model_dir, fingerprint: str, rebuild: bool = False) -> "PhotoIndex":
        """The index in `directory` when it exists (it must be of this folder and model), else an empty one."""
        directory, images_dir = Path(directory), Path(images_dir).resolve()
        if (directory / INDEX_FILE).is_file() and not rebuild:
            index = cls.load(directory)
            index.check_model(fingerprint, model_dir)
            if index.images_dir != images_dir:
                raise SystemExit(f"{directory} indexes {index.images_dir}, not {images_dir}: use another --index_dir "
                                 "for another folder (or --rebuild to replace this index)")
            index.model_dir = str(Path(model_dir).resolve())
            return index
        return cls(directory, images_dir, str(Path(model_dir).resolve()), fingerprint, [], np.zeros((0, 0), np.float32))

    def check_model(self, fingerprint: str, model_dir) -> None:
        """Refuse a model other than the one whose embeddings the index holds: their spaces differ."""
        if fingerprint != self.model_fingerprint:
            raise SystemExit(
                f"{self.directory} was made with the model in {self.model_dir} (fingerprint {self.model_fingerprint}), "
                f"but {model_dir} is a different model (fingerprint {fingerprint}): embeddings of two models are not "
                "comparable. Use the index's model, or re-index with this one into a new --index_dir (or --rebuild).")

    def paths(self) -> list[Path]:
        return [self.images_dir / entry["path"] for entry in self.entries]

    def update(self, embed_images: Callable, batch_size: int = 32, progress: Optional[Callable] = None) -> UpdateReport:
        """Embed new and changed files of the folder, drop removed ones; `embed_images(list of PIL) -> [n, D]`."""
        report = UpdateReport()
        known = {entry["path"]: (row, entry) for row, entry in enumerate(self.entries)}
        keep_rows, keep_entries, todo = [], [], []
        for path in find_images(self.images_dir):
            stat = path.stat()
            entry = {"path": path.relative_to(self.images_dir).as_posix(), "size": stat.st_size,
                     "mtime_ns": stat.st_mtime_ns}
            row, old = known.pop(entry["path"], (None, None))
            if old == entry:
                keep_rows.append(row)
                keep_entries.append(entry)
                report.unchanged += 1
            else:
                todo.append((path, entry, old is not None))
        report.removed = len(known)
        bar = progress(total=len(todo)) if progress is not None and todo else None
        new_entries, new_vectors = [], []
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            images, opened, errors = open_all([path for path, _, _ in batch])
            report.skipped += errors
            opened = set(opened)
            done = [(entry, changed) for path, entry, changed in batch if path in opened]
            if images:
                new_vectors.append(embed_images(images))
            for entry, changed in done:
                new_entries.append(entry)
                report.changed += changed
                report.added += not changed
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        parts = [self.embeddings[keep_rows]] if keep_rows else []
        parts += new_vectors
        self.entries = keep_entries + new_entries
        self.embeddings = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)
        return report

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / INDEX_FILE
        old = json.loads(manifest.read_text())["embeddings_file"] if manifest.is_file() else None
        name = f"embeddings-{uuid.uuid4().hex[:8]}.npy"
        np.save(self.directory / name, self.embeddings)
        data = {"format": FORMAT, "images_dir": str(self.images_dir), "model_dir": self.model_dir,
                "model_fingerprint": self.model_fingerprint, "embeddings_file": name, "entries": self.entries}
        tmp = manifest.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, manifest)
        if old and old != name:
            (self.directory / old).unlink(missing_ok=True)
