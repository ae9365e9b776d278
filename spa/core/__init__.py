"""The small graph IR, tensors, errors and process limits every stage shares."""
