"""Datasets: the common interface, the toy world's task, CIFAR-100(-LT), split files, ImageFolder."""

from trainer.data.base import LabelledImages, TaskData, Transformed, class_counts

__all__ = ["LabelledImages", "TaskData", "Transformed", "class_counts"]
