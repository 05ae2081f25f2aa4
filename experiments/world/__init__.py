"""The shapes world's research side: its tiny teacher, the evaluator's classifier and metrics, and the report."""
