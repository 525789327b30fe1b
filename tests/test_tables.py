"""Text tables read strictly: the delimiter and the header inferred by a stated rule (and reported), explicit
label and id columns, integer labels and ids (never truncated), label and category encoding, missing values,
and a recorded spec that reads the same rows back."""

import json

import numpy as np
import pytest

from expunge.data import load_dataset, load_rows
from expunge.errors import ExpungeError
from expunge.tables import ReadOptions, column_choice, read_table

from .bench.shared_data import DATA

# a small table shaped like UCI Adult: ", " separated, no header, text columns, '?' for missing, text labels
ADULT_LIKE = """\
39, State-gov, 77516, Bachelors, <=50K
50, Self-emp, 83311, Bachelors, <=50K
38, Private, 215646, HS-grad, <=50K
53, Private, 234721, 11th, <=50K
28, Private, 338409, Bachelors, >50K
37, ?, 284582, Masters, >50K
49, Private, 160187, 9th, <=50K
52, Self-emp, 209642, HS-grad, >50K
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def notes(ds):
    return " ".join(ds.read_spec["notes"])


# ----------------------------------------------------------------------------- labels and ids are integers


def test_float_labels_are_refused_not_truncated(tmp_path):
    path = write(tmp_path, "t.csv", "0.1,0.2,1.5\n0.3,0.4,0\n")
    with pytest.raises(ExpungeError, match=r"non-integer values such as 1\.5 on line 1.*--label-column.*--encode-labels"):
        load_dataset(str(path))


def test_integral_float_labels_are_integers(tmp_path):
    train, _ = load_dataset(str(write(tmp_path, "t.csv", "0.1,0.2,1.0\n0.3,0.4,0.0\n")))
    np.testing.assert_array_equal(train.y, [1, 0])


def test_negative_labels_are_refused_unless_encoded(tmp_path):
    path = write(tmp_path, "t.csv", "0.1,-1\n0.3,1\n0.5,1\n")
    with pytest.raises(ExpungeError, match="negative"):
        load_dataset(str(path))
    train, _ = load_dataset(str(path), ReadOptions(encode_labels=True))
    np.testing.assert_array_equal(train.y, [0, 1, 1])
    assert train.read_spec["classes"] == [-1, 1]


@pytest.mark.parametrize("bad, words", [("1.5", "non-integer values such as 1.5"), ("x7", "text such as 'x7'"),
                                        ("99999999999999999999", "int64")])
def test_bad_ids_are_refused(tmp_path, bad, words):
    path = write(tmp_path, "t.csv", f"a,id,label\n0.1,{bad},1\n0.2,8,0\n")
    with pytest.raises(ExpungeError, match="ids") as e:
        load_dataset(str(path))
    assert words in str(e.value)


# ----------------------------------------------------------------------------- the delimiter


@pytest.mark.parametrize("delimiter, word", [("\t", "tab"), (";", "semicolon"), (",", "comma")])
def test_the_delimiter_is_inferred_and_reported(tmp_path, delimiter, word):
    rows = [["0.5", "1.5", "1"], ["2.5", "3.5", "0"], ["4.5", "5.5", "2"]]
    train, _ = load_dataset(str(write(tmp_path, "t.txt", "\n".join(delimiter.join(r) for r in rows) + "\n")))
    np.testing.assert_allclose(train.X, [[0.5, 1.5], [2.5, 3.5], [4.5, 5.5]])
    np.testing.assert_array_equal(train.y, [1, 0, 2])
    assert f"delimiter: {word} (inferred" in notes(train)


def test_an_ambiguous_delimiter_is_refused_and_can_be_given(tmp_path):
    path = write(tmp_path, "t.csv", "1,2;3\n4,5;6\n")  # comma and semicolon both split every line in two
    with pytest.raises(ExpungeError, match="ambiguous.*--delimiter"):
        load_dataset(str(path))
    with pytest.raises(ExpungeError, match="'1,2' on line 1"):  # given: split by semicolon only
        load_dataset(str(path), ReadOptions(delimiter=";"))


def test_a_given_delimiter_is_not_reported_as_inferred(tmp_path):
    train, _ = load_dataset(str(write(tmp_path, "t.csv", "0.5;1\n1.5;0\n")), ReadOptions(delimiter=";"))
    np.testing.assert_array_equal(train.y, [1, 0])
    assert "delimiter" not in notes(train)


def test_a_ragged_row_names_its_line(tmp_path):
    path = write(tmp_path, "t.csv", "0.1,0.2,1\n0.3,0.4,0\n0.5,1\n0.6,0.7,1\n")
    with pytest.raises(ExpungeError, match="line 3 has 2 field"):
        load_dataset(str(path), ReadOptions(delimiter=","))


def test_a_comment_line_is_named_with_the_fix(tmp_path):
    path = write(tmp_path, "t.test", "|1x3 Cross validator\n1,2,0\n3,4,1\n")
    with pytest.raises(ExpungeError, match=r"line 1 has 1 field.*--comment '\|'"):
        load_dataset(str(path))
    train, _ = load_dataset(str(path), ReadOptions(comment="|"))
    np.testing.assert_array_equal(train.y, [0, 1])


# ----------------------------------------------------------------------------- the header


def test_a_header_is_detected_by_text_above_numbers(tmp_path):
    train, _ = load_dataset(str(write(tmp_path, "t.csv", "x,y,label\n0.1,0.2,1\n0.3,0.4,0\n")))
    assert len(train) == 2 and train.read_spec["columns"] == ["x", "y", "label"]
    assert "header: line 1 (inferred" in notes(train)


def test_a_first_row_that_fails_to_parse_is_not_dropped_as_a_header(tmp_path):
    # today's reader took any unparsable first row for a header and silently lost a data row
    path = write(tmp_path, "t.csv", "0.1,abc,1\n0.3,0.4,0\n0.5,0.6,1\n")
    with pytest.raises(ExpungeError, match="neither a header nor a data row"):
        load_dataset(str(path))


def test_a_first_row_of_data_with_text_is_data(tmp_path):
    train, _ = load_dataset(str(write(tmp_path, "t.csv", ADULT_LIKE)),
                            ReadOptions(encode_categories=True, encode_labels=True, missing="impute"))
    assert len(train) == 8 and train.read_spec["header"] is False
    assert "header: none (inferred" in notes(train)


def test_all_text_columns_need_the_header_said(tmp_path):
    path = write(tmp_path, "t.csv", "colour,size,label\nred,big,yes\nblue,small,no\n")
    with pytest.raises(ExpungeError, match="--header or --no-header"):
        load_dataset(str(path), ReadOptions(encode_categories=True, encode_labels=True))
    train, _ = load_dataset(str(path), ReadOptions(header=True, encode_categories=True, encode_labels=True))
    assert len(train) == 2 and train.n_features == 4


def test_no_header_said_on_a_header_is_refused(tmp_path):
    path = write(tmp_path, "t.csv", "x,y,label\n0.1,0.2,1\n0.3,0.4,0\n")
    with pytest.raises(ExpungeError, match="text such as 'label' on line 1"):
        load_dataset(str(path), ReadOptions(header=False))


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    with pytest.raises(ExpungeError, match="twice"):
        load_dataset(str(write(tmp_path, "t.csv", "x,x,label\n0.1,0.2,1\n")))


# ----------------------------------------------------------------------------- label and id columns


@pytest.mark.parametrize("choice", ["label", 0, -3])
def test_label_column_by_name_and_by_index(tmp_path, choice):
    path = write(tmp_path, "t.csv", "label,a,b\n1,0.5,1.5\n0,2.5,3.5\n")
    train, _ = load_dataset(str(path), ReadOptions(label_column=choice))
    np.testing.assert_array_equal(train.y, [1, 0])
    np.testing.assert_allclose(train.X, [[0.5, 1.5], [2.5, 3.5]])


@pytest.mark.parametrize("choice, words", [(3, "out of range"), ("nope", "not a column"), (-4, "out of range")])
def test_a_bad_label_column_is_refused(tmp_path, choice, words):
    path = write(tmp_path, "t.csv", "label,a,b\n1,0.5,1.5\n0,2.5,3.5\n")
    with pytest.raises(ExpungeError, match=words):
        load_dataset(str(path), ReadOptions(label_column=choice))


def test_a_label_column_name_needs_a_header(tmp_path):
    with pytest.raises(ExpungeError, match="has no header"):
        load_dataset(str(write(tmp_path, "t.csv", "1,0.5\n0,2.5\n")), ReadOptions(label_column="label"))


def test_a_table_of_ids_and_labels_only_is_refused(tmp_path):
    with pytest.raises(ExpungeError, match="no feature columns"):
        load_dataset(str(write(tmp_path, "t.csv", "id,label\n1,0\n2,1\n")))


def test_column_choice_reads_digits_as_an_index():
    assert column_choice("0") == 0 and column_choice("-1") == -1 and column_choice("income") == "income"
    assert column_choice(None) is None


def test_id_column_by_option_and_by_name(tmp_path):
    path = write(tmp_path, "t.csv", "key,a,label\n10,0.5,1\n11,1.5,0\n")
    train, _ = load_dataset(str(path), ReadOptions(id_column="key"))
    np.testing.assert_array_equal(train.ids, [10, 11])
    assert train.n_features == 1
    path = write(tmp_path, "u.csv", "a,Id,label\n0.5,7,1\n1.5,3,0\n")
    train, _ = load_dataset(str(path))
    np.testing.assert_array_equal(train.ids, [7, 3])
    assert "ids: column 1 ('Id')" in notes(train)


def test_label_first_tab_file_does_not_train_on_the_last_feature(tmp_path):
    # HIGGS' layout: tab-separated, label first, float features
    text = "1\t0.869\t-0.635\t0.877\n0\t1.344\t-0.877\t0.798\n1\t0.908\t0.329\t0.780\n"
    path = write(tmp_path, "binary.train", text)
    with pytest.raises(ExpungeError, match=r"column 3, the last column by default.*0\.877.*--label-column"):
        load_dataset(str(path))
    train, _ = load_dataset(str(path), ReadOptions(label_column=0))
    np.testing.assert_array_equal(train.y, [1, 0, 1])
    np.testing.assert_allclose(train.X[:, -1], [0.877, 0.798, 0.780], rtol=1e-6)


# ----------------------------------------------------------------------------- encoding and missing values


def test_text_columns_are_refused_without_encode_categories(tmp_path):
    path = write(tmp_path, "t.csv", ADULT_LIKE.replace("?", "Private"))
    with pytest.raises(ExpungeError, match="holds text, not a number: 'State-gov'.*--encode-categories"):
        load_dataset(str(path), ReadOptions(encode_labels=True))


def test_missing_values_are_refused_by_default_naming_the_choices(tmp_path):
    path = write(tmp_path, "t.csv", ADULT_LIKE)
    with pytest.raises(ExpungeError, match=r"column 1 has 1 missing value.*line 6.*--missing impute.*--missing drop"):
        load_dataset(str(path), ReadOptions(encode_categories=True, encode_labels=True))


def test_categories_one_hot_encoded_and_missing_imputed(tmp_path):
    path = write(tmp_path, "t.csv", ADULT_LIKE)
    train, _ = load_dataset(str(path), ReadOptions(encode_categories=True, encode_labels=True, missing="impute"))
    spec = train.read_spec
    assert spec["classes"] == ["<=50K", ">50K"]
    np.testing.assert_array_equal(train.y, [0, 0, 0, 0, 1, 1, 0, 1])
    workclass, education = spec["features"][1], spec["features"][3]
    assert workclass == {"column": 1, "kind": "categorical", "fill": "Private",
                         "categories": ["Private", "Self-emp", "State-gov"]}
    assert education["categories"] == ["11th", "9th", "Bachelors", "HS-grad", "Masters"]
    # columns in file order, each text column replaced by its one-hot block
    assert train.n_features == 1 + 3 + 1 + 5
    np.testing.assert_allclose(train.X[0], [39, 0, 0, 1, 77516, 0, 0, 1, 0, 0])
    np.testing.assert_allclose(train.X[5], [37, 1, 0, 0, 284582, 0, 0, 0, 0, 1])  # '?' became 'Private'
    assert "imputed missing cells" in notes(train) and "one-hot encoded 2 text column(s)" in notes(train)


def test_missing_drop_keeps_the_file_row_numbers_as_ids(tmp_path):
    path = write(tmp_path, "t.csv", ADULT_LIKE)
    train, _ = load_dataset(str(path), ReadOptions(encode_categories=True, encode_labels=True, missing="drop"))
    np.testing.assert_array_equal(train.ids, [0, 1, 2, 3, 4, 6, 7])
    assert "dropped 1 row(s)" in notes(train)


def test_numeric_missing_values_are_imputed_with_the_median(tmp_path):
    path = write(tmp_path, "t.csv", "1.0,0\n,1\n3.0,1\n10.0,0\n")
    train, _ = load_dataset(str(path), ReadOptions(missing="impute"))
    np.testing.assert_allclose(train.X[:, 0], [1, 3, 3, 10])


def test_a_missing_label_is_not_imputed(tmp_path):
    path = write(tmp_path, "t.csv", "1.0,0\n2.0,?\n3.0,1\n")
    with pytest.raises(ExpungeError, match="the label.*missing on line 2.*--missing drop"):
        load_dataset(str(path), ReadOptions(missing="impute"))


def test_the_test_table_is_encoded_with_the_training_encoders(tmp_path):
    path = write(tmp_path, "t.csv", ADULT_LIKE)
    test_path = write(tmp_path, "t.test", "|comment\n40, Private, 1000, Masters, >50K.\n41, ?, 2000, 9th, <=50K.\n")
    options = ReadOptions(encode_categories=True, encode_labels=True, missing="impute", comment="|",
                          strip_label_suffix=".", test=str(test_path))
    _, test = load_dataset(str(path), options)
    np.testing.assert_array_equal(test.y, [1, 0])
    np.testing.assert_allclose(test.X, [[40, 1, 0, 0, 1000, 0, 0, 0, 0, 1], [41, 1, 0, 0, 2000, 0, 1, 0, 0, 0]])
    with pytest.raises(ExpungeError, match="'>50K.' on line 2, not one of the training labels.*--strip-label-suffix"):
        load_dataset(str(path), ReadOptions(encode_categories=True, encode_labels=True, missing="impute",
                                            comment="|", test=str(test_path)))


def test_an_unknown_category_in_new_rows_is_refused(tmp_path):
    train, _ = load_dataset(str(write(tmp_path, "t.csv", ADULT_LIKE)),
                            ReadOptions(encode_categories=True, encode_labels=True, missing="impute"))
    rows = write(tmp_path, "rows.csv", "30, Never-worked, 5000, 9th, <=50K\n")
    with pytest.raises(ExpungeError, match="'Never-worked' on line 1, a category the training table does not have"):
        load_rows(rows, train.read_spec)


def test_new_rows_are_encoded_like_the_training_table(tmp_path):
    train, _ = load_dataset(str(write(tmp_path, "t.csv", ADULT_LIKE)),
                            ReadOptions(encode_categories=True, encode_labels=True, missing="impute"))
    rows = load_rows(write(tmp_path, "rows.csv", "30, ?, 5000, 9th, >50K\n"), train.read_spec)
    assert rows.ids is None  # the run gives them fresh ids
    np.testing.assert_array_equal(rows.y, [1])
    np.testing.assert_allclose(rows.X, [[30, 1, 0, 0, 5000, 0, 1, 0, 0, 0]])
    with pytest.raises(ExpungeError, match="reads new rows the way it read its training table"):
        load_rows(rows_path := tmp_path / "rows.csv", train.read_spec, ReadOptions(delimiter=";"))
    assert rows_path.exists()


def test_new_rows_with_other_columns_are_refused(tmp_path):
    train, _ = load_dataset(str(write(tmp_path, "t.csv", "x,y,label\n0.1,0.2,1\n0.3,0.4,0\n")))
    with pytest.raises(ExpungeError, match="differs from the training table"):
        load_rows(write(tmp_path, "rows.csv", "y,x,label\n0.1,0.2,1\n"), train.read_spec)
    with pytest.raises(ExpungeError, match="2 columns where the training table has 3"):
        load_rows(write(tmp_path, "rows2.csv", "x,label\n0.1,1\n"), train.read_spec)


def test_encoders_are_not_fitted_on_new_rows_alone(tmp_path):
    with pytest.raises(ExpungeError, match="fitted on training data only"):
        load_rows(write(tmp_path, "rows.csv", "a,1\n"), None, ReadOptions(encode_categories=True))


def test_string_labels_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ExpungeError, match="text such as 'yes' on line 1.*--encode-labels"):
        load_dataset(str(write(tmp_path, "t.csv", "0.1,yes\n0.2,no\n")))


# ----------------------------------------------------------------------------- the recorded spec


def test_a_recorded_spec_reads_the_same_rows_after_a_json_round_trip(tmp_path):
    path = write(tmp_path, "t.csv", ADULT_LIKE)
    options = ReadOptions(encode_categories=True, encode_labels=True, missing="drop")
    train, _ = load_dataset(str(path), options)
    recorded = json.loads(json.dumps(train.read_spec))  # as a manifest keeps it
    again, _ = load_dataset(str(path), read_spec=recorded)
    assert again.fingerprint() == train.fingerprint()
    np.testing.assert_array_equal(again.ids, train.ids)


def test_a_recorded_spec_is_applied_not_refitted(tmp_path):
    path = write(tmp_path, "t.csv", "x,label\n1.0,a\n,b\n3.0,a\n")
    train, _ = load_dataset(str(path), ReadOptions(encode_labels=True, missing="impute"))
    assert train.read_spec["features"][0]["fill"] == 2.0
    changed = write(tmp_path, "u.csv", "x,label\n,b\n100.0,a\n")  # its own median would be 100, its classes differ
    again, _ = load_dataset(str(changed), read_spec=train.read_spec)
    np.testing.assert_allclose(again.X[:, 0], [2.0, 100.0])
    np.testing.assert_array_equal(again.y, [1, 0])


def test_reading_options_and_a_recorded_spec_do_not_mix(tmp_path):
    path = write(tmp_path, "t.csv", "0.1,1\n0.2,0\n")
    train, _ = load_dataset(str(path))
    with pytest.raises(ExpungeError, match="not both"):
        load_dataset(str(path), ReadOptions(delimiter=","), read_spec=train.read_spec)


def test_table_options_on_other_formats_are_refused(tmp_path):
    with pytest.raises(ExpungeError, match="--delimiter, --encode-categories apply to text tables"):
        load_dataset("digits", ReadOptions(delimiter=",", encode_categories=True))


@pytest.mark.parametrize("field, value, words", [("delimiter", "::", "one character"),
                                                 ("missing", "guess", "refuse, impute, drop"),
                                                 ("comment", "##", "one character")])
def test_bad_read_options_are_refused(field, value, words):
    with pytest.raises(ExpungeError, match=words):
        ReadOptions(**{field: value})


def test_read_table_reports_what_it_inferred(tmp_path):
    table = read_table(write(tmp_path, "t.tsv", "a\tb\tlabel\n1\t2\t0\n3\t4\t1\n"))
    text = " ".join(table.notes)
    assert "delimiter: tab (inferred" in text and "header: line 1 (inferred" in text
    assert "label: column 2 ('label'), the last (the default" in text


def test_a_table_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(ExpungeError, match="not UTF-8 text"):
        load_dataset(str(path))


# ----------------------------------------------------------------------------- the real files


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "adult").exists(), reason=f"{DATA / 'adult'} not found (set EXPUNGE_DATA)")
def test_uci_adult_reads_from_its_own_files():
    adult = DATA / "adult"
    options = ReadOptions(encode_categories=True, encode_labels=True, missing="impute", comment="|",
                          strip_label_suffix=".", test=str(adult / "adult.test"))
    train, test = load_dataset(str(adult / "adult.data"), options)
    assert len(train) == 32561 and len(test) == 16281
    assert train.n_features == test.n_features == 6 + 99  # 6 numeric columns, 8 text ones into 99 categories
    assert train.read_spec["classes"] == ["<=50K", ">50K"]
    assert 0.2 < train.y.mean() < 0.3 and 0.2 < test.y.mean() < 0.3  # about a quarter earn more than 50K
    again, again_test = load_dataset(str(adult / "adult.data"), read_spec=json.loads(json.dumps(train.read_spec)))
    assert again.fingerprint() == train.fingerprint() and again_test.fingerprint() == test.fingerprint()


@pytest.mark.skipif(not (DATA / "higgs").exists(), reason=f"{DATA / 'higgs'} not found (set EXPUNGE_DATA)")
def test_higgs_label_first_needs_its_label_column():
    path = DATA / "higgs" / "binary.train"
    with pytest.raises(ExpungeError, match="--label-column"):
        load_dataset(str(path))
    train, _ = load_dataset(str(path), ReadOptions(label_column=0))
    assert train.X.shape == (7000, 28) and set(np.unique(train.y)) == {0, 1}
