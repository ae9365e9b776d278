"""One module per operator family: how its channels couple, and how it is rewritten."""
