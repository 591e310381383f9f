"""Faithfulness (deletion, insertion) and sanity (cascading randomisation) scores of any method's maps."""
