"""`make mutation`: mutation testing of the pure modules (see __main__ and docs/mutation.md)."""
