"""One module per command's work (score, select, dedup, export, train, report, demo, synth)."""
