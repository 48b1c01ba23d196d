"""Stateless TensorFlow ops: anchors, box coding, target assignment, detection decoding."""
