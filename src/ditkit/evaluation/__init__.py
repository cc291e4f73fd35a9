"""Evaluation: sampling at scale, Inception features streamed into FID / IS / KID /
precision-recall, ADM `.npz`.

The training-time callback is `ditkit.evaluation.callback.FIDCallback` (not imported here: it needs
Lightning).
"""

from .inception import inception_features, inception_fingerprint, load_inception
from .reference import (
    Reference,
    check_reference,
    load_reference,
    read_adm_reference,
    save_reference,
)
from .runner import METRICS, InceptionMetrics, SamplingPlan, sample_and_score
from .samples_io import PartStore, save_grid, write_adm_npz
from .sampling import balanced_labels, plan_batches, sample_noise, to_uint8
from .stats import FeatureStats, frechet_distance, inception_score

__all__ = [
    "METRICS",
    "FeatureStats",
    "InceptionMetrics",
    "PartStore",
    "Reference",
    "SamplingPlan",
    "balanced_labels",
    "check_reference",
    "frechet_distance",
    "inception_features",
    "inception_fingerprint",
    "inception_score",
    "load_inception",
    "load_reference",
    "plan_batches",
    "read_adm_reference",
    "sample_and_score",
    "sample_noise",
    "save_grid",
    "save_reference",
    "to_uint8",
    "write_adm_npz",
]
