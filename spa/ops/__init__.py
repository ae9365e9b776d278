"""One module per operator family, holding everything spa knows about its ops; ``registry`` composes them."""
