"""The shapes world as a data source: captioned scenes drawn from a seed (`--data world:N`); research on it lives
in the top-level experiments/world package."""
