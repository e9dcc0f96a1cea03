"""VQA data: BLIP's json layouts (``vqa_train.json``, ``vqa_val.json``, ``vg_qa.json``,
``vqa_test.json``, ``answer_list.json``) and custom json / CSV files through the same reader.

Entries (docs/FORMATS.md, "VQA"):

- train (``dataset: vqa``): ``{"question_id", "question", "answer": [every annotator's answer],
  "image", "dataset": "vqa"}``; each distinct answer weighs its share of the annotators' answers
  (BLIP's ``vqa_dataset``: ``1/len(answers)`` added per occurrence, in order of first occurrence);
- train (``dataset: vg``, Visual Genome QA): ``"answer"`` one string, weight ``vg_weight`` (BLIP: 0.2);
- test: ``{"question_id", "question", "image", "dataset"}``; an ``answer`` list, when present, is the
  ground truth VQA accuracy is computed against; ``answer_type`` / ``question_type`` (optional)
  give per-type accuracies.

Images are ``vqa_root/<image>`` (``dataset: vqa``) or ``vg_root/<image>`` (``dataset: vg``); an
absolute path is kept. Questions go through BLIP's ``pre_question``. A CSV/TSV file has one row per
question: columns ``image_col``, ``question_col``, ``answer_col`` (the annotators' answers joined
by ``answer_sep``) and optional ``question_id_col``, ``answer_type``, ``question_type`` columns.
Every problem is one line naming the file, the entry (or row and line) and the field.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from data.utils import load_image, read_csv, read_json, short_repr
from utils.errors import DataError

DATASETS = ("vqa", "vg")
VG_WEIGHT = 0.2  # BLIP's fixed weight of a Visual Genome answer


def pre_question(question: str, max_ques_words: int = 50) -> str:
    """BLIP's ``pre_question``: lower-cased, ``.!"()*#:;~`` removed (``?`` kept), trailing spaces
    stripped, at most ``max_ques_words`` words."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_ques_words]) if len(words) > max_ques_words else question


def answer_weights(answers: Sequence[str]) -> tuple[list, list]:
    """BLIP's weights of a VQA question's annotator answers: the distinct answers in order of first
    occurrence, each ``count / len(answers)`` summed as the release sums it (float by float)."""
    weight: Dict[str, float] = {}
    for a in answers:
        weight[a] = weight.get(a, 0.0) + 1 / len(answers)
    return list(weight), list(weight.values())


@dataclass
class VQAEntry:
    question_id: object
    question: str               # after pre_question
    image: str                  # joined path
    dataset: str                # 'vqa' | 'vg'
    answers: Optional[list]     # the annotators' answers (None: none given)
    answer_type: Optional[str] = None
    question_type: Optional[str] = None


@dataclass(frozen=True)
class VQAColumns:
    """The CSV columns of a VQA file (``image_col``, ``question_col``, ``answer_col``, ...)."""

    image: str = "image"
    question: str = "question"
    answer: str = "answer"
    question_id: str = "question_id"
    answer_sep: str = "|"

    @classmethod
    def of(cls, cfg) -> "VQAColumns":
        return cls(cfg.image_col, cfg.question_col, cfg.answer_col, cfg.question_id_col, cfg.answer_sep)


def _string(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}, field {field!r}: expected a non-empty string, got {short_repr(value)}")
    return value


def read_vqa_file(path, roots: Dict[str, str], need_answers: bool, columns: VQAColumns = VQAColumns(),
                  default_dataset: str = "vqa") -> tuple[list[VQAEntry], Callable[[int], str]]:
    """The entries of one VQA file and how a message names entry k. ``roots``: image folder per
    ``dataset`` tag; ``need_answers``: a training file (every entry needs its answers)."""
    path = Path(path)
    if str(path).lower().endswith((".csv", ".tsv")):
        raws, where = _csv_raws(path, columns, default_dataset)
    else:
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a json list of questions, got {type(data).__name__}")
        raws, where = data, (lambda k: f"entry {k} of {path}")
    if not raws:
        raise DataError(f"{path}: no questions; a split without entries would run on nothing")
    entries, seen = [], {}
    for k, raw in enumerate(raws):
        w = where(k)
        if not isinstance(raw, dict):
            raise DataError(f"{w}: expected an object with question_id, question, image, got {short_repr(raw)}")
        for field in ("question", "image"):
            if field not in raw:
                raise DataError(f"{w}: missing field {field!r}")
        tag = raw.get("dataset", default_dataset)
        if tag not in roots:
            raise DataError(f"{w}, field 'dataset': {short_repr(tag)} is not one of {sorted(roots)}")
        qid = raw.get("question_id", k)
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise DataError(f"{w}, field 'question_id': expected an integer or string, got {short_repr(qid)}")
        if qid in seen:
            raise DataError(f"{w}, field 'question_id': {qid!r} is also the id of {where(seen[qid])}")
        seen[qid] = k
        answers = raw.get("answer")
        if answers is not None:
            if tag == "vg" and isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not answers:
                raise DataError(f"{w}, field 'answer': expected a non-empty list of answer strings"
                                f"{' (vg: one string)' if tag == 'vg' else ''}, got {short_repr(answers)}")
            for a in answers:
                _string(a, w, "answer")
        elif need_answers:
            raise DataError(f"{w}: missing field 'answer' (a training question needs its annotators' answers)")
        question = pre_question(_string(raw["question"], w, "question"))
        image = _string(raw["image"], w, "image")
        root = roots[tag]
        entries.append(VQAEntry(qid, question, image if root is None else os.path.join(root, image), tag, answers,
                                raw.get("answer_type"), raw.get("question_type")))
    return entries, where


def _csv_raws(path: Path, columns: VQAColumns, default_dataset: str):
    header, rows = read_csv(path)
    for role, name in (("image_col", columns.image), ("question_col", columns.question)):
        if name not in header:
            raise DataError(f"{path}: no column {name!r} ({role}); the file's columns: {', '.join(header)}")
    index = {name: i for i, name in enumerate(header)}
    raws = []
    for row in rows:
        raw = {"image": row.fields[index[columns.image]], "question": row.fields[index[columns.question]],
               "dataset": default_dataset}
        if columns.question_id in index:
            text = row.fields[index[columns.question_id]]
            raw["question_id"] = int(text) if text.isdigit() else text
        if columns.answer in index and row.fields[index[columns.answer]].strip():
            raw["answer"] = [a.strip() for a in row.fields[index[columns.answer]].split(columns.answer_sep)]
        for extra in ("answer_type", "question_type"):
            if extra in index and row.fields[index[extra]].strip():
                raw[extra] = row.fields[index[extra]]
        raws.append(raw)
    return raws, (lambda k: rows[k].where(path))


def read_answer_list(path) -> List[str]:
    """BLIP's ``answer_list.json``: a json list of distinct candidate answer strings."""
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty json list of candidate answers, got {short_repr(data)}")
    first: Dict[str, int] = {}
    for k, a in enumerate(data):
        if not isinstance(a, str) or not a.strip():
            raise DataError(f"{path}, entry {k}: expected a non-empty answer string, got {short_repr(a)}")
        if a in first:
            raise DataError(f"{path}, entry {k}: answer {a!r} is also entry {first[a]}; candidates must be distinct")
        first[a] = k
    return data


class VQADataset(Dataset):
    """The questions of one split, from one or more files. Train items: ``(image, question,
    answers, weights)`` (BLIP's ``vqa_dataset``); eval items: ``(image, question, index)``."""

    def __init__(self, files: Sequence, roots: Dict[str, str], transform, train: bool,
                 columns: VQAColumns = VQAColumns(), vg_weight: float = VG_WEIGHT):
        self.files = [str(f) for f in files]
        self.transform = transform
        self.train = train
        self.vg_weight = vg_weight
        self.entries: List[VQAEntry] = []
        self._where: List[str] = []
        seen: Dict[object, str] = {}
        for f in files:
            entries, where = read_vqa_file(f, roots, need_answers=train, columns=columns)
            for k, e in enumerate(entries):
                if e.question_id in seen and not train:
                    raise DataError(f"{where(k)}, field 'question_id': {e.question_id!r} is also the id of "
                                    f"{seen[e.question_id]}")
                seen.setdefault(e.question_id, where(k))
                self._where.append(where(k))
            self.entries += entries

    def __len__(self) -> int:
        return len(self.entries)

    def source(self, index: int) -> str:
        return self._where[index]

    def targets(self, index: int) -> tuple[list, list]:
        """(answers, weights) of training item ``index``."""
        e = self.entries[index]
        if e.dataset == "vg":
            return list(e.answers[:1]), [self.vg_weight]
        return answer_weights(e.answers)

    def __getitem__(self, index: int):
        e = self.entries[index]
        image = self.transform(load_image(e.image, context=self.source(index)))
        if self.train:
            answers, weights = self.targets(index)
            return image, e.question, answers, weights
        return image, e.question, index

    @property
    def has_answers(self) -> bool:
        return all(e.answers for e in self.entries)

    def image_checks(self):
        first: Dict[str, int] = {}
        for i, e in enumerate(self.entries):
            first.setdefault(e.image, i)
        items = list(first.values())
        return list(first), lambda k: f"{self.source(items[k])}, field 'image'"

    def drop_images(self, bad: Collection[str]) -> int:
        keep = [i for i, e in enumerate(self.entries) if e.image not in bad]
        dropped = len(self.entries) - len(keep)
        self.entries = [self.entries[i] for i in keep]
        self._where = [self._where[i] for i in keep]
        return dropped

    def texts(self) -> List[str]:
        return [e.question for e in self.entries] + [a for e in self.entries for a in (e.answers or [])]


def tokenize_questions(tokenizer, questions: Sequence[str], max_tokens: int = 35):
    """The release's question input: padded to the longest, truncated at ``max_tokens`` (the model
    puts ``[ENC]`` first)."""
    enc = tokenizer(list(questions), padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class VQACollator:
    """Train: BLIP's ``vqa_collate_fn`` -> ``pixel_values``, question ``input_ids`` /
    ``attention_mask``, every question's answers tokenised (``answer_input_ids`` /
    ``answer_attention_mask``: padded to the longest, the model puts ``[DEC]`` first), ``n``
    (answers per question) and ``weights``. Eval: ``pixel_values``, the questions and ``index``."""

    def __init__(self, tokenizer, max_question_tokens: int = 35):
        self.tokenizer = tokenizer
        self.max_question_tokens = max_question_tokens

    def __call__(self, batch):
        images = torch.stack([b[0] for b in batch])
        input_ids, attention_mask = tokenize_questions(self.tokenizer, [b[1] for b in batch], self.max_question_tokens)
        out = {"pixel_values": images, "input_ids": input_ids, "attention_mask": attention_mask}
        if len(batch[0]) == 4:
            answers = [a for b in batch for a in b[2]]
            enc = self.tokenizer(answers, padding="longest", return_tensors="pt")
            out.update(answer_input_ids=enc["input_ids"], answer_attention_mask=enc["attention_mask"],
                       n=torch.tensor([len(b[2]) for b in batch], dtype=torch.long),
                       weights=torch.tensor([w for b in batch for w in b[3]], dtype=torch.float))
        else:
            out["index"] = torch.tensor([b[2] for b in batch], dtype=torch.long)
        return out
