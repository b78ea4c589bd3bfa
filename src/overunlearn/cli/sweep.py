"""Commands of this group are registered here (see overunlearn.cli)."""
