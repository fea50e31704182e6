"""A simulated town that publishes real station traffic, and the benchmarks."""
