"""VQA accuracy (tasks/vqa_metrics.py): hand-computed cases of the official VQA evaluation rule
(docs/VQA_METRICS.md "VQA accuracy"), its normalisation quirks, aggregation and errors.

Every expected number is worked out by hand from the official formula in the comment next to it:
accuracy = mean over annotators i of min(1, m_i / 3), m_i = how many of the *other* annotators gave
the (normalised) prediction."""
from __future__ import annotations

import pytest

from tasks.vqa_metrics import normalize_answer, process_punctuation, question_accuracy, vqa_accuracy
from utils.errors import DataError


# ------------------------------------------------------------------------------- leave-one-out

@pytest.mark.parametrize("gt, pred, expected", [
    # 3 of 10 said yes: the 3 yes-annotators see 2 yes among the others (2/3 each), the 7 others
    # see 3 (1 each): (3 * 2/3 + 7 * 1) / 10 = 9/10
    (["yes"] * 3 + ["no"] * 7, "yes", 0.9),
    # the 7 no-annotators see 6 no (1), the 3 others see 7 (1): 10/10
    (["yes"] * 3 + ["no"] * 7, "no", 1.0),
    # 4 of 10: the 4 see 3 (1), the 6 see 4 (1): 1.0
    (["yes"] * 4 + ["no"] * 6, "yes", 1.0),
    # 2 of 10: the 2 see 1 (1/3), the 8 see 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = (18/3) / 10
    (["2"] * 2 + ["3"] * 8, "2", 0.6),
    # 1 of 10: the one sees 0 (0), the 9 see 1 (1/3): (9 * 1/3) / 10
    (["red"] + ["blue"] * 9, "red", 0.3),
    (["red"] + ["blue"] * 9, "green", 0.0),
    # 3 annotators, all yes: each sees 2 (2/3): 2/3
    (["yes"] * 3, "yes", 2 / 3),
    # 2 annotators yes/no: the yes one sees [no] (0), the no one sees [yes] (1/3): (1/3) / 2
    (["yes", "no"], "yes", 1 / 6),
    # a single annotator answer is compared with itself: min(1, 1/3)
    (["yes"], "yes", 1 / 3),
    (["yes"], "no", 0.0),
])
def test_leave_one_out(gt, pred, expected):
    assert question_accuracy(pred, gt) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------- the prediction's processing

@pytest.mark.parametrize("raw, norm", [
    ("two", "2"), ("Two", "2"), ("none", "0"), ("zero", "0"), ("ten", "10"), ("eleven", "eleven"),
    ("a dog", "dog"), ("The Dog", "dog"), ("an apple", "apple"),
    ("dont", "don't"), ("Dont", "don't"), ("isnt it", "isn't it"), ("its", "its"),
    ("yes.", "yes"), ("yes!", "yes"), ("yes?", "yes"), ("\tyes\n", "yes"), ("  yes  ", "yes"),
    ("1.5", "1.5"),                # a period followed by a digit stays
    ("3.14.", "3.14"),             # ... the final one goes
    ("u.s.a.", "usa"),
    ("1,000", "1000"),             # digit-comma-digit: every mark removed, not replaced by a space
    ("1,000-2", "10002"),          # ... the hyphen too
    ("red,white", "red white"),    # a comma with no space nor digit around: a space
    ("red, white", "red white"),   # a comma next to a space: removed
    ("black-and-white", "black and white"),
    ("t-shirt", "t shirt"),
    ("o'clock", "o'clock"),        # the apostrophe is not in the punctuation list
    ("10:30", "10:30"),            # nor is the colon
    ("yes" + "." * 32, "yes"),     # up to 32 periods removed ...
    ("yes" + "." * 33, "yes."),    # ... the 33rd stays (re.UNICODE passed as sub's count)
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_normalised_prediction_matches():
    # every annotator said the same (so their answers are used as written); the prediction is always
    # normalised: "two" -> "2", "a dog" -> "dog", "dont" -> "don't", "yes." -> "yes", "1,000" -> "1000".
    # 10 equal answers: each annotator sees 9 matches -> 1
    assert question_accuracy("two", ["2"] * 10) == 1.0
    assert question_accuracy("a dog", ["dog"] * 10) == 1.0
    assert question_accuracy("dont", ["don't"] * 10) == 1.0
    assert question_accuracy("yes.", ["yes"] * 10) == 1.0
    assert question_accuracy("1,000", ["1000"] * 10) == 1.0


# ----------------------------------------------------------------- the annotators' answers (quirks)

def test_identical_gt_answers_are_not_processed():
    # all 10 are the string "yes.": one distinct answer, so they stay "yes." while the prediction
    # becomes "yes": no annotator sees a match -> 0 (official behaviour)
    assert question_accuracy("yes.", ["yes."] * 10) == 0.0
    assert question_accuracy("yes", ["yes."] * 10) == 0.0
    # "1,000" x 10 stays "1,000"; the prediction "1,000" becomes "1000": 0
    assert question_accuracy("1,000", ["1,000"] * 10) == 0.0


def test_distinct_gt_answers_get_the_punctuation_step():
    # "yes." x 9 + "no": two distinct answers, so "yes." -> "yes"; prediction "yes": the 9 see 8 (1),
    # the no-annotator sees 9 (1): 1.0
    assert question_accuracy("yes", ["yes."] * 9 + ["no"]) == 1.0
    # "1,000" x 2 + "1000" x 8 -> all "1000": each sees 9 -> 1.0
    assert question_accuracy("1,000", ["1,000"] * 2 + ["1000"] * 8) == 1.0


def test_gt_answers_get_no_word_step():
    # distinct answers get the punctuation step only: "two" stays "two" (and "Yes" stays "Yes"),
    # while the prediction "two" becomes "2". gt "two" x 8 + "2" x 2: the 2 "2"-annotators see 1
    # (1/3), the 8 others see 2 (2/3): (2/3 + 16/3) / 10 = 0.6, for "two" and for "2" alike
    gt = ["two"] * 8 + ["2"] * 2
    assert question_accuracy("two", gt) == pytest.approx(0.6, abs=1e-12)
    assert question_accuracy("2", gt) == pytest.approx(0.6, abs=1e-12)
    # "Yes" x 5 + "no" x 5, prediction "Yes" -> "yes": no annotator's answer is "yes": 0
    assert question_accuracy("Yes", ["Yes"] * 5 + ["no"] * 5) == 0.0
    assert process_punctuation(" Two. ") == " Two "  # no lower-casing, no strip


# ------------------------------------------------------------------------------------ aggregation

ANNOTATIONS = [
    {"question_id": 1, "answer": ["yes"] * 3 + ["no"] * 7, "answer_type": "yes/no", "question_type": "is the"},
    {"question_id": 2, "answer": ["no"] * 10, "answer_type": "yes/no", "question_type": "is the"},
    {"question_id": 3, "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(["2"] * 2 + ["3"] * 8)],
     "answer_type": "number", "question_type": "how many"},
    {"question_id": 4, "answers": ["red"] + ["blue"] * 9, "answer_type": "other", "question_type": "what color"},
]
PREDICTIONS = {1: "yes", 2: "No.", 3: "two", 4: "red"}  # 0.9, 1.0, 0.6, 0.3 (see test_leave_one_out)


def test_vqa_accuracy_per_type():
    out = vqa_accuracy(PREDICTIONS, ANNOTATIONS)
    assert out["n_questions"] == 4
    assert out["per_question"] == pytest.approx({1: 0.9, 2: 1.0, 3: 0.6, 4: 0.3}, abs=1e-12)
    assert out["overall"] == pytest.approx(70.0)  # 100 * (0.9 + 1.0 + 0.6 + 0.3) / 4 = 100 * 2.8 / 4
    assert out["per_answer_type"] == pytest.approx({"yes/no": 95.0,   # 100 * (0.9 + 1.0) / 2
                                                    "number": 60.0, "other": 30.0})
    assert out["per_question_type"] == pytest.approx({"is the": 95.0, "how many": 60.0, "what color": 30.0})


def test_string_keys_full_precision_and_optional_types():
    # predictions read from a json object have string keys; no types given -> empty tables.
    # q1: 3 x yes, each sees 2 -> 2/3; q2: 10 x yes -> 1; overall 100 * (2/3 + 1) / 2 = 250/3,
    # which the official code would report rounded as 83.33
    anns = [{"question_id": 1, "answer": ["yes"] * 3}, {"question_id": 2, "answer": ["yes"] * 10}]
    out = vqa_accuracy({"1": "yes", "2": "yes"}, anns)
    assert out["overall"] == pytest.approx(250 / 3, abs=1e-12) and out["overall"] != 83.33
    assert out["per_answer_type"] == {} and out["per_question_type"] == {}
    assert set(out["per_question"]) == {1, 2}  # keyed by the annotation's ids


# ----------------------------------------------------------------------------------------- errors

def test_missing_predictions():
    with pytest.raises(DataError, match=r"2 of 4 annotated questions have no prediction \(question_id 3, 4\)"):
        vqa_accuracy({1: "yes", 2: "no"}, ANNOTATIONS)


def test_prediction_for_unknown_question():
    with pytest.raises(DataError, match=r"1 predictions are for question ids not in the annotations .*question_id 99"):
        vqa_accuracy({**PREDICTIONS, 99: "yes"}, ANNOTATIONS)


@pytest.mark.parametrize("entry, message", [
    ({"question_id": 5}, r"annotation entry 4 \(question_id 5\): no annotator answers.*'answer'.*'answers'"),
    ({"question_id": 5, "answer": []}, r"annotation entry 4 \(question_id 5\): field 'answer' is an empty list"),
    ({"question_id": 5, "answers": []}, r"annotation entry 4 \(question_id 5\): field 'answers' is an empty list"),
    ({"question_id": 5, "answer": "yes"}, r"entry 4 .*field 'answer' must be a list"),
    ({"question_id": 5, "answers": [{"answer_id": 1}]}, r"entry 4 .*answers\[0\] must be an answer string"),
    ({"question_id": 5, "answer": ["yes"], "answers": ["yes"]}, r"entry 4 .*both 'answer' and 'answers'"),
    ({"answer": ["yes"]}, r"annotation entry 4: no 'question_id'"),
    ({"question_id": "1", "answer": ["yes"]}, r"annotation entry 4: question_id '1' is also entry 0's"),
])
def test_bad_annotation_entries(entry, message):
    with pytest.raises(ValueError, match=message):
        vqa_accuracy({**PREDICTIONS, 5: "yes"}, ANNOTATIONS + [entry])


def test_bad_inputs():
    with pytest.raises(DataError, match="annotations is empty"):
        vqa_accuracy({}, [])
    with pytest.raises(DataError, match=r"answer for question_id 1 must be a string"):
        vqa_accuracy({**PREDICTIONS, 1: ["yes"]}, ANNOTATIONS)
    with pytest.raises(DataError, match="appears twice"):
        vqa_accuracy({**PREDICTIONS, "1": "yes"}, ANNOTATIONS)
    with pytest.raises(ValueError, match="empty"):
        question_accuracy("yes", [])
    with pytest.raises(TypeError, match="not one string"):
        question_accuracy("yes", "yes")
