"""The readers' rules (docs/FORMATS.md): CSV rows with more or fewer fields than the header, text
that is not UTF-8, empty or whitespace-only captions and empty files are errors naming the file
and the entry or line, in every reader (retrieval json/CSV, pair lists, ImageCoDe, MMVP); quoted
fields with the delimiter or line breaks are fine; MMVP Types outside the nine need extra_patterns."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from data.utils import read_csv, read_json


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


# ----------------------------------------------------------------------------- CSV and text

def test_quoted_fields_blank_lines_and_line_numbers(tmp_path):
    path = _write(tmp_path / "a.csv", '\ufeffimage,caption\n'
                                      'x.jpg,"a cat, sitting"\n'
                                      '\n'
                                      'y.jpg,"two\nlines"\n'
                                      '   \n'
                                      'z.jpg,plain\n')
    header, rows = read_csv(path)
    assert header == ["image", "caption"]  # the BOM is not part of the first column's name
    assert [(r.index, r.line, r.fields) for r in rows] == [
        (0, 2, ["x.jpg", "a cat, sitting"]), (1, 4, ["y.jpg", "two\nlines"]), (2, 7, ["z.jpg", "plain"])]
    assert rows[2].where(path) == f"row 2 (line 7) of {path}"


@pytest.mark.parametrize("row, message", [
    ("y.jpg,a cat, sitting,7", r"line 3: row 1 has 4 fields but the header has 3 \(image,caption,image_id\): "
                               r"\['y.jpg', 'a cat', ' sitting', '7'\]; a field that contains ',' must be quoted"),
    ("y.jpg,a cat", r"line 3: row 1 has 2 fields but the header has 3 \(image,caption,image_id\): "
                    r"\['y.jpg', 'a cat'\]$"),
])
def test_a_row_with_another_field_count_names_file_and_line(tmp_path, row, message):
    path = _write(tmp_path / "a.csv", f"image,caption,image_id\nx.jpg,fine,1\n{row}\n")
    with pytest.raises(ValueError, match=rf"^{path}, {message}"):
        read_csv(path)


def test_tsv_and_empty_files(tmp_path):
    header, rows = read_csv(_write(tmp_path / "a.tsv", "image\tcaption\nx.jpg\ta, b\n"))
    assert rows[0].fields == ["x.jpg", "a, b"]
    assert read_csv(_write(tmp_path / "h.csv", "image,caption\n")) == (["image", "caption"], [])
    with pytest.raises(ValueError, match=r"e.csv: empty file; a CSV file needs a header row"):
        read_csv(_write(tmp_path / "e.csv", ""))


@pytest.mark.parametrize("reader", [read_csv, read_json])
def test_text_that_is_not_utf8_names_file_and_line(tmp_path, reader):
    body = (b'image,caption\nx.jpg,ok\ny.jpg,caf\xe9\n' if reader is read_csv
            else b'[{"image": "x.jpg",\n  "caption": "ok"},\n {"image": "y.jpg", "caption": "caf\xe9"}]')
    path = _write(tmp_path / ("a.csv" if reader is read_csv else "a.json"), body)
    with pytest.raises(ValueError, match=rf"^{path}, line 3: not valid UTF-8 \(byte 0xe9 at column \d+"):
        reader(path)


# ----------------------------------------------------------------------------- retrieval files

def test_retrieval_csv_rows_are_named_by_row_and_line(tmp_path):
    from data.retrieval import RetrievalEvalDataset
    from data.retrieval_train import RetrievalTrainDataset
    test = _write(tmp_path / "test.csv", "image,caption\na.jpg,first\nb.jpg,second\n\na.jpg,third\n")
    ds = RetrievalEvalDataset(test, tmp_path, None)
    assert ds.image == ["a.jpg", "b.jpg"] and ds.text == ["first", "third", "second"]
    assert ds.source(1) == f"row 1 (line 3) of {test}"
    _write(test, "image,caption\na.jpg,first\nb.jpg,second\n\na.jpg,\t\n")
    with pytest.raises(ValueError, match=rf"^row 2 \(line 5\) of {test}: invalid field 'caption': the caption is "
                                         r"empty or whitespace only"):
        RetrievalEvalDataset(test, tmp_path, None)
    train = _write(tmp_path / "train.csv", "image,caption,image_id\na.jpg,a cat, sitting,7\n")
    with pytest.raises(ValueError, match=rf"^{train}, line 2: row 0 has 4 fields but the header has 3"):
        RetrievalTrainDataset(train, tmp_path, None)


@pytest.mark.parametrize("caption, message", [
    (" ", "the caption is empty or whitespace only"),
    (["fine", "\n"], "item 1 of the caption list is empty or whitespace only"),
    ([], "the caption list is empty"),
])
def test_blank_eval_captions_are_errors_naming_the_entry(tmp_path, caption, message):
    from data.retrieval import RetrievalEvalDataset
    test = _write(tmp_path / "test.json", json.dumps([{"image": "a.jpg", "caption": ["ok"]},
                                                      {"image": "b.jpg", "caption": caption}]))
    with pytest.raises(ValueError, match=rf"^entry 1 of {test}: invalid field 'caption': {message}"):
        RetrievalEvalDataset(test, tmp_path, None)


# ----------------------------------------------------------------------------- pair lists (tools)

def test_pair_files_name_bad_entries_and_lines(tmp_path):
    from data.pairs import read_pairs
    js = _write(tmp_path / "a.json", json.dumps([{"image": "a.jpg", "caption": ["ok", "  "]}]))
    with pytest.raises(ValueError, match=rf"^entry 0 of {js}: invalid field 'caption': item 1 of the caption list"):
        read_pairs(js)
    table = _write(tmp_path / "b.csv", "image,caption\na.jpg,x\nb.jpg,y, z\n")
    with pytest.raises(ValueError, match=rf"^{table}, line 3: row 1 has 3 fields but the header has 2"):
        read_pairs(table)
    with pytest.raises(ValueError, match=r"c.json: no pairs"):
        read_pairs(_write(tmp_path / "c.json", "[]"))
    with pytest.raises(ValueError, match=r"d.csv: no pairs"):
        read_pairs(_write(tmp_path / "d.csv", "image,caption\n\n"))


def test_pair_csv_with_blank_lines_and_quotes_is_filtered_row_for_row(tmp_path):
    from data.pairs import read_pairs, write_filtered
    path = _write(tmp_path / "p.csv", 'image,caption,extra\na.jpg,"one, two",1\n\nb.jpg,three,2\n'
                                      'c.jpg,"four\nfive",3\n')
    table = read_pairs(path)
    assert table.caption == ["one, two", "three", "four\nfive"]
    assert [table.where(r) for r in range(3)] == [f"row {r} (line {line}) of {path}" for r, line in
                                                  ((0, 2), (1, 4), (2, 5))]
    write_filtered(table, np.array([False, True, True]), tmp_path / "out")
    with open(tmp_path / "out" / "p.csv", newline="") as f:
        assert list(csv.reader(f)) == [["image", "caption", "extra"], ["b.jpg", "three", "2"],
                                       ["c.jpg", "four\nfive", "3"]]


# ----------------------------------------------------------------------------- ImageCoDe and MMVP

def test_an_imagecode_file_without_descriptions_is_an_error(tmp_path):
    from data.imagecode import read_imagecode
    with pytest.raises(ValueError, match=r"valid_data.json: no descriptions"):
        read_imagecode(_write(tmp_path / "valid_data.json", "{}"), tmp_path)
    with pytest.raises(ValueError, match=r"valid_data.json, line 1: not valid UTF-8"):
        read_imagecode(_write(tmp_path / "valid_data.json", b'{"set": {"0": "caf\xe9"}}'), tmp_path)


def _mmvp(root: Path, rows) -> Path:
    from tests.test_mmvp import write_mmvp
    return write_mmvp(root, rows)


def test_an_mmvp_type_outside_the_nine_needs_extra_patterns(tmp_path):
    from data.mmvp import PATTERNS, markdown_table, read_mmvp, summarize
    from tests.test_mmvp import official_rows
    rows = official_rows(1) + [(19, "Lighting", "The lamp is on."), (20, "Lighting", "The lamp is off.")]
    root = _mmvp(tmp_path / "m", rows)
    with pytest.raises(ValueError, match=r"Questions.csv: row 19 \(Question ID 19\), field 'Type': 'Lighting' is not "
                                         r"one of the nine MMVP Types \(Orientation, Presence, .*extra_patterns"):
        read_mmvp(root, pairs_per_pattern=1)
    pairs = read_mmvp(root, pairs_per_pattern=1, extra_patterns=["Lighting"])
    assert [p.pattern for p in pairs] == [*PATTERNS, "Lighting"]  # the nine keep their positions
    scores = np.array([[[1.0, 0.0], [0.0, 1.0]]] * 10)             # every pair right
    result = summarize(pairs, scores)
    assert list(result.accuracy) == [*PATTERNS, "Lighting", "Average"] and result.accuracy["Lighting"] == 100.0
    assert "| Lighting | Average |" in markdown_table(result.accuracy)
    # An extra pair in the middle of the file does not move the nine off their positions.
    middle = official_rows(1)[:2] + rows[-2:] + official_rows(1)[2:]
    pairs = read_mmvp(_mmvp(tmp_path / "m2", middle), pairs_per_pattern=1, extra_patterns=["Lighting"])
    assert [p.pattern for p in pairs] == [PATTERNS[0], "Lighting", *PATTERNS[1:]]


def test_mmvp_config_rejects_a_known_type_as_extra_and_a_non_utf8_csv_names_the_line(tmp_path):
    from eval_mmvp import MMVPConfig
    from data.mmvp import read_mmvp
    with pytest.raises(ValueError, match=r"extra_patterns: \['Color'\] are among the nine MMVP Types"):
        MMVPConfig(extra_patterns=["Color", "Lighting"])
    root = tmp_path / "m"
    root.mkdir()
    _write(root / "Questions.csv", b"Question ID,Type,Statement\n1,Color,red\n2,Color,r\xf6t\n")
    with pytest.raises(ValueError, match=r"Questions.csv, line 3: not valid UTF-8"):
        read_mmvp(root, check_images=False)
