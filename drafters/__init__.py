"""Drafters propose tokens (chains or trees) that the target verifies in one forward."""
