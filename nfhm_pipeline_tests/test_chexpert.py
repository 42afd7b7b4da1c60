import os

import numpy as np
import pytest

from nfhm_pipeline.errors import ManifestError, NfhmError
from nfhm_pipeline.ingest.chexpert import (
    CHEXPERT_FINDINGS,
    LabelPolicyError,
    apply_uncertain_policy,
    binary_targets_from_labels,
    read_chexpert_csv,
)

FINDINGS = ["Edema", "Pneumonia", "Fracture"]
NAN = np.nan

# Rows cover 1.0 / 0.0 / -1.0 / empty, also written as "1" and "-1".
CSV = """Path,Sex,Edema,Pneumonia,Fracture
train/p1/view1_frontal.jpg,Male,1.0,0.0,
train/p2/view1_frontal.jpg,Female,-1.0,,1
train/p3/view1_lateral.jpg,Female,,-1,0.0
"""

# Label states [N=3, F=4] and the hand-computed results of every policy.
V = np.array([[1, 0, -1, NAN], [-1, -1, NAN, 1], [0, NAN, 1, 0]])
T, F_ = True, False


def write(tmp_path, text, name="train.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reader_keeps_positive_negative_uncertain_and_empty_states(tmp_path):
    df = read_chexpert_csv(write(tmp_path, CSV), findings=FINDINGS)
    assert list(df.columns) == ["uri", "source_row", *FINDINGS]
    np.testing.assert_array_equal(
        df[FINDINGS].to_numpy(), np.array([[1.0, 0.0, NAN], [-1.0, NAN, 1.0], [NAN, -1.0, 0.0]])
    )
    assert df["source_row"].tolist() == [1, 2, 3]


def test_reader_resolves_relative_paths_against_the_csv_folder(tmp_path):
    df = read_chexpert_csv(write(tmp_path, CSV), findings=FINDINGS)
    assert df["uri"].iloc[0] == os.path.join(str(tmp_path), "train", "p1", "view1_frontal.jpg")
    assert all(os.path.isabs(u) for u in df["uri"])


def test_reader_resolves_relative_paths_against_image_root_when_given(tmp_path):
    root = tmp_path / "images"
    df = read_chexpert_csv(write(tmp_path, CSV), findings=FINDINGS, image_root=root)
    assert df["uri"].iloc[2] == os.path.join(str(root), "train", "p3", "view1_lateral.jpg")


def test_reader_defaults_to_the_14_chexpert_findings_in_order(tmp_path):
    header = "Path," + ",".join(CHEXPERT_FINDINGS)
    row = "a.jpg," + ",".join(["0.0"] * 14)
    df = read_chexpert_csv(write(tmp_path, f"{header}\n{row}\n"))
    assert len(CHEXPERT_FINDINGS) == 14
    assert list(df.columns[2:]) == list(CHEXPERT_FINDINGS)


def test_invalid_label_value_error_names_file_row_column_and_value(tmp_path):
    path = write(tmp_path, CSV.replace("-1.0,,1", "-1.0,2.0,1"))
    with pytest.raises(ManifestError) as err:
        read_chexpert_csv(path, findings=FINDINGS)
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and "'Pneumonia'" in msg and "'2.0'" in msg


def test_missing_finding_columns_are_all_listed(tmp_path):
    with pytest.raises(ManifestError, match=r"\['Cardiomegaly', 'Edema'\]"):
        read_chexpert_csv(write(tmp_path, "Path,Fracture\na.jpg,1\n"), findings=["Cardiomegaly", "Edema", "Fracture"])


def test_missing_csv_raises_manifest_error_naming_the_file(tmp_path):
    with pytest.raises(ManifestError, match="nope.csv"):
        read_chexpert_csv(tmp_path / "nope.csv")


def test_ignore_policy_masks_uncertain_and_counts_empty_as_negative():
    y, mask = apply_uncertain_policy(V, "ignore")
    np.testing.assert_array_equal(y, [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    np.testing.assert_array_equal(mask, [[T, T, F_, T], [F_, F_, T, T], [T, T, T, T]])
    assert y.dtype == np.int8 and mask.dtype == bool


def test_positive_policy_maps_uncertain_to_one():
    y, mask = apply_uncertain_policy(V, "positive")
    np.testing.assert_array_equal(y, [[1, 0, 1, 0], [1, 1, 0, 1], [0, 0, 1, 0]])
    assert mask.all()


def test_negative_policy_maps_uncertain_to_zero():
    y, mask = apply_uncertain_policy(V, "negative")
    np.testing.assert_array_equal(y, [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    assert mask.all()


def test_missing_ignore_masks_empty_entries():
    y, mask = apply_uncertain_policy(V, "positive", missing="ignore")
    np.testing.assert_array_equal(y, [[1, 0, 1, 0], [1, 1, 0, 1], [0, 0, 1, 0]])
    np.testing.assert_array_equal(mask, [[T, T, T, F_], [T, T, F_, T], [T, F_, T, T]])
    _, mask = apply_uncertain_policy(V, "ignore", missing="ignore")
    np.testing.assert_array_equal(mask, [[T, T, F_, F_], [F_, F_, F_, T], [T, F_, T, T]])


def test_unknown_policy_is_a_value_error_listing_the_options():
    with pytest.raises(LabelPolicyError, match=r"\['ignore', 'positive', 'negative'\]") as err:
        apply_uncertain_policy(V, "u-ones")
    assert isinstance(err.value, ValueError) and isinstance(err.value, NfhmError)


def test_policy_rejects_values_other_than_chexpert_states():
    with pytest.raises(LabelPolicyError, match="2.0"):
        apply_uncertain_policy(np.array([[1.0, 2.0]]), "ignore")


def test_one_vs_rest_targets_have_one_column_per_class():
    y, mask, classes = binary_targets_from_labels(["notumor", "glioma", "pituitary", "glioma"])
    assert classes == ["glioma", "notumor", "pituitary"]
    np.testing.assert_array_equal(y, [[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]])
    assert mask.all() and mask.shape == y.shape


def test_two_class_labels_still_give_two_columns():
    y, _, classes = binary_targets_from_labels(np.array([1, 0, 1]))
    assert classes == [0, 1]
    np.testing.assert_array_equal(y, [[0, 1], [1, 0], [0, 1]])


def test_label_outside_given_classes_is_rejected():
    with pytest.raises(LabelPolicyError, match="meningioma"):
        binary_targets_from_labels(["glioma", "meningioma"], classes=["glioma", "notumor"])
