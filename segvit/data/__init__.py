"""Datasets and the original training / test pipelines (numpy, PIL and torch only; no cv2, no mmcv)."""
from segvit.data.check import DataProblem, check_dataset
from segvit.data.datasets import (ADE20KDataset, COCOStuffDataset, DATASETS, DataError, PascalContextDataset,
                                  SegDataset, build_dataset, eval_pipeline, read_image, read_label, reduce_zero_label)
from segvit.data.synthetic import write_synthetic_ade20k
from segvit.data.transforms import EvalPipeline, TrainPipeline

__all__ = ["ADE20KDataset", "COCOStuffDataset", "DATASETS", "DataError", "DataProblem", "EvalPipeline",
           "PascalContextDataset", "SegDataset", "TrainPipeline", "build_dataset", "check_dataset", "eval_pipeline",
           "read_image", "read_label", "reduce_zero_label", "write_synthetic_ade20k"]
