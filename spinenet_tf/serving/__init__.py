"""Serving: SavedModel export, prediction and visualisation."""
