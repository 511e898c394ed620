"""The shared label map: the built-in table, an override file, and the one-line errors of a bad one."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from manifests.errors import ManifestError
from manifests.labelmap import BUILTIN_MAP, load_label_map
from manifests.vocab import MIMIC_LABELS, NIH_LABELS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_builtin_map_joins_identical_concepts_only():
    m = load_label_map()
    for source in ("mimic", "chexpert", "table", "folder"):
        assert m.shared(source, "Pleural Effusion") == "Effusion"
    assert m.shared("nih", "Effusion") == "Effusion"
    # Same names meet as they are; labels without a counterpart keep their own name.
    for source, label in [("nih", "Pleural_Thickening"), ("nih", "Infiltration"), ("mimic", "Lung Opacity"),
                          ("mimic", "Support Devices"), ("nih", "Atelectasis"), ("mimic", "Atelectasis")]:
        assert m.shared(source, label) == label
    nih, mimic = m.shared_labels("nih", list(NIH_LABELS)), m.shared_labels("mimic", list(MIMIC_LABELS))
    assert sorted(set(nih) & set(mimic)) == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion",
                                            "No Finding", "Pneumonia", "Pneumothorax"]
    assert m.to_rows() == sorted(pd.read_csv(BUILTIN_MAP).to_dict("records"),
                                 key=lambda r: (r["source"], r["label"]))


def test_override_replaces_and_adds_rows(tmp_path):
    path = tmp_path / "map.csv"
    path.write_text("source,label,shared\nmimic,Pleural Effusion,Pleural Effusion\nmimic,Lung Opacity,Infiltration\n")
    m = load_label_map(path)
    assert m.shared("mimic", "Pleural Effusion") == "Pleural Effusion"     # replaced
    assert m.shared("mimic", "Lung Opacity") == "Infiltration"             # added
    assert m.shared("chexpert", "Pleural Effusion") == "Effusion"          # the rest of the built-in table stays
    assert load_label_map().shared("mimic", "Lung Opacity") == "Lung Opacity"


@pytest.mark.parametrize("text, needle", [
    ("source,label\nmimic,Edema\n", "needs the columns source,label,shared (missing shared)"),
    ("source,label,shared\nmimic,,Edema\n", "line 2: source, label and shared must all be given"),
    ("source,label,shared\nmimic,Edema,A\nmimic,Edema,B\n", "line 3: mimic label 'Edema' is mapped twice"),
])
def test_bad_override_is_a_one_line_error(tmp_path, text, needle):
    path = tmp_path / "map.csv"
    path.write_text(text)
    with pytest.raises(ManifestError) as err:
        load_label_map(path)
    assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_override_and_colliding_names(tmp_path):
    with pytest.raises(ManifestError, match="label map not found"):
        load_label_map(tmp_path / "nope.csv")
    path = tmp_path / "map.csv"
    path.write_text("source,label,shared\nmimic,Lung Opacity,Edema\n")
    with pytest.raises(ManifestError, match="mimic labels 'Edema' and 'Lung Opacity' both map to 'Edema'"):
        load_label_map(path).shared_labels("mimic", list(MIMIC_LABELS))


def test_readme_table_is_the_builtin_map():
    text = README.read_text()
    section = text[text.index("<!-- label map -->"):text.index("<!-- /label map -->")]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| `([^`]+)` \|$", section, flags=re.M)
    assert sorted(rows) == sorted((r["source"], r["label"], r["shared"]) for r in load_label_map().to_rows())
