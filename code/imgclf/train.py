"""Shim: SAGEMAKER_TRAINING_MODULE=imgclf.train:main keeps working; the training job is imgclf.training.job."""

from imgclf.training.job import main

__all__ = ["main"]
