"""One label vocabulary per source, named exactly as the source names its labels."""
from __future__ import annotations

# The 14 findings in the order of Wang et al. (CVPR 2017), then `No Finding`.
NIH_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
    "No Finding",
)

# The label columns of mimic-cxr-2.0.0-negbio.csv.gz / -chexpert.csv.gz, in file order.
MIMIC_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)

# The 14 label columns of CheXpert's train.csv / valid.csv, in file order.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)

SOURCES: tuple[str, ...] = ("nih", "mimic", "chexpert", "table", "cardiomegaly", "folder")
