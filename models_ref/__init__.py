"""Small reference model blocks built only on attnlib."""
