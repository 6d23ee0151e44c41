"""Dense tasks that show what artifact tokens cost, before and after a fix: LOST, zero-shot segmentation, probes.

``sinkless.tasks.compare.compare`` runs one task on one data set under several fixes; ``open_dataset`` reads VOC, COCO,
a folder with an annotation file, the shipped mini set or the synthetic scenes. See docs/TASKS.md.
"""

from sinkless.tasks.compare import TASKS, Comparison, FixResult
from sinkless.tasks.data import Dataset, Sample, mini_set, open_dataset, read_annotation_file
from sinkless.tasks.fixes import FIXES, make_fix, register_fix
from sinkless.tasks.lost import LostProtocol
from sinkless.tasks.probe import ProbeProtocol
from sinkless.tasks.synthetic import SceneSpec, synthetic_scenes
from sinkless.tasks.voc_coco import read_coco, read_voc
from sinkless.tasks.zeroseg import ZeroSegProtocol, mass_mask

__all__ = [
    "TASKS",
    "Comparison",
    "FixResult",
    "Dataset",
    "Sample",
    "open_dataset",
    "read_voc",
    "read_coco",
    "read_annotation_file",
    "mini_set",
    "synthetic_scenes",
    "SceneSpec",
    "FIXES",
    "make_fix",
    "register_fix",
    "LostProtocol",
    "ZeroSegProtocol",
    "mass_mask",
    "ProbeProtocol",
]
