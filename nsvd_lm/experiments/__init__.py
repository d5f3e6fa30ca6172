"""Experiments built on the library: perplexity sets and the exact path (``evaldata``, ``ppl``), sweeps
over methods and ratios, the paper-style leaderboard, and activation similarity."""
