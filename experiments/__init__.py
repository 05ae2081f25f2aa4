"""Research code run from a checkout (not installed): experiments that test SCott's claims on known problems."""
