"""Evaluation: predictions -> per-class counts (on whichever side holds the data) -> metrics (on the server),
computed by the same code for every strategy."""
