"""Evaluation metrics, fed batch by batch: COCO box AP (pycocotools)."""
