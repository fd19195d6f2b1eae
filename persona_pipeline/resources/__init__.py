"""One ConfigurableResource per outside service or store, so a test swaps the endpoint, not the code."""
