"""Faithfulness and sanity scores of any method's maps (none yet)."""
