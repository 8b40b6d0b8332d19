"""Polynomial approximation maths (numpy only, no tensors, no backends): bases, fitting, activation
table, sign composites. The compiler chooses among these; backends evaluate what it chose."""
