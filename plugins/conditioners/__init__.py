"""Built-in conditioners plugins."""
