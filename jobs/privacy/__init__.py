"""Privacy: keys and keyed pseudonyms, consent, erasure, disclosure control and privacy budgets."""
