"""amct-torch."""
