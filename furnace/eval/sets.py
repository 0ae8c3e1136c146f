"""Evaluation sets read from the formats the field publishes them in.

Every reader returns a list of items, plain dicts in the set's own order, each with an `id`
and an `image` (a file path, or the bytes of a webdataset member), plus its task's fields:
`captions` (caption, retrieval), `question`/`answers`/`answer_type` (VQA), `label` (an index
into the class names: classification). Malformed files fail in one line that names the file
and what is wrong; an item whose image file is missing is left out and counted.
"""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path

from furnace.data.images import IMAGE_EXTS
from furnace.data.sources import expand_shards
from furnace.data.tar import ReadLimits, iter_shard_samples


class EvalSetError(ValueError):
    """A set that cannot be read as asked: the message names the file and the fix."""


def _json(path, what: str):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EvalSetError(f"{what} {str(path)!r} does not exist") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise EvalSetError(f"{what} {str(path)!r} is not JSON ({e})") from None


def _records(doc, key: str, fields: tuple[str, ...], path, what: str) -> list[dict]:
    rows = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise EvalSetError(f"{what} {str(path)!r} has no {key!r} list: expected the official COCO/VQA layout")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or any(f not in r for f in fields):
            raise EvalSetError(f"{what} {str(path)!r}: {key}[{i}] lacks {', '.join(f for f in fields if f not in r) if isinstance(r, dict) else 'an object'}")
    return rows


def _keep_present(items: list[dict], skipped: collections.Counter) -> list[dict]:
    kept = [it for it in items if not isinstance(it["image"], Path) or it["image"].is_file()]
    if len(kept) < len(items):
        skipped["missing_image"] += len(items) - len(kept)
    return kept


def coco_captions(annotations, images, skipped: collections.Counter) -> list[dict]:
    """A COCO-format captions file (`images`: id, file_name; `annotations`: image_id, caption)
    -> one item per image with every caption of it, in the file's image order; images without
    a caption are left out (counted: no_caption)."""
    doc = _json(annotations, "the captions file")
    imgs = _records(doc, "images", ("id", "file_name"), annotations, "the captions file")
    anns = _records(doc, "annotations", ("image_id", "caption"), annotations, "the captions file")
    caps = collections.defaultdict(list)
    for a in anns:
        caps[a["image_id"]].append(str(a["caption"]))
    items = []
    for im in imgs:
        if not caps.get(im["id"]):
            skipped["no_caption"] += 1
            continue
        items.append({"id": im["id"], "image": Path(images) / im["file_name"], "captions": caps[im["id"]]})
    return _keep_present(items, skipped)


def caption_shards(pattern: str, skipped: collections.Counter) -> list[dict]:
    """Webdataset caption pairs (`key.jpg|png|webp` + `key.txt`, or a .json with "caption" or
    "captions"), read under the loader's bounds; samples without both parts are counted."""
    items = []
    for url in expand_shards(pattern):
        for raw in iter_shard_samples(url, skipped, ReadLimits()):
            image = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
            caps = _shard_captions(raw)
            if "__skip__" in raw or image is None or not caps:
                skipped["bad_sample"] += 1
                continue
            items.append({"id": raw["__key__"], "image": image, "captions": caps})
    if not items:
        raise EvalSetError(f"no caption pairs in {pattern!r}: expected shards of key.jpg + key.txt samples")
    return items


def _shard_captions(raw: dict) -> list[str]:
    try:
        if "txt" in raw:
            return [raw["txt"].decode("utf-8").strip()]
        if "json" in raw:
            doc = json.loads(raw["json"].decode("utf-8"))
            caps = doc.get("captions") or [doc.get("caption")]
            return [str(c).strip() for c in caps if isinstance(c, str) and c.strip()]
    except (UnicodeDecodeError, ValueError, AttributeError):
        pass
    return []


def image_index(folder) -> dict[int, Path]:
    """image id -> file, from the trailing number of each image file's name: COCO's
    `COCO_val2014_000000000042.jpg` and a plain `42.png` both give 42."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalSetError(f"the image folder {str(folder)!r} does not exist")
    out = {}
    for p in folder.iterdir():
        m = re.search(r"(\d+)$", p.stem)
        if m and p.suffix.lower().lstrip(".") in IMAGE_EXTS:
            out[int(m.group(1))] = p
    return out


def vqa(questions, annotations, images, skipped: collections.Counter) -> list[dict]:
    """VQAv2's two files (`questions`: question_id, image_id, question; `annotations`:
    question_id, answers [{answer}], answer_type) -> one item per question with its human
    answers. Images are found by id in the folder (`image_index`)."""
    qs = _records(_json(questions, "the questions file"), "questions", ("question_id", "image_id", "question"),
                  questions, "the questions file")
    anns = _records(_json(annotations, "the annotations file"), "annotations", ("question_id", "answers"),
                    annotations, "the annotations file")
    by_q = {a["question_id"]: a for a in anns}
    files = image_index(images)
    items = []
    for q in qs:
        a = by_q.get(q["question_id"])
        if a is None:
            skipped["no_annotation"] += 1
            continue
        answers = [str(x["answer"]) if isinstance(x, dict) else str(x) for x in a["answers"]]
        if q["image_id"] not in files:
            skipped["missing_image"] += 1
            continue
        items.append({"id": q["question_id"], "image": files[q["image_id"]], "image_id": q["image_id"],
                      "question": str(q["question"]), "answers": answers,
                      "answer_type": str(a.get("answer_type", "all"))})
    return items


def image_folder(root, class_names=None) -> tuple[list[dict], list[str]]:
    """An ImageNet-style folder (one subfolder of images per class) -> (items, class names).
    `class_names`: a JSON file mapping a subfolder's name to the words the prompt uses (a list,
    in sorted-subfolder order, or an object); by default the subfolder's name, `_` as spaces."""
    root = Path(root)
    if not root.is_dir():
        raise EvalSetError(f"the image folder {str(root)!r} does not exist")
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not dirs:
        raise EvalSetError(f"{str(root)!r} has no class subfolders: classification reads ROOT/<class>/<image>")
    names = [d.name.replace("_", " ") for d in dirs]
    if class_names is not None:
        given = _json(class_names, "the class names file")
        if isinstance(given, list) and len(given) == len(dirs):
            names = [str(n) for n in given]
        elif isinstance(given, dict) and all(d.name in given for d in dirs):
            names = [str(given[d.name]) for d in dirs]
        else:
            raise EvalSetError(f"the class names file {str(class_names)!r} must be a list of {len(dirs)} names "
                               "(sorted-subfolder order) or an object naming every subfolder")
    items = [{"id": f"{d.name}/{p.name}", "image": p, "label": k}
             for k, d in enumerate(dirs) for p in sorted(d.iterdir())
             if p.suffix.lower().lstrip(".") in IMAGE_EXTS]
    return items, names
