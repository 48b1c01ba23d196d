"""Training: strategies, schedules, the custom loop, checkpoints and COCO evaluation."""
