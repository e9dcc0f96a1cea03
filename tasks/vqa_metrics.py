"""VQA accuracy as the VQA papers report it: the official VQA evaluation (``VQAEval.evaluate`` of the
VQA API, in the version published with the EvalAI VQA challenge), computed without the API's
``VQA`` objects. Facts and quirks: docs/VQA_METRICS.md "VQA accuracy".

- ``normalize_answer(answer)``: what the official code does to a predicted answer: ``\\n`` and
  ``\\t`` to spaces, strip, then the punctuation step (:func:`process_punctuation`), then the word
  step (lower case, number words ``none``/``zero``..``ten`` to digits, articles ``a an the`` dropped,
  contractions written without their apostrophe given one: ``dont`` -> ``don't``).
- ``question_accuracy(prediction, gt_answers)``: one question's accuracy in 0..1, the mean over the
  annotators i of ``min(1, #(the other annotators' answers equal to the prediction) / 3)``. The
  annotators' answers go through the punctuation step only, and only when they are not all the same
  string (as written); they are never lower-cased, stripped or digit/article-processed.
- ``vqa_accuracy(predictions, annotations)``: ``{"overall", "per_answer_type", "per_question_type"}``
  as 100 x the mean of the question accuracies (all questions, or those of one type), plus
  ``n_questions`` and ``per_question`` ({question_id: accuracy in 0..1}).

Numbers keep full precision; the official code rounds them to 2 decimals (``round(x, 2)``), so ours
round to its figures. Question ids match by their text (``7`` and ``"7"`` are the same question:
predictions read from a json object have string keys, annotation files have int ids).

Two generalisations for inputs the official files never have: a question with a single annotator
answer scores ``min(1, match / 3)`` against that answer (the official leave-one-out would compare
with nobody and give 0); ``answer_type`` / ``question_type`` are optional (the official code needs both).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Union

from utils.errors import DataError

QuestionId = Union[int, str]

# Replaced by a space, or removed when the text has the mark next to a space (either side) or has a
# digit-comma-digit anywhere ("1,000"): then every mark of the list is removed, not only commas.
# Not in the list: the apostrophe, ':', '.', '#', '$', '%', '&', '*', '^', '|', '~'.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit ("1.5" keeps its period). The official pattern's leading
# "(?!<=\d)" is a lookahead (a mistyped lookbehind) that never fails before a '.', so this is the same
# pattern. The official call passes re.UNICODE (32) where ``sub`` takes ``count``: at most 32 periods
# of an answer are removed, the first 32.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# The official contractions table, as "word=replacement" pairs. Its four capitalised keys ("Im",
# "Ive", "Id've", "I'dve") are left out: words are lower-cased before the look-up, so they never
# match. Kept as it is: "somebody'd" -> "somebodyd" (backwards), identities such as "let's", and the
# words it lacks ("its", "id", "ill", "wed", "hell", "shell", "were", "well" stay as they are).
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've
mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've
she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's
thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's
theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've
whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: Dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())


# ------------------------------------------------------------------------------------ normalisation

def process_punctuation(text: str) -> str:
    """The official punctuation step (the only processing annotator answers get): each mark of
    ``PUNCTUATION`` becomes a space, or is removed where the text has it next to a space or has a
    digit-comma-digit; then up to 32 periods not followed by a digit are removed. No stripping."""
    remove_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:  # the conditions look at the input text, so the order does not matter
        glued = remove_all or (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if glued else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_words(text: str) -> str:
    """The official word step: lower case, split on whitespace, number words to digits, articles
    dropped, contractions given their apostrophe, joined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official code compares it (always processed, whatever the
    annotators said): tabs and line breaks to spaces, stripped, punctuation step, word step."""
    return process_words(process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


# ------------------------------------------------------------------------------------------ scores

def question_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """One question's VQA accuracy in 0..1: for each annotator i, ``min(1, m_i / 3)`` with m_i the
    number of the other annotators whose answer equals the normalised prediction, averaged over the
    annotators (of 10 annotators, 4 or more giving the answer score 1, 3 score 0.9). Annotator
    answers get the punctuation step only when they are not all the same string. A single answer
    is compared with itself: ``min(1, match / 3)``."""
    if isinstance(gt_answers, str):
        raise TypeError("gt_answers must be a list of answer strings, not one string")
    answers = list(gt_answers)
    if not answers:
        raise ValueError("gt_answers is empty: a question needs at least one annotator answer")
    pred = normalize_answer(prediction)
    if len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
    if len(answers) == 1:
        return min(1, float(answers[0] == pred) / 3)
    n_match = sum(a == pred for a in answers)
    # Same sums in the same order as the official code, so the same floats to the last bit.
    per_annotator = [min(1, float(n_match - (a == pred)) / 3) for a in answers]
    return float(sum(per_annotator)) / len(per_annotator)


def _gt_answers(entry: Mapping[str, Any], index: int) -> List[str]:
    """The annotator answers of annotation entry ``index``: ``answer`` (BLIP's layout, a list of
    strings) or ``answers`` (a list of strings, or of ``{"answer": str, ...}`` as the official files)."""
    where = f"annotation entry {index} (question_id {entry.get('question_id')!r})"
    fields = [f for f in ("answer", "answers") if f in entry]
    if not fields:
        raise DataError(f"{where}: no annotator answers: it has no 'answer' (BLIP layout) or 'answers' "
                        f"(official VQA layout) field; a question set without answers cannot be scored")
    if len(fields) == 2:
        raise DataError(f"{where}: has both 'answer' and 'answers'; keep one of them")
    field = fields[0]
    value = entry[field]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise DataError(f"{where}: field '{field}' must be a list of annotator answers, got "
                        f"{type(value).__name__} {value!r:.60}")
    if not value:
        raise DataError(f"{where}: field '{field}' is an empty list; a question needs at least one answer")
    out = []
    for j, item in enumerate(value):
        text = item.get("answer") if isinstance(item, Mapping) else item
        if not isinstance(text, str):
            raise DataError(f"{where}: {field}[{j}] must be an answer string or an object with an 'answer' "
                            f"string, got {item!r:.60}")
        out.append(text)
    return out


def _mean_pct(values: Sequence[float]) -> float:
    return 100 * float(sum(values)) / len(values)  # the official order of operations (then round(., 2))


def vqa_accuracy(predictions: Mapping[QuestionId, str], annotations: Sequence[Mapping[str, Any]]) -> dict:
    """VQA accuracy of ``predictions`` ({question_id: answer}) over every question of
    ``annotations``: ``{"overall": 0..100, "per_answer_type": {type: 0..100}, "per_question_type":
    {type: 0..100}, "n_questions": int, "per_question": {question_id: 0..1}}``, the type tables
    over the entries that give ``answer_type`` / ``question_type``. Every annotated question needs
    a prediction and every prediction an annotated question (as the official results loader
    asserts); errors are DataError (a ValueError) naming the entry, the field or the id."""
    if isinstance(annotations, Mapping) or not isinstance(annotations, Sequence):
        raise DataError(f"annotations must be a list of entries, got {type(annotations).__name__}")
    if not annotations:
        raise DataError("annotations is empty: there is no question to score")
    preds: Dict[str, str] = {}
    pred_ids: Dict[str, QuestionId] = {}
    for qid, answer in predictions.items():
        key = str(qid)
        if key in preds:
            raise DataError(f"predictions: question_id {qid!r} appears twice (as an int and as a string)")
        if not isinstance(answer, str):
            raise DataError(f"predictions: the answer for question_id {qid!r} must be a string, got "
                            f"{type(answer).__name__} {answer!r:.60}")
        preds[key], pred_ids[key] = answer, qid

    per_question: Dict[QuestionId, float] = {}
    seen: Dict[str, int] = {}
    by_answer_type: Dict[Any, List[float]] = {}
    by_question_type: Dict[Any, List[float]] = {}
    missing: List[QuestionId] = []
    for i, entry in enumerate(annotations):
        if not isinstance(entry, Mapping):
            raise DataError(f"annotation entry {i}: must be an object, got {type(entry).__name__}")
        if "question_id" not in entry:
            raise DataError(f"annotation entry {i}: no 'question_id' field")
        qid = entry["question_id"]
        if str(qid) in seen:
            raise DataError(f"annotation entry {i}: question_id {qid!r} is also entry {seen[str(qid)]}'s")
        seen[str(qid)] = i
        gt = _gt_answers(entry, i)
        if str(qid) not in preds:
            missing.append(qid)
            continue
        acc = question_accuracy(preds[str(qid)], gt)
        per_question[qid] = acc
        for field, table in (("answer_type", by_answer_type), ("question_type", by_question_type)):
            if entry.get(field) is not None:
                table.setdefault(entry[field], []).append(acc)
    if missing:
        shown = ", ".join(repr(q) for q in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} of {len(annotations)} annotated questions have no prediction "
                        f"(question_id {shown}); every annotated question needs an answer")
    extra = [k for k in preds if k not in seen]
    if extra:
        raise DataError(f"{len(extra)} predictions are for question ids not in the annotations (e.g. "
                        f"question_id {pred_ids[extra[0]]!r}); predictions and annotations must be one split")
    accs = list(per_question.values())
    return {"overall": _mean_pct(accs),
            "per_answer_type": {t: _mean_pct(v) for t, v in by_answer_type.items()},
            "per_question_type": {t: _mean_pct(v) for t, v in by_question_type.items()},
            "n_questions": len(accs),
            "per_question": per_question}
