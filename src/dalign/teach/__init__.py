"""teach stage."""
