"""Seeded tiny expert families (`synthetic`) and the built-in demo served when no config is given (`builtin`)."""
