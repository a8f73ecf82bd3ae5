"""The embedded default: a tiny trained teacher from stdlib text + arithmetic, evaluation and report."""
