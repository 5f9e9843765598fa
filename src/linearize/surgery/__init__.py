"""Surgery: choose layers to remove, replace them (bridges, folds), sweep, export."""
