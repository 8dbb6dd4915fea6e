"""Gates of the demo model's recipe: short measured runs that must pass before long ones.

Gate A (`python -m train.gates.pointing`): can the demo-sized LLM point, given perfect
per-token features? It decides how visual tokens get their place on the canvas.
"""
