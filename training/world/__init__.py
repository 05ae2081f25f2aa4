"""The shapes world: a procedural captioned image set, its tiny teacher, and an evaluator."""
