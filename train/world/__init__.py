"""The synthetic visual world of the demo model: vocabulary, scene sampling and rendering, and
task dialogues. `python -m train.synthetic` writes it to disk in the training schema."""
