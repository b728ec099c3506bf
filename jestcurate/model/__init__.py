"""The model: open_clip loading (the only place that imports open_clip) and decoding on the
model's device."""
