"""The registry service: the model pool, its live statistics and health, and a watch stream of changes."""
