"""Class ranker: score 2D class averages on an absolute 0-1 scale (CNN + features)."""
