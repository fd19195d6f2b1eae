"""One module per stage of the chain, named after the asset it defines."""
