"""The frozen record of every choice that shapes a manifest (`cxr manifest build`, `cxr shard build`)."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

from manifests.errors import ManifestError
from manifests.vocab import SOURCES

LABEL_SETS = ("negbio", "chexpert")
UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")
SPLIT_MODES = ("auto", "official", "random", "study-digit")


@dataclass(frozen=True)
class ManifestOptions:
    """Every option of `cxr manifest build`. Saved in the manifest's metadata, so a build can be repeated."""

    source: str                          # one of manifests.vocab.SOURCES
    seed: int = 0                        # every random split is a pure function of the seed
    # NIH, CheXpert
    views: tuple[str, ...] = ()          # () = all views; e.g. ("PA", "AP")
    valid_fraction: float = 0.1          # of train_val patients (NIH lists), of non-test subjects (study-digit),
                                         # of train.csv patients (CheXpert without test.csv)
    # MIMIC, CheXpert, table
    labels: str = "negbio"               # MIMIC: "negbio" | "chexpert"
    uncertain: str = "zeros"             # "zeros": -1 -> 0 | "ones": -1 -> 1 | "ignore": -1 -> NaN; blank -> 0
    split: str = "auto"                  # "auto" (official if present, else random) | "official" | "random"
                                         # | "study-digit" (MIMIC: study_id ending in 8 or 9 is test)
    fetch_list: str | None = None        # also write the relative paths of the selected images here
    # folder / cardiomegaly (ratios: every seeded random split, as fractions of patients)
    label: str | None = None             # folder: names the one positive class folder's label; None: the
                                         # folder's name (`abnormal` alone: Cardiomegaly)
    ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)
    patient_pattern: str | None = None   # regex with one group -> patient_id
    negative: str = "normal"             # folder: the all-zero class folder (any case)
    # table: any CSV/Parquet of labels (`--source table`)
    table: str | None = None             # the label table's path (absolute, or relative to the cwd)
    path_col: str | None = None          # column holding the image path (relative to RAW) or id
    patient_col: str | None = None       # column holding the patient id
    label_cols: tuple[str, ...] = ()     # label columns, in this order
    study_col: str | None = None
    view_col: str | None = None
    split_col: str | None = None         # train/valid/val/validate/test per row; None: seeded --ratios
    path_format: str | None = None       # e.g. "stage_2_train_images/{}.dcm"; None: the value is the path
    sex_col: str | None = None           # column holding F/M/Female/Male (manifests.demographics); None: missing
    age_col: str | None = None           # column holding the age in years (or 045Y/006M); None: missing

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ManifestError(f"unknown source {self.source!r}: choose one of {', '.join(SOURCES)}")
        _check_choice("labels", self.labels, LABEL_SETS)
        _check_choice("uncertain", self.uncertain, UNCERTAIN_POLICIES)
        _check_choice("split", self.split, SPLIT_MODES)
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ManifestError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if len(self.ratios) != 3 or any(not math.isfinite(r) or r < 0 for r in self.ratios) or sum(self.ratios) <= 0:
            raise ManifestError(f"--ratios needs three non-negative numbers train:valid:test, got {self.ratios}")
        from manifests.table import RESERVED_COLUMNS   # here, not at import: pandas is slow to import (cxr --help)

        if self.label is not None and (not self.label.strip() or self.label in RESERVED_COLUMNS):
            raise ManifestError(f"--label {self.label!r} must be a name other than {', '.join(RESERVED_COLUMNS)}")
        if not self.negative.strip():
            raise ManifestError("--negative needs a class folder name, e.g. normal")
        if self.patient_pattern is not None:
            try:
                groups = re.compile(self.patient_pattern).groups
            except re.error as exc:
                raise ManifestError(f"--patient-pattern '{self.patient_pattern}' is not a valid regex: {exc}") from None
            if groups < 1:
                raise ManifestError(f"--patient-pattern '{self.patient_pattern}' needs one (group) "
                                    "that captures the patient id")
        self._refuse_foreign_options()

    def _refuse_foreign_options(self) -> None:
        """An option that the source ignores is a user mistake: say so instead of ignoring it."""
        folder = self.source in ("folder", "cardiomegaly")
        if self.views and self.source not in ("nih", "chexpert"):
            raise ManifestError(f"--views applies to --source nih and chexpert only, not {self.source}")
        if self.labels != "negbio" and self.source != "mimic":
            raise ManifestError(f"--labels applies to --source mimic only, not {self.source}")
        if self.uncertain != "zeros" and self.source not in ("mimic", "chexpert", "table"):
            raise ManifestError(f"--uncertain applies to --source mimic, chexpert and table only, not {self.source}")
        if self.split == "study-digit" and self.source != "mimic":
            raise ManifestError(f"--split study-digit applies to --source mimic only, not {self.source}")
        if self.patient_pattern is not None and not folder:
            raise ManifestError(f"--patient-pattern applies to --source folder/cardiomegaly only, not {self.source}")
        if self.source == "cardiomegaly" and self.label not in (None, "Cardiomegaly"):
            raise ManifestError("--source cardiomegaly always labels Cardiomegaly; use --source folder for --label")
        if self.negative != "normal" and self.source != "folder":
            raise ManifestError(f"--negative applies to --source folder only, not {self.source}")
        table_options = {"--table": self.table, "--path-col": self.path_col, "--patient-col": self.patient_col,
                         "--label-cols": self.label_cols, "--study-col": self.study_col, "--view-col": self.view_col,
                         "--split-col": self.split_col, "--path-format": self.path_format,
                         "--sex-col": self.sex_col, "--age-col": self.age_col}
        if self.source == "table":
            missing = [flag for flag in ("--table", "--path-col", "--patient-col", "--label-cols")
                       if not table_options[flag]]
            if missing:
                raise ManifestError(f"--source table needs {', '.join(missing)}")
        else:
            given = [flag for flag, value in table_options.items() if value]
            if given:
                raise ManifestError(f"{', '.join(given)} apply to --source table only, not {self.source}")

    @property
    def split_ratios(self) -> tuple[float, float, float]:
        """`ratios` scaled to sum to 1."""
        total = float(sum(self.ratios))
        return tuple(float(r) / total for r in self.ratios)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ManifestOptions":
        """Inverse of `to_dict` (e.g. from a manifest's metadata); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ManifestError(f"unknown manifest option(s): {', '.join(unknown)}")
        values = dict(data)
        for name in ("views", "ratios", "label_cols"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ManifestError(f"--{option} {value!r} is not one of {', '.join(choices)}")
