"""Published ViT-B/16 16-shot accuracies (%, mean of 3 seeds), from docs/method.md (Zheng et al., ICCV 2023)."""
from __future__ import annotations

# dataset key -> (display name, zero-shot CLIP, CoOp, Tip-Adapter, R-AMT)
PUBLISHED_16_SHOT = {
    "imagenet": ("ImageNet", 66.73, 72.01, 73.08, 73.07),
    "caltech101": ("Caltech101", 92.94, 95.47, 95.63, 97.00),
    "oxford_pets": ("OxfordPets", 89.21, 91.92, 92.66, 93.80),
    "stanford_cars": ("StanfordCars", 65.32, 82.91, 83.04, 85.93),
    "oxford_flowers": ("Flowers102", 71.34, 96.93, 96.15, 98.17),
    "food101": ("Food101", 86.06, 84.33, 87.31, 87.47),
    "fgvc_aircraft": ("FGVCAircraft", 24.72, 43.29, 45.20, 58.47),
    "sun397": ("SUN397", 62.50, 74.58, 76.21, 76.40),
    "dtd": ("DTD", 44.39, 69.21, 71.57, 74.57),
    "eurosat": ("EuroSAT", 47.60, 86.05, 88.53, 91.80),
    "ucf101": ("UCF101", 66.75, 82.25, 84.24, 86.93),
}
PUBLISHED_AVERAGE = {"zero_shot": 65.23, "coop": 79.90, "tip_adapter": 81.24, "rmt": 83.96}
# R-AMT combined with another method: 16-shot average over the 11 datasets (only the average is published)
PUBLISHED_COMBINED_AVERAGE = {"coop": 83.16, "tip-adapter": 84.37}
# head kind -> the published column of that method alone (index into PUBLISHED_16_SHOT rows)
METHOD_ALONE_COLUMN = {"coop": 2, "tip-adapter": 3}
# R-AMT average over the 11 datasets at fewer shots
PUBLISHED_RMT_AVERAGE_BY_SHOTS = {16: 83.96, 8: 80.10, 4: 77.58, 2: 73.48, 1: 70.52}
# The schedule and lambda per dataset are not here: rmt_deploy.training.recipe holds them (one place),
# and `rmt-deploy train` applies the same values. docs/method.md gives no per-dataset numbers for
# base-to-new or domain generalisation, so those tables have no published column.
