"""Verification: bound optimisation (alpha-CROWN) and, beside it, the search for verdicts."""
