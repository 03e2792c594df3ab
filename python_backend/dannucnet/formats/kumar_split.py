"""The Kumar 2017 train/test split of the MoNuSeg 2018 training images, with organs.

The lists are HoVer-Net's (the split most later papers use); see the data
folder's MANIFEST.md. Kept in code because the shared data folder is read-only
and has no ``dataset.json`` of its own.
"""

from __future__ import annotations

ORGANS: dict[str, str] = {
    "TCGA-18-5592-01Z-00-DX1": "Liver",
    "TCGA-21-5784-01Z-00-DX1": "Liver",
    "TCGA-21-5786-01Z-00-DX1": "Liver",
    "TCGA-38-6178-01Z-00-DX1": "Liver",
    "TCGA-49-4488-01Z-00-DX1": "Liver",
    "TCGA-50-5931-01Z-00-DX1": "Liver",
    "TCGA-A7-A13E-01Z-00-DX1": "Breast",
    "TCGA-A7-A13F-01Z-00-DX1": "Breast",
    "TCGA-AR-A1AK-01Z-00-DX1": "Breast",
    "TCGA-AR-A1AS-01Z-00-DX1": "Breast",
    "TCGA-AY-A8YK-01A-01-TS1": "Colon",
    "TCGA-B0-5698-01Z-00-DX1": "Kidney",
    "TCGA-B0-5710-01Z-00-DX1": "Kidney",
    "TCGA-B0-5711-01Z-00-DX1": "Kidney",
    "TCGA-CH-5767-01Z-00-DX1": "Prostate",
    "TCGA-DK-A2I6-01A-01-TS1": "Bladder",
    "TCGA-E2-A14V-01Z-00-DX1": "Breast",
    "TCGA-E2-A1B5-01Z-00-DX1": "Breast",
    "TCGA-G2-A2EK-01A-02-TSB": "Bladder",
    "TCGA-G9-6336-01Z-00-DX1": "Prostate",
    "TCGA-G9-6348-01Z-00-DX1": "Prostate",
    "TCGA-G9-6356-01Z-00-DX1": "Prostate",
    "TCGA-G9-6362-01Z-00-DX1": "Prostate",
    "TCGA-G9-6363-01Z-00-DX1": "Prostate",
    "TCGA-HE-7128-01Z-00-DX1": "Kidney",
    "TCGA-HE-7129-01Z-00-DX1": "Kidney",
    "TCGA-HE-7130-01Z-00-DX1": "Kidney",
    "TCGA-KB-A93J-01A-01-TS1": "Stomach",
    "TCGA-NH-A8F7-01A-01-TS1": "Colon",
    "TCGA-RD-A8N9-01A-01-TS1": "Stomach",
}

KUMAR_TEST_SAME = [
    "TCGA-21-5784-01Z-00-DX1",
    "TCGA-21-5786-01Z-00-DX1",
    "TCGA-B0-5698-01Z-00-DX1",
    "TCGA-B0-5710-01Z-00-DX1",
    "TCGA-CH-5767-01Z-00-DX1",
    "TCGA-E2-A14V-01Z-00-DX1",
    "TCGA-E2-A1B5-01Z-00-DX1",
    "TCGA-G9-6362-01Z-00-DX1",
]
KUMAR_TEST_DIFF = [
    "TCGA-AY-A8YK-01A-01-TS1",
    "TCGA-DK-A2I6-01A-01-TS1",
    "TCGA-G2-A2EK-01A-02-TSB",
    "TCGA-KB-A93J-01A-01-TS1",
    "TCGA-NH-A8F7-01A-01-TS1",
    "TCGA-RD-A8N9-01A-01-TS1",
]
KUMAR_TEST = KUMAR_TEST_SAME + KUMAR_TEST_DIFF
KUMAR_TRAIN = sorted(set(ORGANS) - set(KUMAR_TEST))

SPLITS: dict[str, list[str]] = {
    "kumar-train": KUMAR_TRAIN,
    "kumar-test": KUMAR_TEST,
    "kumar-test-same": KUMAR_TEST_SAME,
    "kumar-test-diff": KUMAR_TEST_DIFF,
}

# MoNuSeg images are 40x scans at 0.2456-0.2527 um/px (from the XMLs); their
# TIFF resolution tags say 72 dpi, which is not a calibration.
MONUSEG_MPP = 0.25
