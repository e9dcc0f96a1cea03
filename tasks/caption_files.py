"""The files of the COCO caption metrics: the image ids, the references (ground truth) they score
against, and the results json they score.

- ``ground_truth(entries, id_of)``: references from BLIP-json annotation entries (``coco_karpathy_
  {val,test}.json``, Flickr30k, custom); ``image_id_for(entry, dataset)`` is the usual ``id_of``.
- ``read_gt_file(path)``: references from a COCO caption-annotation file (BLIP's
  ``coco_karpathy_{val,test}_gt.json``).
- ``write_results(path, results)``: the COCO results json, written atomically.

Ids are ints or strings and compare by type too (``7`` and ``"7"`` are two images). COCO and
Flickr30k use the number at the end of the image file's name, as BLIP's ``*_gt.json`` files do;
custom data uses the entry's ``image_id``, else its image path as written.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Union

from utils.errors import DataError, json_error

ImageId = Union[int, str]
DATASETS = ("coco", "flickr", "nocaps", "custom")


# ------------------------------------------------------------------------------------ ground truth

def image_id_for(entry: Mapping[str, Any], dataset: str) -> ImageId:
    """The image id of an annotation entry ``{"image": path, ...}``, as the results and the
    references of ``dataset`` use it.

    ``coco`` / ``flickr``: the number at the end of the image file's stem
    (``val2014/COCO_val2014_000000391895.jpg`` -> ``391895``, ``flickr30k-images/1007129816.jpg``
    -> ``1007129816``), the ids of BLIP's ``*_gt.json`` files. ``custom``: the entry's ``image_id``
    (int or string) when present, else its ``image`` path exactly as written. ``nocaps``: the
    entry's ``img_id`` (BLIP's NoCaps files; the evaluation server's ids). A ``DataError``
    names the entry and the field when there is no such id."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")
    if not isinstance(entry, Mapping):
        raise DataError(f"annotation entry {_short(entry)}: expected an object with an 'image' field")
    if dataset == "nocaps":  # BLIP's nocaps_{val,test}.json: {"image", "img_id"}; the server's ids
        image_id = entry.get("img_id")
        if isinstance(image_id, str) and image_id.strip().isdigit():
            image_id = int(image_id)
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise DataError(f"annotation entry {_short(entry)} field 'img_id': expected the NoCaps image id (an "
                            f"int), got {_short(image_id)}")
        return image_id
    if dataset == "custom" and "image_id" in entry:
        image_id = entry["image_id"]
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) or image_id == "":
            raise DataError(f"annotation entry {_short(entry)} field 'image_id': expected an int or a "
                            f"non-empty string, got {_short(image_id)}")
        return image_id
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise DataError(f"annotation entry {_short(entry)} field 'image': expected the image path (a "
                        f"non-empty string), got {_short(image)}")
    if dataset == "custom":
        return image
    stem = (PureWindowsPath if "\\" in image else PurePosixPath)(image).stem
    match = re.search(r"(\d+)$", stem)
    if match is None:
        example = "COCO_val2014_000000391895.jpg" if dataset == "coco" else "1007129816.jpg"
        raise DataError(f"annotation entry {_short(entry)} field 'image': no image id at the end of the file "
                        f"name {os.path.basename(image)!r}; {dataset} ids are the number that ends the "
                        f"file's name (e.g. {example}); use dataset 'custom' for other names")
    return int(match.group(1))


def ground_truth(annotation_entries: Iterable[Mapping[str, Any]], id_of: Callable[[Mapping[str, Any]], ImageId],
                 source: str | os.PathLike | None = None) -> dict[ImageId, list[str]]:
    """``{id: [reference, ...]}`` from BLIP-json entries ``{"image": path, "caption": [str, ...] |
    str}`` (``coco_karpathy_{val,test}.json``, Flickr30k, custom), the id of each by ``id_of``
    (e.g. ``lambda e: image_id_for(e, "coco")``), in first-seen order. Entries with the same id
    pool their captions (custom files may give one caption per entry). An entry without captions,
    an empty or non-string caption is a ``DataError`` naming the entry (of ``source``, the file,
    when given) and the field."""
    where = f" of {source}" if source is not None else ""
    gts: dict[ImageId, list[str]] = {}
    for k, entry in enumerate(annotation_entries):
        if not isinstance(entry, Mapping):
            raise DataError(f"entry {k}{where}: expected an object with 'image' and 'caption', got {_short(entry)}")
        try:
            image_id = id_of(entry)
        except DataError as exc:
            raise DataError(f"entry {k}{where}: {exc}") from None
        if "caption" not in entry:
            raise DataError(f"entry {k}{where} (image {entry.get('image')!r}): no field 'caption'")
        captions = entry["caption"]
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list) or not captions:
            raise DataError(f"entry {k}{where} (image {entry.get('image')!r}) field 'caption': expected a "
                            f"caption or a non-empty list of captions, got {_short(entry['caption'])}")
        for j, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                at = "" if isinstance(entry["caption"], str) else f"[{j}]"
                raise DataError(f"entry {k}{where} (image {entry.get('image')!r}) field 'caption'{at}: "
                                f"expected a non-empty string, got {_short(caption)}")
        gts.setdefault(image_id, []).extend(captions)
    if not gts:
        raise DataError(f"no annotation entries{where}: nothing to evaluate captions against")
    return gts


def read_gt_file(path: str | os.PathLike) -> dict[ImageId, list[str]]:
    """``{image_id: [reference, ...]}`` from a COCO caption-annotation file (BLIP's
    ``coco_karpathy_{val,test}_gt.json``): ``{"annotations": [{"image_id": ..., "caption": str,
    ...}], "images": [{"id": ...}, ...]}``. The order is that of ``images`` (as COCOEvalCap scores
    them), else of first appearance in ``annotations``; captions keep their file order. With
    ``images``, every annotation's image must be listed and every listed image needs a caption.
    Errors are ``DataError``s naming the file and the field."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such ground-truth file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as json: {json_error(exc)}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        got = f"keys {sorted(data)[:8]}" if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a COCO caption-annotation object with an 'annotations' list "
                        f"({{'annotations': [{{'image_id': ..., 'caption': ...}}], 'images': [...]}}), got {got}")
    images = data.get("images")
    gts: dict[ImageId, list[str]] = {}
    if images is not None:
        if not isinstance(images, list):
            raise DataError(f"{path} field 'images': expected a list, got {type(images).__name__}")
        for k, image in enumerate(images):
            image_id = image.get("id") if isinstance(image, dict) else None
            if not _is_id(image_id):
                raise DataError(f"{path} images[{k}] field 'id': expected an int or a string, got "
                                f"{_short(image.get('id') if isinstance(image, dict) else image)}")
            if image_id in gts:
                raise DataError(f"{path} images[{k}] field 'id': image {image_id!r} is listed twice")
            gts[image_id] = []
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{path} annotations[{k}]: expected an object, got {_short(ann)}")
        image_id, caption = ann.get("image_id"), ann.get("caption")
        if not _is_id(image_id):
            raise DataError(f"{path} annotations[{k}] field 'image_id': expected an int or a string, "
                            f"got {_short(image_id)}")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{path} annotations[{k}] field 'caption': expected a non-empty string, "
                            f"got {_short(caption)}")
        if images is not None and image_id not in gts:
            raise DataError(f"{path} annotations[{k}] field 'image_id': image {image_id!r} is not in 'images'")
        gts.setdefault(image_id, []).append(caption)
    empty = [i for i, refs in gts.items() if not refs]
    if empty:
        raise DataError(f"{path} field 'images': {len(empty)} image(s) without any caption in "
                        f"'annotations': {_ids(empty)}")
    if not gts:
        raise DataError(f"{path} field 'annotations': no captions")
    return gts


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool) and value != ""


def _ids(ids: Sequence, limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------------------- results

def write_results(path: str | os.PathLike, results: Sequence[Mapping[str, Any]]) -> None:
    """Write the COCO results list ``[{"image_id": ..., "caption": ...}]`` to ``path`` as json,
    atomically (a temp file next to it, fsynced, then ``os.replace``): a reader never sees half a
    file, and a failure leaves any previous file as it was. The parent folder is created if needed;
    numpy / torch integer ids are written as ints."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        # os.open with 0o666 (not mkstemp's 0o600): the file gets the usual umask permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(list(results), f, ensure_ascii=False, default=_json_int)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temp file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _json_int(value: Any) -> int:
    """Integer-like ids json cannot write itself (numpy / torch integers)."""
    if hasattr(value, "__index__"):
        return value.__index__()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON serializable")
