"""Experiments that test SCott's claims on problems whose answer is known."""
