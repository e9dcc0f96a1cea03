"""Which CSV/TSV columns hold an annotation's image, caption and image id (docs/FORMATS.md, "CSV column
mapping"): one description shared by every reader of CSV annotations (``data/retrieval.py`` train and
eval splits, ``data/pretrain.py`` pair lists, ``data/pairs.py`` tool inputs).

Product data (AliProducts and the like) rarely has BLIP's ``image,caption`` header: the title is in
``title``, the picture in a folder column plus a file column. ``Columns(image="file",
caption="title", image_dir="folder")`` reads such a file with the image path ``folder/file``
(``os.path.join``, relative to ``image_root`` as every path). A config names them with the keys
``image_col``, ``caption_col``, ``image_dir_col``, ``image_id_col`` (``utils.settings.ColumnSettings``);
the tools with ``--image_col``, ``--caption_col``, ``--image_dir_col``.

A missing column is a ``DataError`` naming the file, the column, the key or flag that chose it, and
the file's columns, raised while the data is parsed: before any model is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from utils.errors import DataError

# How a message names the setting that chose a column: config keys, or the tools' flags.
CONFIG, FLAGS = "config", "flags"
_KEYS = {"image": "image_col", "caption": "caption_col", "image_dir": "image_dir_col", "image_id": "image_id_col"}


@dataclass(frozen=True)
class Columns:
    """The column names of one kind of CSV file; ``image_dir`` None: ``image`` holds the whole path."""
    image: str = "image"
    caption: str = "caption"
    image_dir: Optional[str] = None
    image_id: str = "image_id"
    named_by: str = CONFIG      # CONFIG | FLAGS: how messages name the setting of a column

    @classmethod
    def of(cls, cfg_like: Any) -> "Columns":
        """From a config with ``ColumnSettings`` keys (anything without them: BLIP's names)."""
        return cls(image=getattr(cfg_like, "image_col", "image") or "image",
                   caption=getattr(cfg_like, "caption_col", "caption") or "caption",
                   image_dir=getattr(cfg_like, "image_dir_col", None) or None,
                   image_id=getattr(cfg_like, "image_id_col", "image_id") or "image_id")

    def setting(self, role: str) -> str:
        key = _KEYS[role]
        return f"--{key}" if self.named_by == FLAGS else key

    @property
    def image_field(self) -> str:
        """How a message names the image 'field' of a row: ``'file'`` or ``'folder'/'file'``."""
        return self.image if self.image_dir is None else f"{self.image_dir}/{self.image}"

    def require(self, header: Sequence[str], path: Any, roles: Sequence[str] = ("image", "caption"),
                extra: Sequence[tuple[str, str]] = ()) -> dict[str, int]:
        """``{role: column index}`` of ``roles`` (``"image"`` includes ``image_dir`` when set) and of
        ``extra`` ``(name, what)`` columns (``what`` names them in a message, e.g. ``"--id_col"``).

        Raises ``DataError``: ``FILE: no column 'title' (caption_col) (columns: [...])``."""
        wanted: list[tuple[str, str, str]] = []  # (role, column, setting)
        for role in roles:
            if role == "image" and self.image_dir is not None:
                wanted.append(("image_dir", self.image_dir, self.setting("image_dir")))
            wanted.append((role, getattr(self, role), self.setting(role)))
        wanted.extend((name, name, what) for name, what in extra)
        missing = [f"{column!r} ({setting})" for _, column, setting in wanted if column not in header]
        if missing:
            how = ("the config keys image_col / caption_col / image_dir_col" if self.named_by == CONFIG
                   else "--image_col / --caption_col / --image_dir_col")
            raise DataError(f"{path}: no column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                            f"(columns: {list(header)}); name the file's columns with {how}")
        return {role: list(header).index(column) for role, column, _ in wanted}

    def image_of(self, fields: Sequence[str], index: dict[str, int], where: str) -> str:
        """The image path of a row (``folder/file`` with ``image_dir``); an empty cell is an error
        naming the row and the column."""
        file = fields[index["image"]]
        if not file.strip():
            raise DataError(f"{where}: invalid field {self.image!r}: expected a non-empty path string, got {file!r}")
        if self.image_dir is None:
            return file
        folder = fields[index["image_dir"]]
        if not folder.strip():
            raise DataError(f"{where}: invalid field {self.image_dir!r}: expected a non-empty folder "
                            f"(image_dir column), got {folder!r}")
        return os.path.join(folder, file)


DEFAULT = Columns()
