"""Which units to remove: plans by ratio, and searches for a target."""
